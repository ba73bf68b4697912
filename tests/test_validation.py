"""Every malformed input raises ValueError or TypeError naming the argument and its values."""
import pytest
import torch

import graphdelta as gd
from graphdelta.testing import ProblemSpec

P = ProblemSpec(B=2, T=5, H=2, group=2, K=16, V=8, initial_state=True).build()
BASE = P.kwargs()
VARLEN = ProblemSpec(B=1, T=5, H=1, K=16, V=8, seqlens=(2, 3)).build().kwargs()

CASES = [  # (changes to BASE, error type, message fragment)
    (dict(v=torch.randn(2, 5, 3, 8)), ValueError, "HV=3 must be a positive multiple of key heads H=2"),
    (dict(k=torch.randn(2, 5, 2, 8)), ValueError, "k must have the shape of q"),
    (dict(v=torch.randn(2, 4, 4, 8)), ValueError, "v must start with [B, T]"),
    (dict(g=torch.randn(2, 5, 2)), ValueError, "g must be [B, T, HV]"),
    (dict(g=torch.randn(2, 5, 4, 8)), ValueError, "g must be [B, T, HV]"),
    (dict(beta=torch.rand(2, 5, 4, 1)), ValueError, "beta must be [B, T, HV]"),
    (dict(initial_state=torch.zeros(2, 4, 8, 16)), ValueError, "initial_state must be [2, 4, 16, 8]"),
    (dict(initial_state=torch.zeros(2, 4, 16, 8), state_layout="vk"), ValueError,
     "initial_state must be [2, 4, 8, 16] for state_layout='vk'"),
    (dict(initial_state=torch.zeros(3, 4, 16, 8)), ValueError, "N=2"),
    (dict(state_layout="kvv"), ValueError, "state_layout must be one of"),
    (dict(q=torch.randn(2, 5, 2, 300), k=torch.randn(2, 5, 2, 300), g=torch.zeros(2, 5, 4)),
     ValueError, "K=300 must be in [1, 256]"),
    (dict(v=torch.randn(2, 5, 4, 257)), ValueError, "V=257"),
    (dict(q=torch.randn(2, 5, 2, 16, dtype=torch.float64).to(torch.int32)), TypeError, "q has dtype torch.int32"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(scale="0.5"), TypeError, "scale must be a float"),
    (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), initial_state=None), ValueError,
     "packed batch of size 1, got batch size 2"),
]
VARLEN_CASES = [
    (dict(cu_seqlens=torch.tensor([1, 5], dtype=torch.int32)), "must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 3, 3, 5], dtype=torch.int32)), "strictly increasing"),
    (dict(cu_seqlens=torch.tensor([0, 4, 2, 5], dtype=torch.int32)), "strictly increasing"),
    (dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), "must end at T=5, got last value 4"),
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), "cu_seqlens has dtype torch.float32"),
]


@pytest.mark.parametrize("op", [gd.chunk_gated_delta_rule, gd.recurrent_gated_delta_rule])
@pytest.mark.parametrize("changes,error,message", CASES)
def test_bad_input_raises(op, changes, error, message):
    with pytest.raises(error, match=_escape(message)):
        op(**{**BASE, **changes})


@pytest.mark.parametrize("changes,message", VARLEN_CASES)
def test_bad_cu_seqlens_raises(changes, message):
    with pytest.raises((ValueError, TypeError), match=_escape(message)):
        gd.chunk_gated_delta_rule(**{**VARLEN, **changes})


def test_bad_decode_inputs_raise():
    kw = {n: BASE[n] for n in ("q", "k", "v", "g", "beta")}
    pool = torch.zeros(3, 4, 16, 8)
    with pytest.raises(ValueError, match=_escape("state_pool must be [3, 4, 8, 16] for state_layout='vk'")):
        gd.gated_delta_rule_decode(**kw, state_pool=pool, state_indices=torch.tensor([0, 1]), state_layout="vk")
    with pytest.raises(TypeError, match="state_pool has dtype torch.bfloat16"):
        gd.gated_delta_rule_decode(**kw, state_pool=pool.bfloat16(), state_indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=_escape("state_indices must be [B] = [2]")):
        gd.gated_delta_rule_decode(**kw, state_pool=pool, state_indices=torch.tensor([0]))


def _decode(indices, pool_size=3):
    kw = {n: BASE[n] for n in ("q", "k", "v", "g", "beta")}
    gd.gated_delta_rule_decode(**kw, state_pool=torch.zeros(pool_size, 4, 16, 8), state_indices=indices)


def _conv_update(indices, pool_size=3):
    gd.causal_conv1d_update(torch.randn(2, 6), torch.zeros(pool_size, 6, 3), torch.randn(6, 4), state_indices=indices)


@pytest.mark.parametrize("op", [_decode, _conv_update])
@pytest.mark.parametrize("indices,error,message", [
    (torch.tensor([0, 3]), ValueError, "state_indices[1] = 3 is not a slot of the pool of 3 (valid: 0 .. 2, or -1 "
     "for a padded row)"),  # one past the pool: the Triton conv update wrote there
    (torch.tensor([-2, 1]), ValueError, "state_indices[0] = -2 is not a slot"),  # -1 is the only padding
    (torch.tensor([1, 1]), ValueError, "state_indices holds slot 1 twice ([1, 1])"),  # each backend differed
    (torch.tensor([0, 1], device="meta"), ValueError, "state_indices is on meta, the pool and the tokens on cpu"),
    (torch.tensor([0.0, 1.0]), TypeError, "state_indices has dtype torch.float32"),
    (torch.tensor([[0, 1]]), ValueError, "state_indices must have 1 dimensions"),
])
def test_slot_indices_have_one_validation(op, indices, error, message):
    """The decode and conv-update ops share one check of their slot indices: range, padding,
    duplicates, dtype, device (an index tensor on meta sent the conv update to its fake, which
    left the pool untouched and returned uninitialized memory)."""
    with pytest.raises(error, match=_escape(message)):
        op(indices)


def test_padding_may_repeat():
    _decode(torch.tensor([-1, -1]))
    _conv_update(torch.tensor([-1, 2]))


def test_bad_conv_inputs_raise():
    x, w = torch.randn(2, 7, 6), torch.randn(6, 4)
    with pytest.raises(ValueError, match="x has 5 channels"):
        gd.causal_conv1d(torch.randn(2, 7, 5), w)
    with pytest.raises(ValueError, match=_escape("bias must be [D] = [6]")):
        gd.causal_conv1d(x, w, torch.randn(5))
    with pytest.raises(ValueError, match=_escape("initial_state must be [N, D=6, S >= W-1=3]")):
        gd.causal_conv1d(x, w, None, torch.randn(2, 6, 2))
    with pytest.raises(ValueError, match="activation must be"):
        gd.causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="initial_state must hold N=2 states"):
        gd.causal_conv1d(x, w, None, torch.randn(3, 6, 3))
    with pytest.raises(ValueError, match=_escape("conv_state must be [N, D=6, S >= W-1=3]")):
        gd.causal_conv1d_update(x[:, 0], torch.randn(2, 6, 1), w)
    with pytest.raises(ValueError, match="conv_state holds 1 states for a batch of 2"):
        gd.causal_conv1d_update(x[:, 0], torch.randn(1, 6, 3), w)


@pytest.mark.parametrize("call,message", [
    (lambda: gd.chunk_gated_delta_rule(**{**VARLEN, "cu_seqlens": torch.tensor([0, 2, 5], device="meta")}),
     "cu_seqlens is on meta, the tokens on cpu"),
    (lambda: gd.causal_conv1d(torch.randn(1, 5, 6), torch.randn(6, 4), cu_seqlens=torch.tensor([0, 2, 5], device="meta")),
     "cu_seqlens is on meta, the tokens on cpu"),
    (lambda: gd.gated_rms_norm(torch.tensor(1.0), torch.tensor(1.0), torch.ones(1)),
     "x must be [..., D] with at least one dimension, got a 0-dim tensor (1.0)"),
])
def test_misplaced_or_shapeless_inputs_raise(call, message):
    with pytest.raises(ValueError, match=_escape(message)):
        call()


def test_triton_backend_without_a_gpu_or_the_interpreter_raises(monkeypatch):
    from graphdelta import lowering

    monkeypatch.setenv("GRAPHDELTA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=_escape("GRAPHDELTA_BACKEND=triton needs CUDA tensors, got tensors on cpu: "
                                                 "set TRITON_INTERPRET=1")):
        lowering.backend_for(torch.zeros(1))
    if not torch.cuda.is_available():  # the public op says the same before any kernel runs
        with pytest.raises(ValueError, match="GRAPHDELTA_BACKEND=triton needs CUDA tensors"):
            gd.chunk_gated_delta_rule(**BASE)


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="GRAPHDELTA_BACKEND must be one of"):
        gd.chunk_gated_delta_rule(**BASE)


@pytest.mark.parametrize("model,kwargs,error,message", [
    ("model", {}, TypeError, "model must be a torch.nn.Module, got str: 'model'"),
    (None, dict(state_layout="kvv"), ValueError, "state_layout must be 'auto', 'kv' or 'vk', got 'kvv'"),
    (None, dict(backend="cudagraphs"), ValueError, "backend must be one of ('inductor', 'aot_eager', 'eager'), "
     "got 'cudagraphs'"),
    (None, dict(dynamic="yes"), ValueError, "dynamic must be True, False or None, got 'yes'"),
    (None, dict(mode="fast"), ValueError, "mode must be one of"),
    (None, dict(backend="eager", mode="reduce-overhead"), ValueError,
     "mode='reduce-overhead' configures inductor; backend='eager' takes no mode"),
])
def test_bad_compile_arguments_raise(model, kwargs, error, message):
    """Checked before the passes run the model (a module that is never called suffices)."""
    with pytest.raises(error, match=_escape(message)):
        gd.compile(torch.nn.Identity() if model is None else model, **kwargs)


def test_compile_mode_reaches_inductor():
    """torch.compile hands a custom backend its mode as a keyword argument: graphdelta's backend
    takes it and gives inductor the same config patches (it used to fail with a TypeError)."""
    from graphdelta.compiler import inner_backend
    from graphdelta.report import GraphLog

    torch._dynamo.reset()
    log = GraphLog(inner_backend("inductor"))
    fn = torch.compile(lambda x: x * 2 + 1, backend=log, mode="reduce-overhead")
    x = torch.randn(4)
    assert torch.equal(fn(x), x * 2 + 1) and len(log.graphs) == 1


def _escape(s: str) -> str:
    import re

    return re.escape(s)
