"""The Triton recurrent gated delta rule (decode over a state pool, and short prefill) against
``graphdelta.reference`` in float64.

Without CUDA the kernels run under the Triton interpreter (~13 ms per program and token here),
so the shapes stay small: ``B * HV * cdiv(V, 32) * T`` at most a few hundred. The CUDA tests
run at real sizes (HV=32, K=V=128, batch 64) and capture the decode step in a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

import graphdelta.ops as ops
from graphdelta import reference
from graphdelta.lowering import triton_recurrent
from graphdelta.lowering.contract import state_shape

from pool_checks import assert_replay_matches_eager

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["kv", "vk"]
GATES = ["scalar", "channel"]
GROUPS = [1, 2, 4]  # HV // H
HEAD_DIMS = [16, 32, 48, 64]
GATE_KINDS = ["zero", "mild", "wide"]  # all exactly 0; logsigmoid-like; 0 .. -30 with both ends

# Relative norm error against float64, per output and input dtype. The output is rounded to v's
# dtype, the state is always float32. Measured maxima over 200 random decode and prefill examples
# (interpreter): o fp32 2.3e-7, bf16 4.4e-3, fp16 2.7e-4; state 1.5e-7 whatever the inputs'
# dtype. (The interpreter rounds float32 -> bfloat16 by truncation: about twice the error of
# round-to-nearest on a GPU.) Tolerances are 3-10x above.
O_TOL = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
STATE_TOL = 2e-6

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def gate_values(shape, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "mild":
        return F.logsigmoid(torch.randn(shape, generator=gen) + 3)
    g = -30 * torch.rand(shape, generator=gen)
    flat = g.view(-1)
    flat[::5] = 0.0
    flat[2::7] = -30.0
    return g


def make_inputs(B, T, H, HV, K, V, dtype, gate, gate_kind, l2norm, seed):
    """q, k, v, g, beta in ``dtype`` on DEVICE; k unit-norm when the kernel does not normalize."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2norm:
        k = F.normalize(k, dim=-1)  # keeps beta * |k|^2 < 2: the delta rule stays contractive
    v = torch.randn(B, T, HV, V, generator=gen)
    g = gate_values((B, T, HV) if gate == "scalar" else (B, T, HV, K), gate_kind, gen)
    beta = torch.rand(B, T, HV, generator=gen)
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v, g, beta)]


def random_state(n, HV, K, V, layout, gen) -> torch.Tensor:
    return (0.5 * torch.randn(state_shape(n, HV, K, V, layout), generator=gen)).to(DEVICE)


def run_reference(q, k, v, g, beta, scale, h0, cu_seqlens, l2norm, layout):
    return reference.gated_delta_rule(
        *(x.double() for x in (q, k, v, g, beta)), scale=scale,
        initial_state=None if h0 is None else h0.double(), output_final_state=True,
        cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=l2norm, state_layout=layout,
    )


# ----------------------------------------------------------------------------- decode


@given(
    B=st.integers(1, 4), T=st.integers(1, 4), H=st.integers(1, 2), group=st.sampled_from(GROUPS),
    K=st.sampled_from(HEAD_DIMS), V=st.sampled_from(HEAD_DIMS), dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS), gate=st.sampled_from(GATES),
    gate_kind=st.sampled_from(GATE_KINDS), l2norm=st.booleans(), inter=st.booleans(),
    pad=st.lists(st.booleans(), min_size=4, max_size=4), extra_slots=st.integers(0, 3),
    index_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**16),
)
@example(  # widest case: GVA 4, two V tiles (one partial), speculative T=4, padding, per-channel
    B=4, T=4, H=1, group=4, K=64, V=48, dtype=torch.bfloat16, layout="vk", gate="channel",
    gate_kind="wide", l2norm=True, inter=True, pad=[True, False, False, True], extra_slots=3,
    index_dtype=torch.int32, seed=1,
)
@example(
    B=3, T=1, H=2, group=2, K=16, V=64, dtype=torch.float16, layout="kv", gate="scalar",
    gate_kind="zero", l2norm=False, inter=False, pad=[False, True, False, False], extra_slots=0,
    index_dtype=torch.int64, seed=2,
)
def test_decode_matches_reference(
    B, T, H, group, K, V, dtype, layout, gate, gate_kind, l2norm, inter, pad, extra_slots,
    index_dtype, seed,
):
    HV = H * group
    if HV > 4:
        HV, H = 4, 4 // group
    q, k, v, g, beta = make_inputs(B, T, H, HV, K, V, dtype, gate, gate_kind, l2norm, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pool = random_state(B + extra_slots, HV, K, V, layout, gen)
    slots = torch.randperm(B + extra_slots, generator=gen)[:B]
    slots[torch.tensor(pad[:B])] = -1
    state_indices = slots.to(device=DEVICE, dtype=index_dtype)
    before = pool.clone()
    scale = K**-0.5

    o, states = triton_recurrent.gated_delta_rule_decode(
        q, k, v, g, beta, pool, state_indices, scale, l2norm, layout, inter
    )

    assert o.shape == v.shape and o.dtype == v.dtype and o.is_contiguous()
    rows = [b for b in range(B) if slots[b] >= 0]
    padded = [b for b in range(B) if slots[b] < 0]
    used = slots[rows].tolist()
    untouched = [s for s in range(pool.shape[0]) if s not in used]
    assert torch.equal(pool[untouched], before[untouched]), "a slot no row owns was written"
    assert not o[padded].any(), "padded rows must output zeros"
    if inter:
        assert states.shape == (B, T, *pool.shape[1:]) and states.dtype == pool.dtype
        assert not states[padded].any()
    else:
        assert states.shape == (0,)
    if not rows:
        return
    x = [t[rows] for t in (q, k, v, g, beta)]
    ref_o, ref_state = run_reference(*x, scale, before[used], None, l2norm, layout)
    assert rel_err(o[rows], ref_o) <= O_TOL[dtype]
    assert rel_err(pool[used], ref_state) <= STATE_TOL
    if inter:
        assert torch.equal(states[rows, -1], pool[used]), "last intermediate != new pool state"
        for t in range(T):
            _, ref_t = run_reference(*(y[:, : t + 1] for y in x), scale, before[used], None, l2norm, layout)
            assert rel_err(states[rows, t], ref_t) <= STATE_TOL


def test_decode_gate_extremes():
    """g = 0 keeps the whole state; g = -30 forgets it within one token."""
    B, T, H, HV, K, V = 2, 2, 1, 2, 16, 16
    q, k, v, _, beta = make_inputs(B, T, H, HV, K, V, torch.float32, "scalar", "zero", False, 0)
    pool = random_state(B, HV, K, V, "kv", torch.Generator().manual_seed(0))
    for value in (0.0, -30.0):
        g = torch.full((B, T, HV), value, device=DEVICE)
        ref_o, ref_state = run_reference(q, k, v, g, beta, 0.25, pool, None, False, "kv")
        p = pool.clone()
        o, _ = triton_recurrent.gated_delta_rule_decode(
            q, k, v, g, beta, p, torch.arange(B, device=DEVICE), 0.25, False, "kv", False
        )
        assert rel_err(o, ref_o) <= O_TOL[torch.float32]
        assert rel_err(p, ref_state) <= STATE_TOL


def test_decode_writes_every_element(poisoned):
    B, T, H, HV, K, V = 3, 2, 1, 2, 16, 48
    q, k, v, g, beta = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "channel", "wide", True, 3)
    pool = random_state(4, HV, K, V, "vk", torch.Generator().manual_seed(3))
    idx = torch.tensor([2, -1, 0], device=DEVICE)
    o, states = triton_recurrent.gated_delta_rule_decode(q, k, v, g, beta, pool, idx, 0.3, True, "vk", True)
    assert not o.isnan().any() and not states.isnan().any() and not pool.isnan().any()


# ----------------------------------------------------------------------------- prefill


@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=3), varlen=st.booleans(),
    H=st.integers(1, 2), group=st.sampled_from(GROUPS), K=st.sampled_from(HEAD_DIMS),
    V=st.sampled_from(HEAD_DIMS), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
    gate=st.sampled_from(GATES), gate_kind=st.sampled_from(GATE_KINDS), l2norm=st.booleans(),
    with_state=st.booleans(), state_dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
@example(  # packed: lengths 1 and 0, GVA 4, two V tiles, bfloat16 initial state
    lengths=[1, 0, 9], varlen=True, H=1, group=4, K=48, V=64, dtype=torch.bfloat16, layout="vk",
    gate="channel", gate_kind="wide", l2norm=True, with_state=True, state_dtype=torch.bfloat16,
    seed=3,
)
@example(
    lengths=[5, 1], varlen=False, H=2, group=1, K=32, V=16, dtype=torch.float32, layout="kv",
    gate="scalar", gate_kind="mild", l2norm=False, with_state=True, state_dtype=torch.float32,
    seed=4,
)
def test_recurrent_matches_reference(
    lengths, varlen, H, group, K, V, dtype, layout, gate, gate_kind, l2norm, with_state,
    state_dtype, seed,
):
    """Padded batch (B = len(lengths), T = max) or packed batch (cu_seqlens, lengths 0 and 1)."""
    HV = H * group
    if HV > 4:
        HV, H = 4, 4 // group
    N = len(lengths)
    if varlen:
        B, T = 1, sum(lengths)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    else:
        B, T, cu_seqlens = N, max(lengths), None
    q, k, v, g, beta = make_inputs(B, T, H, HV, K, V, dtype, gate, gate_kind, l2norm, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = random_state(N, HV, K, V, layout, gen).to(state_dtype) if with_state else None
    scale = 0.7

    o, final = triton_recurrent.recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, h0, cu_seqlens, l2norm, layout
    )

    ref_o, ref_final = run_reference(q, k, v, g, beta, scale, h0, cu_seqlens, l2norm, layout)
    assert o.shape == v.shape and o.dtype == v.dtype and o.is_contiguous()
    assert final.shape == ref_final.shape and final.dtype == torch.float32
    if T > 0:
        assert rel_err(o, ref_o) <= O_TOL[dtype]
    assert rel_err(final, ref_final) <= STATE_TOL


def test_recurrent_writes_every_element(poisoned):
    cu_seqlens = torch.tensor([0, 1, 1, 5], device=DEVICE)
    q, k, v, g, beta = make_inputs(1, 5, 1, 2, 16, 48, torch.float16, "scalar", "wide", True, 5)
    o, final = triton_recurrent.recurrent_gated_delta_rule(q, k, v, g, beta, 0.25, None, cu_seqlens, True, "kv")
    assert not o.isnan().any() and not final.isnan().any()


@pytest.mark.parametrize("launcher", ["decode", "recurrent"])
def test_float64_is_rejected(launcher):
    q, k, v, g, beta = make_inputs(1, 1, 1, 1, 16, 16, torch.float64, "scalar", "mild", False, 0)
    with pytest.raises(TypeError, match="float64"):
        if launcher == "decode":
            pool = torch.zeros(1, 1, 16, 16, device=DEVICE)
            triton_recurrent.gated_delta_rule_decode(
                q, k, v, g, beta, pool, torch.zeros(1, dtype=torch.long, device=DEVICE), 0.25, False, "kv", False
            )
        else:
            triton_recurrent.recurrent_gated_delta_rule(q, k, v, g, beta, 0.25, None, None, False, "kv")


# ----------------------------------------------------------------------------- public ops


@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_ops_use_triton(monkeypatch, layout):
    """The public ops with GRAPHDELTA_BACKEND=triton agree with the torch backend."""
    B, T, H, HV, K, V = 2, 3, 1, 2, 32, 32
    q, k, v, g, beta = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "channel", "mild", True, 7)
    pool = random_state(3, HV, K, V, layout, torch.Generator().manual_seed(7))
    idx = torch.tensor([2, -1], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("GRAPHDELTA_BACKEND", backend)
        p = pool.clone()
        o, states = ops.gated_delta_rule_decode(
            q, k, v, g, beta, p, idx, use_qk_l2norm_in_kernel=True, state_layout=layout,
            output_intermediate_states=True,
        )
        o2, final = ops.recurrent_gated_delta_rule(
            q, k, v, g[..., 0], beta, initial_state=pool[:B], output_final_state=True,
            use_qk_l2norm_in_kernel=True, state_layout=layout,
        )
        results[backend] = (o, states, p, o2, final)
    for name, a, b in zip(("o", "states", "pool", "o2", "final"), results["triton"], results["torch"]):
        tol = O_TOL[torch.bfloat16] if a.dtype == torch.bfloat16 else STATE_TOL
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= tol, name


# ----------------------------------------------------------------------------- CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 4])
def test_decode_real_size(layout, gate, T):
    B, H, HV, K, V = 64, 16, 32, 128, 128
    q, k, v, g, beta = make_inputs(B, T, H, HV, K, V, torch.bfloat16, gate, "wide", True, 11)
    pool = random_state(96, HV, K, V, layout, torch.Generator().manual_seed(11))
    slots = torch.randperm(96)[:B]
    slots[::7] = -1
    idx = slots.to(DEVICE)
    before = pool.clone()
    o, states = triton_recurrent.gated_delta_rule_decode(q, k, v, g, beta, pool, idx, K**-0.5, True, layout, True)
    rows = (slots >= 0).nonzero().squeeze(1).tolist()
    used = slots[rows].tolist()
    ref_o, ref_state = run_reference(*(x[rows] for x in (q, k, v, g, beta)), K**-0.5, before[used], None, True, layout)
    assert rel_err(o[rows], ref_o) <= O_TOL[torch.bfloat16]
    assert rel_err(pool[used], ref_state) <= STATE_TOL
    assert torch.equal(states[rows, -1], pool[used])
    untouched = [s for s in range(96) if s not in used]
    assert torch.equal(pool[untouched], before[untouched])
    assert not o[(slots < 0).nonzero().squeeze(1)].any()


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_cuda_graph(layout):
    """Warm up, capture, copy fresh inputs into the static buffers, replay, compare with eager."""
    B, T, H, HV, K, V = 64, 1, 16, 32, 128, 128
    n_slots = 80
    pool = random_state(n_slots, HV, K, V, layout, torch.Generator().manual_seed(0))
    static = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "scalar", "mild", True, 0)
    static_idx = torch.arange(B, device=DEVICE)

    def step():
        return triton_recurrent.gated_delta_rule_decode(
            *static, pool, static_idx, K**-0.5, True, layout, False
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_o, _ = step()

    fresh = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "scalar", "mild", True, 1)
    slots = torch.randperm(n_slots)[:B]
    slots[1::5] = -1
    for buf, new in zip(static, fresh):
        buf.copy_(new)
    static_idx.copy_(slots.to(DEVICE))
    eager_pool = pool.clone()
    eager_o, _ = triton_recurrent.gated_delta_rule_decode(
        *fresh, eager_pool, slots.to(DEVICE), K**-0.5, True, layout, False
    )
    before = pool.clone()
    graph.replay()
    torch.cuda.synchronize()

    assert_replay_matches_eager(static_o, eager_o, pool, eager_pool, before, slots, n_slots)


@cuda_only
@pytest.mark.parametrize("gate", GATES)
def test_recurrent_real_size_varlen(gate):
    lengths = [1, 37, 200, 5]
    HV, H, K, V = 32, 16, 128, 128
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    q, k, v, g, beta = make_inputs(1, sum(lengths), H, HV, K, V, torch.bfloat16, gate, "mild", True, 2)
    h0 = random_state(len(lengths), HV, K, V, "vk", torch.Generator().manual_seed(2))
    o, final = triton_recurrent.recurrent_gated_delta_rule(q, k, v, g, beta, K**-0.5, h0, cu_seqlens, True, "vk")
    ref_o, ref_final = run_reference(q, k, v, g, beta, K**-0.5, h0, cu_seqlens, True, "vk")
    assert rel_err(o, ref_o) <= O_TOL[torch.bfloat16]
    assert rel_err(final, ref_final) <= STATE_TOL
