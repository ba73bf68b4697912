"""The Triton causal conv1d (prefill, and the in-place update of a pool of conv states) against
``graphdelta.reference`` in float64.

Without CUDA the kernels run under the Triton interpreter: shapes stay small (T <= 70, D <= 100,
so at most a few dozen programs per launch). The CUDA tests run at real sizes and capture the
update in a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, strategies as st

import graphdelta.ops as ops
from graphdelta import reference
from graphdelta.lowering import triton_conv

from pool_checks import assert_replay_matches_eager

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [1, 2, 3, 4]
ACTIVATIONS = ["silu", None]

# Relative norm error against float64, per dtype of x (the output's dtype). Measured maxima over
# 300 random prefill and update examples (interpreter): fp32 7.9e-8, bf16 4.7e-3, fp16 2.9e-4;
# tolerances 3-10x above. State entries are copies of inputs: exact, unless
# the state's dtype is narrower than x's; then they are one rounding away (CAST_TOL), and the
# interpreter rounds float32 -> bfloat16 by truncation where torch rounds to nearest even.
Y_TOL = {torch.float32: 1e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
CAST_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3}

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def make_x(B, T, D, dtype, strided, gen) -> torch.Tensor:
    """``[B, T, D]``; with ``strided``, a channel slice of a wider tensor (like a fused projection)."""
    wide = torch.randn(B, T, D + 8 * strided, generator=gen).to(device=DEVICE, dtype=dtype)
    return wide[..., :D]


def make_conv(D, W, dtype, with_bias, gen):
    weight = torch.randn(D, W, generator=gen).to(device=DEVICE, dtype=dtype)
    bias = torch.randn(D, generator=gen).to(device=DEVICE, dtype=dtype) if with_bias else None
    return weight, bias


def assert_state_copied(actual: torch.Tensor, expected: torch.Tensor, x_dtype: torch.dtype) -> None:
    """A conv state holds inputs, converted to its own dtype."""
    if actual.dtype in (torch.float32, x_dtype):
        assert torch.equal(actual.double(), expected.to(actual.dtype).double()), "state is a copy"
    else:
        assert rel_err(actual, expected) <= CAST_TOL[actual.dtype]


def run_reference(x, weight, bias, h0, cu_seqlens, activation):
    return reference.causal_conv1d(
        x.double(), weight.double(), None if bias is None else bias.double(),
        None if h0 is None else h0.double(), cu_seqlens, activation,
    )


# ----------------------------------------------------------------------------- prefill


@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4), varlen=st.booleans(),
    D=st.integers(1, 100), W=st.sampled_from(WIDTHS), extra=st.integers(0, 3),
    with_state=st.booleans(), with_bias=st.booleans(), activation=st.sampled_from(ACTIVATIONS),
    dtype=st.sampled_from(DTYPES), state_dtype=st.sampled_from(DTYPES), strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(  # 3 token tiles x 2 channel tiles, strided x, bfloat16 state
    lengths=[70], varlen=False, D=100, W=4, extra=0, with_state=True, with_bias=True,
    activation="silu", dtype=torch.bfloat16, state_dtype=torch.bfloat16, strided=True, seed=1,
)
@example(  # packed, lengths 1 and 0, a token tile spanning three sequences, longer state
    lengths=[1, 0, 40, 29], varlen=True, D=65, W=4, extra=2, with_state=True, with_bias=False,
    activation=None, dtype=torch.float16, state_dtype=torch.float32, strided=False, seed=2,
)
@example(  # sequences shorter than the window, no initial state
    lengths=[2, 1, 5], varlen=True, D=7, W=4, extra=0, with_state=False, with_bias=True,
    activation="silu", dtype=torch.float32, state_dtype=torch.float32, strided=False, seed=3,
)
def test_conv_matches_reference(
    lengths, varlen, D, W, extra, with_state, with_bias, activation, dtype, state_dtype, strided,
    seed,
):
    """Padded batch (B = len(lengths), T = max) or packed batch (cu_seqlens, lengths 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    N = len(lengths)
    if varlen:
        B, T = 1, sum(lengths)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    else:
        B, T, cu_seqlens = N, max(lengths), None
    if B * T > 140:  # interpreter budget: at most ~10 programs of 32 tokens
        T = 140 // B
        if varlen:
            lengths = [min(n, 140 // N) for n in lengths]
            T = sum(lengths)
            cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    x = make_x(B, T, D, dtype, strided, gen)
    weight, bias = make_conv(D, W, dtype, with_bias, gen)
    S = W - 1 + extra if with_state else W - 1
    h0 = torch.randn(N, D, S, generator=gen).to(device=DEVICE, dtype=state_dtype) if with_state else None

    y, final = triton_conv.causal_conv1d(x, weight, bias, h0, cu_seqlens, activation)

    ref_y, ref_final = run_reference(x, weight, bias, h0, cu_seqlens, activation)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert final.shape == (N, D, S) and final.dtype == (state_dtype if with_state else torch.float32)
    if y.numel():
        assert rel_err(y, ref_y) <= Y_TOL[dtype]
    assert_state_copied(final, ref_final, dtype)


def test_conv_writes_every_element(poisoned):
    gen = torch.Generator().manual_seed(0)
    x = make_x(1, 40, 70, torch.bfloat16, True, gen)
    weight, bias = make_conv(70, 4, torch.bfloat16, True, gen)
    cu_seqlens = torch.tensor([0, 1, 1, 3, 40], device=DEVICE)
    y, final = triton_conv.causal_conv1d(x, weight, bias, None, cu_seqlens, "silu")
    assert not y.isnan().any() and not final.isnan().any()


# ----------------------------------------------------------------------------- update


@given(
    B=st.integers(1, 4), T=st.integers(1, 4), D=st.integers(1, 100), W=st.sampled_from(WIDTHS),
    extra=st.integers(0, 3), extra_slots=st.integers(0, 3),
    pad=st.lists(st.booleans(), min_size=4, max_size=4), use_indices=st.booleans(),
    index_dtype=st.sampled_from([torch.int32, torch.int64]), with_bias=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS), dtype=st.sampled_from(DTYPES),
    state_dtype=st.sampled_from(DTYPES), channels_last=st.booleans(), strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(
    B=4, T=3, D=100, W=4, extra=2, extra_slots=3, pad=[False, True, False, True], use_indices=True,
    index_dtype=torch.int32, with_bias=True, activation="silu", dtype=torch.bfloat16,
    state_dtype=torch.float32, channels_last=True, strided=True, seed=1,
)
def test_conv_update_matches_reference(
    B, T, D, W, extra, extra_slots, pad, use_indices, index_dtype, with_bias, activation, dtype,
    state_dtype, channels_last, strided, seed,
):
    """In-place update of a pool; ``channels_last`` pools are ``[S_pool, S, D]`` buffers viewed
    as ``[S_pool, D, S]`` (the kernel takes any strides)."""
    gen = torch.Generator().manual_seed(seed)
    S, n_slots = W - 1 + extra, B + extra_slots
    pool = torch.randn(n_slots, S, D, generator=gen) if channels_last else torch.randn(n_slots, D, S, generator=gen)
    pool = pool.to(device=DEVICE, dtype=state_dtype)
    if channels_last:
        pool = pool.transpose(1, 2)
    if use_indices:
        slots = torch.randperm(n_slots, generator=gen)[:B]
        slots[torch.tensor(pad[:B])] = -1
        state_indices = slots.to(device=DEVICE, dtype=index_dtype)
    else:
        slots, state_indices = torch.arange(B), None
    x = make_x(B, T, D, dtype, strided, gen)
    weight, bias = make_conv(D, W, dtype, with_bias, gen)
    before = pool.clone()

    y = triton_conv.causal_conv1d_update(x, pool, weight, bias, state_indices, activation)

    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    rows = [b for b in range(B) if slots[b] >= 0]
    used = slots[rows].tolist()
    untouched = [s for s in range(n_slots) if s not in used]
    assert torch.equal(pool[untouched], before[untouched]), "a slot no row owns was written"
    assert not y[[b for b in range(B) if slots[b] < 0]].any(), "padded rows must output zeros"
    if not rows:
        return
    ref_y, ref_state = run_reference(x[rows], weight, bias, before[used], None, activation)
    assert rel_err(y[rows], ref_y) <= Y_TOL[dtype]
    assert_state_copied(pool[used], ref_state, dtype)


def test_conv_update_writes_every_element(poisoned):
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(4, 70, 3, generator=gen).to(DEVICE)
    x = make_x(3, 2, 70, torch.float16, False, gen)
    weight, bias = make_conv(70, 4, torch.float16, False, gen)
    y = triton_conv.causal_conv1d_update(x, pool, weight, bias, torch.tensor([3, -1, 0], device=DEVICE), "silu")
    assert not y.isnan().any()


@pytest.mark.parametrize("launcher", ["prefill", "update"])
def test_float64_is_rejected(launcher):
    x = torch.randn(1, 2, 8, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(8, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        if launcher == "prefill":
            triton_conv.causal_conv1d(x, weight, None, None, None, "silu")
        else:
            triton_conv.causal_conv1d_update(x, torch.zeros(1, 8, 3, device=DEVICE), weight, None, None, "silu")


# ----------------------------------------------------------------------------- public ops


def test_public_ops_use_triton(monkeypatch):
    """The public ops with GRAPHDELTA_BACKEND=triton agree with the torch backend."""
    gen = torch.Generator().manual_seed(3)
    D, W = 40, 4
    x = make_x(1, 21, D, torch.bfloat16, True, gen)
    weight, bias = make_conv(D, W, torch.bfloat16, True, gen)
    cu_seqlens = torch.tensor([0, 1, 9, 21], device=DEVICE)
    h0 = torch.randn(3, D, W + 1, generator=gen).to(DEVICE)
    pool = torch.randn(4, D, W - 1, generator=gen).to(DEVICE, torch.bfloat16)
    xu = make_x(3, 1, D, torch.bfloat16, False, gen)[:, 0]  # [B, D]: one token per row
    idx = torch.tensor([3, -1, 0], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("GRAPHDELTA_BACKEND", backend)
        y, final = ops.causal_conv1d(x, weight, bias, h0, True, cu_seqlens, "silu")
        p = pool.clone()
        yu = ops.causal_conv1d_update(xu, p, weight, bias, idx, "silu")
        results[backend] = (y, final, yu, p)
    for name, a, b in zip(("y", "final", "y_update", "pool"), results["triton"], results["torch"]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= Y_TOL[torch.bfloat16], name


# ----------------------------------------------------------------------------- CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("varlen", [False, True])
def test_conv_real_size(varlen):
    gen = torch.Generator().manual_seed(0)
    D, W = 8192, 4
    lengths = [1, 300, 2048, 77]
    x = make_x(1 if varlen else 4, sum(lengths) if varlen else 2048, D, torch.bfloat16, True, gen)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE) if varlen else None
    weight, bias = make_conv(D, W, torch.bfloat16, True, gen)
    h0 = torch.randn(4, D, W - 1, generator=gen).to(DEVICE, torch.bfloat16)
    y, final = triton_conv.causal_conv1d(x, weight, bias, h0, cu_seqlens, "silu")
    ref_y, ref_final = run_reference(x, weight, bias, h0, cu_seqlens, "silu")
    assert rel_err(y, ref_y) <= Y_TOL[torch.bfloat16]
    assert torch.equal(final.double(), ref_final)


@cuda_only
def test_conv_update_cuda_graph():
    """Warm up, capture, copy fresh inputs into the static buffers, replay, compare with eager."""
    gen = torch.Generator().manual_seed(0)
    B, D, W, n_slots = 64, 8192, 4, 80
    pool = torch.randn(n_slots, D, W - 1, generator=gen).to(DEVICE, torch.bfloat16)
    weight, bias = make_conv(D, W, torch.bfloat16, True, gen)
    static_x = make_x(B, 1, D, torch.bfloat16, False, gen)
    static_idx = torch.arange(B, device=DEVICE)

    def step():
        return triton_conv.causal_conv1d_update(static_x, pool, weight, bias, static_idx, "silu")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()

    fresh_x = make_x(B, 1, D, torch.bfloat16, False, gen)
    slots = torch.randperm(n_slots, generator=gen)[:B]
    slots[1::5] = -1
    static_x.copy_(fresh_x)
    static_idx.copy_(slots.to(DEVICE))
    eager_pool = pool.clone()
    eager_y = triton_conv.causal_conv1d_update(fresh_x, eager_pool, weight, bias, slots.to(DEVICE), "silu")
    before = pool.clone()
    graph.replay()
    torch.cuda.synchronize()

    assert_replay_matches_eager(static_y, eager_y, pool, eager_pool, before, slots, n_slots)
