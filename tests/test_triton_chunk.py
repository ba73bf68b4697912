"""The Triton chunked gated delta rule (``lowering/triton_chunk.py``) against the reference.

Inputs live on the test device: a GPU when there is one, else the CPU, where the kernels run
under ``TRITON_INTERPRET=1`` (set by conftest.py) at small shapes. The reference runs on the
CPU in float64. The GPU tests at the end run real sizes against the PyTorch path.

Every comparison is a relative norm error ``||x - ref|| / ||ref||`` against
``graphdelta.reference.gated_delta_rule`` in float64 on the same (dtype-rounded) inputs.
Measured under the interpreter (fp32 arithmetic throughout), worst case over the hypothesis
examples and the fixed cases: o 1.8e-6 (fp32), 3.5e-3 (bf16: its output rounding, which the
interpreter does by truncation), 2.4e-4 (fp16); final state 1.3e-6 in every dtype (it is fp32).
The tolerances below leave 10x for fp32 and room for the tf32 products that 16-bit inputs use
on a GPU (not measured yet).
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings, strategies as st

import graphdelta
from graphdelta.lowering import torch_chunk
from graphdelta.lowering.contract import state_shape
from graphdelta.lowering.triton_chunk import chunk_gated_delta_rule
from graphdelta.lowering.triton_chunk_utils import ChunkPlan
from graphdelta.reference import gated_delta_rule
from graphdelta.testing import poisoned_allocations

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("kv", "vk")
CHUNK_SIZES = (16, 32, 64)
# (o, final state) tolerance per input dtype
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (5e-3, 5e-3),
}
GPU_TOLERANCES = {torch.bfloat16: (1e-2, 1e-2)}  # against the PyTorch path

# Fixed cases: name -> keyword arguments of make_inputs (and chunk_size).
CASES = {
    "gdn_gates_zero": dict(gate="zero", chunk_size=64, T=65),
    "kda_gates_zero": dict(gate="zero", per_channel=True, chunk_size=32, T=63),
    "gdn_gates_-30": dict(gate="strong", chunk_size=32, T=80, init=True),
    "kda_gates_-30": dict(gate="strong", per_channel=True, chunk_size=64, T=80, init=True),
    "kda_gates_0_or_-30": dict(gate="mixed", per_channel=True, chunk_size=16, T=40, layout="vk"),
    "gdn_varlen_c64": dict(HV=1, chunk_size=64, lengths=(1, 65, 0, 63), init=True),
    "kda_gva4_varlen": dict(per_channel=True, HV=4, chunk_size=16, lengths=(1, 17, 0, 20)),
    "gdn_gva2_batch2_vk": dict(B=2, chunk_size=16, T=33, layout="vk", init=True),
    "kda_odd_dims_bf16": dict(per_channel=True, K=24, V=40, chunk_size=16, T=17,
                              dtype=torch.bfloat16),
    # several value tiles (BV = 64) and K sub-tiles of the per-channel diagonal blocks
    "kda_wide_heads": dict(per_channel=True, K=80, V=80, chunk_size=16, T=20, init=True),
    "gdn_wide_heads_vk": dict(K=128, V=96, chunk_size=32, T=20, init=True, layout="vk"),
}


def make_inputs(B=1, T=32, H=1, HV=2, K=32, V=32, per_channel=False, gate="uniform", init=False,
                layout="kv", lengths=None, l2norm=True, dtype=torch.float32, seed=0, **_):
    """Random inputs (in ``dtype``, on DEVICE) and the call's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is not None:
        B, T = 1, sum(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, HV, V)
    if not l2norm:  # the delta rule expects unit keys; without in-kernel l2norm, give them
        k = torch.nn.functional.normalize(k, dim=-1)
    gshape = (B, T, HV, K) if per_channel else (B, T, HV)
    u = torch.rand(gshape, generator=gen)
    g = {
        "zero": torch.zeros(gshape),
        "uniform": -u,
        "strong": -30 * u,
        "mixed": torch.where(u < 0.5, 0.0, -30.0),
    }[gate]
    beta = torch.rand(B, T, HV, generator=gen)
    N = B if lengths is None else len(lengths)
    cu = None
    if lengths is not None:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v, g, beta = (x.to(DEVICE, dtype) for x in (q, k, v, g, beta))
    return dict(
        q=q, k=k, v=v, g=g, beta=beta, scale=K**-0.5,
        initial_state=randn(*state_shape(N, HV, K, V, layout)).to(DEVICE) if init else None,
        cu_seqlens=cu, use_qk_l2norm_in_kernel=l2norm, state_layout=layout,
    )


def reference(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference on the CPU (token by token: a GPU would only add launches)."""
    q, k, v, g, beta = (args[n].cpu().double() for n in ("q", "k", "v", "g", "beta"))
    init, cu = args["initial_state"], args["cu_seqlens"]
    return gated_delta_rule(
        q, k, v, g, beta, scale=args["scale"],
        initial_state=None if init is None else init.cpu().double(), output_final_state=True,
        cu_seqlens=None if cu is None else cu.cpu(), use_qk_l2norm_in_kernel=args["use_qk_l2norm_in_kernel"],
        state_layout=args["state_layout"],
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.cpu(), ref.cpu()
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_against_reference(args: dict, chunk_size: int) -> tuple[float, float]:
    dtype = args["v"].dtype
    with poisoned_allocations():
        o, final = chunk_gated_delta_rule(**args, chunk_size=chunk_size)
    ref_o, ref_final = reference(args)
    assert o.dtype == dtype and o.shape == args["v"].shape and o.is_contiguous()
    assert final.dtype == torch.float32 and final.shape == ref_final.shape and final.is_contiguous()
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    err_o, err_s = rel_err(o, ref_o), rel_err(final, ref_final)
    tol_o, tol_s = TOLERANCES[dtype]
    assert err_o <= tol_o, f"o: relative error {err_o:.2e} > {tol_o:.0e} ({dtype})"
    assert err_s <= tol_s, f"final state: relative error {err_s:.2e} > {tol_s:.0e} ({dtype})"
    return err_o, err_s


@st.composite
def problems(draw):
    H = draw(st.sampled_from([1, 2]))
    HV = H * draw(st.sampled_from([1, 2, 4] if H == 1 else [1, 2]))
    kw = dict(
        H=H, HV=HV,
        per_channel=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        K=draw(st.sampled_from([16, 32, 48, 64])),
        V=draw(st.sampled_from([16, 24, 32, 64])),
        gate=draw(st.sampled_from(["uniform", "zero", "strong", "mixed"])),
        init=draw(st.booleans()),
        l2norm=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
    )
    if draw(st.booleans()):
        length = st.sampled_from([1, 15, 16, 17, 63, 64, 65]) | st.integers(0, 70)
        kw["lengths"] = tuple(draw(st.lists(length, min_size=1, max_size=3)))
    else:
        kw["B"] = 1 if HV > 2 else draw(st.sampled_from([1, 2]))
        kw["T"] = draw(st.sampled_from([1, 63, 65]) | st.integers(1, 100))
    return kw, draw(st.sampled_from(CHUNK_SIZES))


@settings(max_examples=12)
@given(problems())
def test_matches_reference(problem):
    kw, chunk_size = problem
    check_against_reference(make_inputs(**kw), chunk_size)


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_cases(name):
    kw = dict(CASES[name])
    check_against_reference(make_inputs(**kw), kw.get("chunk_size", 64))


@pytest.mark.parametrize("per_channel", [False, True])
def test_public_op_uses_triton(monkeypatch, per_channel):
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "triton")
    args = make_inputs(T=40, H=1, HV=2, per_channel=per_channel, init=True, layout="vk")
    calls = []
    monkeypatch.setattr("graphdelta.lowering.triton_chunk.solve_tril",
                        _spy(calls, graphdelta.lowering.triton_chunk.solve_tril))
    op = graphdelta.chunk_kda if per_channel else graphdelta.chunk_gated_delta_rule
    o, final = op(**args, output_final_state=True)
    ref_o, ref_final = reference(args)
    assert calls, "the triton backend was not used"
    assert rel_err(o, ref_o) <= TOLERANCES[torch.float32][0]
    assert rel_err(final, ref_final) <= TOLERANCES[torch.float32][1]


def _spy(calls: list, fn):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper


def test_float64_is_rejected():
    args = make_inputs(T=4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        chunk_gated_delta_rule(**args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_input_returns_initial_state(layout):
    args = make_inputs(B=2, T=0, init=True, layout=layout)
    o, final = chunk_gated_delta_rule(**args)
    assert o.shape == (2, 0, 2, 32)
    torch.testing.assert_close(final, args["initial_state"])


def test_chunk_size_is_checked():
    with pytest.raises(ValueError, match="48"):
        chunk_gated_delta_rule(**make_inputs(T=4), chunk_size=48)


def test_chunk_table_skips_empty_sequences():
    cu = torch.tensor([0, 0, 70, 70, 71, 200], device=DEVICE)
    plan = ChunkPlan.build(batch=1, total=200, cu_seqlens=cu, chunk_size=64)
    assert plan.num_slots == 200 // 64 + 5
    assert plan.chunk_offsets.tolist() == [0, 0, 2, 2, 3, 6]
    table = plan.chunk_indices.tolist()
    assert table[:6] == [[1, 0], [1, 1], [3, 0], [4, 0], [4, 1], [4, 2]]
    for seq, chunk in table[6:]:  # spare slots start past the end of the last sequence
        assert seq == 4 and int(cu[4]) + chunk * 64 >= int(cu[5])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_real_size_matches_torch_path(per_channel, varlen):
    lengths = (1, 1000, 63, 3032) if varlen else None
    args = make_inputs(T=4096, H=16, HV=32, K=128, V=128, per_channel=per_channel, init=True,
                       lengths=lengths, dtype=torch.bfloat16)
    o, final = chunk_gated_delta_rule(**args)
    ref_o, ref_final = torch_chunk.chunk_gated_delta_rule(**args)
    tol_o, tol_s = GPU_TOLERANCES[torch.bfloat16]
    assert rel_err(o, ref_o) <= tol_o
    assert rel_err(final, ref_final) <= tol_s


def test_chunk_plan_is_built_once_per_cu_seqlens():
    """Every layer of a forward passes the same cu_seqlens: one plan (8 small kernels) serves
    them all; another tensor, or the same one changed in place, gets a new plan."""
    cu = torch.tensor([0, 3, 70, 200], device=DEVICE)
    plan = ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu, chunk_size=64)
    assert ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu, chunk_size=64) is plan
    assert ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu, chunk_size=32) is not plan
    assert ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu.clone(), chunk_size=64) is not plan
    cu[1] = 10
    fresh = ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu, chunk_size=64)
    assert fresh is not plan and fresh.chunk_offsets.tolist() == [0, 1, 2, 5]  # 10, 60, 130 tokens


def test_chunk_plan_of_an_inference_tensor_is_built_each_call():
    """An inference-mode cu_seqlens has no version counter to tell a refill: no cache, no crash."""
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 70, 200], device=DEVICE)
        plan = ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu, chunk_size=64)
        cu[1] = 10
        fresh = ChunkPlan.for_call(batch=1, total=200, cu_seqlens=cu, chunk_size=64)
    assert fresh is not plan and fresh.chunk_offsets.tolist() == [0, 1, 2, 5]
