"""The gated RMSNorm op (``graphdelta::gated_rms_norm``), PyTorch and Triton implementations,
against ``graphdelta.reference.gated_rms_norm`` in float64.

Without CUDA the Triton kernel runs under the interpreter: at most a few hundred rows, so a
launch stays under ~20 programs.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, strategies as st

import graphdelta
from graphdelta import reference
from graphdelta.lowering import torch_norm, triton_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLEMENTATIONS = {"torch": torch_norm.gated_rms_norm, "triton": triton_norm.gated_rms_norm}

# Relative norm error against the float64 reference rounded to the output dtype, per dtype.
# Measured maxima over 600 random examples (both implementations, the shapes and gates of the
# test below): fp32 1.6e-7, bf16 6.4e-3 (the interpreter rounds to bfloat16 by truncation),
# fp16 1.7e-5. Tolerances are 3-30x above.
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-4}

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Against ``expected`` rounded to ``actual``'s dtype: an output below the dtype's normal
    range (a tiny x with a large eps, in fp16) is compared in absolute terms."""
    floor = torch.finfo(actual.dtype).tiny * actual.numel() ** 0.5
    actual, expected = actual.double(), expected.to(actual.dtype).double()
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


@given(
    impl=st.sampled_from(sorted(IMPLEMENTATIONS)), lead=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    D=st.sampled_from([1, 2, 7, 32, 63, 65, 128, 200]), dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(["silu", "sigmoid", "swish"]), norm_before_gate=st.booleans(),
    gate_scale=st.sampled_from([0.0, 1.0, 30.0]), eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    strided=st.booleans(), seed=st.integers(0, 2**16),
)
@example(impl="triton", lead=[3, 5, 4], D=65, dtype=torch.bfloat16, activation="silu", norm_before_gate=True,
         gate_scale=30.0, eps=1e-6, strided=True, seed=1)
@example(impl="triton", lead=[], D=128, dtype=torch.float32, activation="sigmoid", norm_before_gate=False,
         gate_scale=1.0, eps=1e-5, strided=False, seed=2)
def test_gated_rms_norm_matches_reference(impl, lead, D, dtype, activation, norm_before_gate, gate_scale, eps,
                                          strided, seed):
    """Any leading shape (none: a single row), odd D, saturated and zero gates, a slice of a
    wider tensor as input."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, D)
    wide = torch.randn(*lead, D + 5 * strided, generator=gen)
    x = wide[..., :D].to(device=DEVICE, dtype=dtype)
    gate = (torch.randn(shape, generator=gen) * gate_scale).to(device=DEVICE, dtype=dtype)
    weight = (torch.rand(D, generator=gen) + 0.5).to(device=DEVICE, dtype=dtype)

    y = IMPLEMENTATIONS[impl](x, gate, weight, eps, activation, norm_before_gate)

    ref = reference.gated_rms_norm(x.double(), gate.double(), weight.double(), eps, activation, norm_before_gate)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_op_dispatches_and_keeps_batch_one(monkeypatch, backend):
    monkeypatch.setenv("GRAPHDELTA_BACKEND", backend)
    x, gate = torch.randn(1, 3, 2, 16, device=DEVICE), torch.randn(1, 3, 2, 16, device=DEVICE)
    weight = torch.rand(16, device=DEVICE)
    y = graphdelta.gated_rms_norm(x, gate, weight, 1e-6, "sigmoid")
    assert y.shape == (1, 3, 2, 16)
    ref = reference.gated_rms_norm(x.double(), gate.double(), weight.double(), 1e-6, "sigmoid")
    assert rel_err(y, ref) <= TOL[torch.float32]


def test_gated_rms_norm_op_passes_opcheck():
    x, gate, weight = torch.randn(4, 8), torch.randn(4, 8), torch.rand(8)
    torch.library.opcheck(torch.ops.graphdelta.gated_rms_norm.default, (x, gate, weight, 1e-6, "silu", True))


@pytest.mark.parametrize("bad, message", [
    (dict(gate=torch.randn(4, 9)), "gate must have x's shape"),
    (dict(weight=torch.rand(9)), "weight must be"),
    (dict(eps=-1e-6), "eps must be a non-negative"),
    (dict(eps=float("nan")), "eps must be a non-negative"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(x=torch.randn(4, 8).long()), "x has dtype"),
])
def test_bad_input_names_the_argument(bad, message):
    args = dict(x=torch.randn(4, 8), gate=torch.randn(4, 8), weight=torch.rand(8), eps=1e-6, activation="silu")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        graphdelta.gated_rms_norm(**args)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gated_rms_norm_real_size():
    """Qwen3-Next's output norm at 4096 tokens: 32 value heads of 128, bf16."""
    x = torch.randn(4096 * 32, 128, device="cuda", dtype=torch.bfloat16)
    gate, weight = torch.randn_like(x), torch.rand(128, device="cuda", dtype=torch.bfloat16)
    y = triton_norm.gated_rms_norm(x, gate, weight, 1e-6, "silu", True)
    ref = reference.gated_rms_norm(x.double(), gate.double(), weight.double(), 1e-6, "silu", True)
    assert rel_err(y, ref) <= TOL[torch.bfloat16]
