"""The ops over their whole input domain, on the PyTorch path and the Triton kernels
(interpreter on CPU): a packed sequence's non-finite values stay in that sequence, full-reset
gates (g = -inf, -1e38) are finite and equal the recurrent op and the reference, and empty
batches (B = 0 or T = 0) give the empty answer with states unchanged."""
import pytest
import torch

import graphdelta as gd
from graphdelta.reference import gated_delta_rule as reference
from graphdelta.testing import TOLERANCES, relative_error

BACKENDS = ["torch", "triton"]
FP32 = TOLERANCES[torch.float32]
POISON = [float("nan"), float("inf")]  # the conv's


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch) -> str:
    """The device of a backend's inputs: the Triton kernels run on a GPU, else interpreted on CPU."""
    monkeypatch.setenv("GRAPHDELTA_BACKEND", request.param)
    return "cuda" if request.param == "triton" and torch.cuda.is_available() else "cpu"


def on(device: str, kw: dict) -> dict:
    return {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


def inputs(lengths: list[int], per_channel: bool = False, H: int = 1, HV: int = 2, K: int = 16, V: int = 16,
           seed: int = 0) -> dict:
    """Packed float32 inputs (CPU) of sequences of ``lengths`` tokens, with an initial state each."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    gshape = (1, T, HV, K) if per_channel else (1, T, HV)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        q=torch.randn(1, T, H, K, generator=gen), k=torch.randn(1, T, H, K, generator=gen),
        v=torch.randn(1, T, HV, V, generator=gen), g=-torch.rand(gshape, generator=gen),
        beta=torch.rand(1, T, HV, generator=gen), initial_state=torch.randn(len(lengths), HV, K, V, generator=gen),
        cu_seqlens=cu, use_qk_l2norm_in_kernel=True, output_final_state=True,
    )


def sequence(kw: dict, n: int) -> dict:
    """The inputs of packed sequence ``n`` alone."""
    a, b = kw["cu_seqlens"][n].item(), kw["cu_seqlens"][n + 1].item()
    out = {name: kw[name][:, a:b] for name in ("q", "k", "v", "g", "beta")}
    return {**kw, **out, "initial_state": kw["initial_state"][n : n + 1], "cu_seqlens": None}


# ----------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("op", [gd.chunk_gated_delta_rule, gd.recurrent_gated_delta_rule])
@pytest.mark.parametrize("poisoned,value", [(0, float("nan")), (1, float("inf"))])
def test_non_finite_sequence_leaves_its_neighbours_alone(device, op, poisoned, value):
    """A sequence whose every input (its first token included: the CPU path once padded by
    multiplying token 0 by zero) and initial state hold ``value`` changes nothing of the
    sequences packed with it."""
    lengths = [5, 19]
    kw = inputs(lengths)
    a, b = kw["cu_seqlens"][poisoned].item(), kw["cu_seqlens"][poisoned + 1].item()
    for name in ("q", "k", "v", "g", "beta"):
        kw[name][:, a:b] = value
    kw["initial_state"][poisoned] = value
    kw = on(device, kw)
    o, final = op(**kw)
    for n in range(len(lengths)):
        if n == poisoned:
            continue
        o_n, final_n = op(**sequence(kw, n))
        c0, c1 = kw["cu_seqlens"][n].item(), kw["cu_seqlens"][n + 1].item()
        assert torch.isfinite(o[:, c0:c1]).all() and torch.isfinite(final[n]).all()
        torch.testing.assert_close(o[:, c0:c1], o_n, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[n : n + 1], final_n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", POISON)
def test_non_finite_sequence_leaves_its_neighbours_alone_in_the_conv(device, value):
    gen = torch.Generator().manual_seed(0)
    lengths, D, W = [4, 9], 8, 4
    x = torch.randn(1, sum(lengths), D, generator=gen)
    x[:, : lengths[0]] = value  # sequence 0, from the packed batch's first token on
    state = torch.randn(2, D, W - 1, generator=gen)
    state[0] = value
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    weight, bias = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    x, state, cu, weight, bias = (t.to(device) for t in (x, state, cu, weight, bias))
    y, final = gd.causal_conv1d(x, weight, bias, state, True, cu)
    y1, final1 = gd.causal_conv1d(x[:, lengths[0]:], weight, bias, state[1:], True)
    torch.testing.assert_close(y[:, lengths[0]:], y1)
    torch.testing.assert_close(final[1:], final1)


# ----------------------------------------------------------------------------- gates


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("value", [float("-inf"), -torch.finfo(torch.float32).max])
def test_full_reset_gates_match_the_recurrent_op_and_the_reference(device, per_channel, value):
    """g = -inf (a full reset) and the most negative float (-1e38 and below once turned every
    later gate of the chunk into 0, or summed to -inf), on the first token of a chunk, mid-chunk
    and on consecutive tokens, in a 40-token prompt."""
    kw = inputs([40], per_channel=per_channel)
    for t in (0, 7, 20, 21, 39):
        kw["g"][:, t] = value
    kw = on(device, kw)
    o, final = gd.chunk_gated_delta_rule(**kw)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    o_rec, final_rec = gd.recurrent_gated_delta_rule(**kw)
    ref = reference(**{n: (x.double().cpu() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                       for n, x in on("cpu", kw).items()})
    for got, want in ((o, o_rec), (final, final_rec), (o.cpu(), ref[0]), (final.cpu(), ref[1])):
        assert relative_error(got, want) < FP32


# ----------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("B,T", [(0, 3), (2, 0)])
def test_empty_batches_give_empty_outputs_and_unchanged_states(B, T):
    kw = dict(q=torch.randn(B, T, 1, 8), k=torch.randn(B, T, 1, 8), v=torch.randn(B, T, 2, 8),
              g=-torch.rand(B, T, 2), beta=torch.rand(B, T, 2))
    state = torch.randn(B, 2, 8, 8)
    for op in (gd.chunk_gated_delta_rule, gd.recurrent_gated_delta_rule):
        o, final = op(**kw, initial_state=state, output_final_state=True)
        assert o.shape == (B, T, 2, 8) and torch.equal(final, state)
    pool = torch.randn(3, 2, 8, 8)
    before = pool.clone()
    o, inter = gd.gated_delta_rule_decode(**kw, state_pool=pool, state_indices=torch.arange(B),
                                          output_intermediate_states=True)
    assert o.shape == (B, T, 2, 8) and inter.shape == (B, T, 2, 8, 8) and torch.equal(pool, before)
    x, w, conv = torch.randn(B, T, 6), torch.randn(6, 4), torch.randn(B, 6, 3)
    y, final = gd.causal_conv1d(x, w, None, conv, True)
    assert y.shape == x.shape and torch.equal(final, conv)
    y, final = gd.causal_conv1d(x, w, None, None, True)
    assert final.shape == (B, 6, 3) and not final.any()
    conv_pool = torch.randn(3, 6, 3)
    before = conv_pool.clone()
    assert gd.causal_conv1d_update(x, conv_pool, w, None, torch.arange(B)).shape == x.shape
    assert torch.equal(conv_pool, before)
