"""graphdelta's ops (PyTorch backend) against the float64 reference, on random problems."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphdelta as gd
from graphdelta import reference
from graphdelta.fuzz import implementations
from graphdelta.testing import (
    TOLERANCES, Capabilities, Problem, ProblemSpec, check, poisoned_allocations, problem_specs, relative_error,
)

IMPLS = implementations()
# Two float32 implementations each within ~1e-5 of the reference (TOLERANCES documents the
# bound) can differ from each other by about twice that.
FP32 = TOLERANCES[torch.float32]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "torch")


@given(problem_specs())
def test_chunk_matches_reference(spec):
    check(gd.chunk_gated_delta_rule, spec.build())


@pytest.mark.parametrize("layout, per_channel, seqlens", [
    ("kv", False, None), ("vk", True, None), ("kv", False, (1100, 1013)),
])
def test_long_prompt_crosses_scan_groups(layout, per_channel, seqlens):
    """2113 tokens: 34 chunks of 64, more than one group of the CPU scan (SCAN_GROUP chunks),
    from a stored state and, packed, with a sequence boundary inside a group."""
    from graphdelta.lowering.torch_chunk import SCAN_GROUP

    spec = ProblemSpec(T=2113, H=1, group=2, K=16, V=8, per_channel_gate=per_channel, gate="mild",
                       state_layout=layout, initial_state=True, seqlens=seqlens, seed=5)
    assert -(-spec.T // 64) > SCAN_GROUP
    check(gd.chunk_gated_delta_rule, spec.build())


def test_per_channel_grams_in_groups_of_chunks(monkeypatch):
    """KDA's gram matrices bounded to one chunk at a time (GRAM_BYTES: their temporaries hold K
    values per pair of rows) give the reference answer, from a stored state, packed."""
    from graphdelta.lowering import torch_chunk

    monkeypatch.setattr(torch_chunk, "GRAM_BYTES", 1)
    spec = ProblemSpec(T=300, H=2, group=2, K=16, V=8, per_channel_gate=True, gate="mild",
                       initial_state=True, seqlens=(130, 170), seed=7)
    check(gd.chunk_kda, spec.build())


@given(problem_specs())
def test_recurrent_matches_reference(spec):
    check(gd.recurrent_gated_delta_rule, spec.build())


@given(problem_specs(Capabilities(varlen=False)))
def test_decode_on_a_pool_matches_reference(spec):
    check(IMPLS["decode"].fn, spec.build())


@given(problem_specs(Capabilities(dtypes=("float32",))))
def test_chunked_equals_recurrent(spec):
    p = spec.build()
    o1, s1 = gd.chunk_gated_delta_rule(**p.kwargs())
    o2, s2 = gd.recurrent_gated_delta_rule(**p.kwargs())
    assert relative_error(o1, o2) < FP32 and relative_error(s1, s2) < FP32


@given(problem_specs(Capabilities(varlen=False, dtypes=("float32",))).filter(lambda s: s.T >= 2),
       st.floats(0.01, 0.99))
def test_split_prefill_equals_one_pass(spec, where):
    # A prompt fed in two pieces, the second starting from the state the first left behind.
    p = spec.build()
    cut = max(1, min(spec.T - 1, int(spec.T * where)))
    kw = p.kwargs()
    o, s = gd.chunk_gated_delta_rule(**kw)
    first = {**kw, **{n: kw[n][:, :cut] for n in ("q", "k", "v", "g", "beta")}}
    second = {**kw, **{n: kw[n][:, cut:] for n in ("q", "k", "v", "g", "beta")}}
    o1, s1 = gd.chunk_gated_delta_rule(**first)
    o2, s2 = gd.chunk_gated_delta_rule(**{**second, "initial_state": s1})
    assert relative_error(torch.cat([o1, o2], 1), o) < FP32
    assert relative_error(s2, s) < FP32


@settings(max_examples=10)
@given(problem_specs(Capabilities(dtypes=("float32",))).filter(lambda s: s.seqlens is not None))
def test_varlen_equals_separate_calls(spec):
    p = spec.build()
    kw = p.kwargs()
    o, s = gd.chunk_gated_delta_rule(**kw)
    offsets = p.cu_seqlens.tolist()
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        part = {**kw, **{x: kw[x][:, a:b] for x in ("q", "k", "v", "g", "beta")}, "cu_seqlens": None}
        if kw["initial_state"] is not None:
            part["initial_state"] = kw["initial_state"][n : n + 1]
        o_n, s_n = gd.chunk_gated_delta_rule(**part)
        assert relative_error(o[:, a:b], o_n) < FP32
        assert relative_error(s[n : n + 1], s_n) < FP32


@pytest.mark.parametrize("op", [gd.chunk_gated_delta_rule, gd.recurrent_gated_delta_rule])
def test_batch_size_one_keeps_its_dimension(op):
    p = ProblemSpec(B=1, T=5, H=1, group=2, K=16, V=32).build()
    o, s = op(**p.kwargs())
    assert o.shape == (1, 5, 2, 32) and s.shape == (1, 2, 16, 32)
    p = ProblemSpec(B=1, T=1, H=1, group=1, K=16, V=16, state_layout="vk", initial_state=True).build()
    o, s = op(**p.kwargs())
    assert o.shape == (1, 1, 1, 16) and s.shape == (1, 1, 16, 16)


def test_final_state_only_on_request():
    p = ProblemSpec(T=3).build()
    kw = {**p.kwargs(), "output_final_state": False}
    assert gd.chunk_gated_delta_rule(**kw)[1] is None
    assert gd.recurrent_gated_delta_rule(**kw)[1] is None


def test_kda_needs_a_per_channel_gate():
    p = ProblemSpec(T=3, per_channel_gate=True).build()
    o, s = gd.chunk_kda(**p.kwargs())
    ref_o, _ = p.reference()
    assert relative_error(o, ref_o) < TOLERANCES[torch.float32]
    with pytest.raises(ValueError, match="per-channel gate"):
        gd.chunk_kda(**ProblemSpec(T=3).build().kwargs())


# ----------------------------------------------------------------------------- decode pool

@pytest.mark.parametrize("layout", ["kv", "vk"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_decode_padded_rows_touch_nothing_and_intermediates_roll_back(layout, per_channel):
    spec = ProblemSpec(B=3, T=4, H=1, group=2, K=16, V=32, per_channel_gate=per_channel,
                       state_layout=layout, initial_state=True, seed=3)
    p = spec.build()
    pool = torch.randn(6, *p.initial_state.shape[1:])
    slots = torch.tensor([4, -1, 1], dtype=torch.int32)
    pool[4], pool[1] = p.initial_state[0], p.initial_state[2]
    before = pool.clone()
    kw = p.kwargs()
    o, inter = gd.gated_delta_rule_decode(
        p.q, p.k, p.v, p.g, p.beta, pool, slots, use_qk_l2norm_in_kernel=False,
        state_layout=layout, output_intermediate_states=True)
    for row, n in ((0, 0), (2, 2)):
        for t in range(1, 5):  # every intermediate state equals the reference on that prefix
            one = {**kw, **{x: kw[x][n : n + 1, :t] for x in ("q", "k", "v", "g", "beta")},
                   "initial_state": kw["initial_state"][n : n + 1]}
            ref_o, ref_s = Problem(spec, **{x: one[x] for x in ("q", "k", "v", "g", "beta")},
                                   initial_state=one["initial_state"], cu_seqlens=None).reference()
            assert relative_error(inter[row, t - 1], ref_s[0]) < FP32
        assert relative_error(o[row], ref_o[0]) < FP32
    assert torch.equal(inter[2, -1], pool[1]) and torch.equal(inter[0, -1], pool[4])
    untouched = [0, 2, 3, 5]
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.count_nonzero(o[1]) == 0


# ----------------------------------------------------------------------------- conv1d

@settings(max_examples=15)
@given(T=st.sampled_from([1, 2, 7, 33]), D=st.sampled_from([4, 24]), W=st.integers(2, 4),
       extra=st.integers(0, 2), with_state=st.booleans(), bias=st.booleans(), varlen=st.booleans(),
       activation=st.sampled_from(["silu", None]), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_conv_matches_reference(T, D, W, extra, with_state, bias, varlen, activation, dtype):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(T * 31 + D)
    x = torch.randn(1 if varlen else 2, T, D, generator=gen).to(dt)
    w, b = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen) if bias else None
    cu = torch.tensor([0, (T + 1) // 2, T] if T > 1 else [0, 1]) if varlen else None
    N = (len(cu) - 1) if varlen else 2
    s0 = torch.randn(N, D, W - 1 + extra, generator=gen) if with_state else None
    with poisoned_allocations():
        y, s = gd.causal_conv1d(x, w, b, s0, True, cu, activation)
    ry, rs = reference.causal_conv1d(x.double(), w.double(), None if b is None else b.double(),
                                     None if s0 is None else s0.double(), cu, activation)
    assert relative_error(y, ry) < TOLERANCES[dt] and relative_error(s, rs) < 1e-6
    # what inductor compiles in the op's place on CPU: the same numbers, or a refusal when packed
    decomposed = gd.ops.inductor_decompositions()[torch.ops.graphdelta.causal_conv1d.default]
    out = decomposed(x, w, b, s0, cu, activation)
    if varlen:
        assert out is NotImplemented
    else:
        assert out[0].dtype == y.dtype and out[1].dtype == s.dtype
        assert relative_error(out[0], ry) < TOLERANCES[dt] and relative_error(out[1], rs) < 1e-6


@pytest.mark.parametrize("tokens_per_step", [1, 3])
def test_conv_update_chain_equals_prefill_and_skips_padded_rows(tokens_per_step):
    D, W, T = 6, 4, 9
    x = torch.randn(2, T, D)
    w, b = torch.randn(D, W), torch.randn(D)
    pool = torch.randn(5, D, W)  # a state longer than W - 1, as transformers keeps it
    slots = torch.tensor([3, -1, 0])
    before = pool.clone()
    y_ref, s_ref = reference.causal_conv1d(x[:1], w, b, pool[3:4].clone())
    ys = []
    for t in range(0, T, tokens_per_step):
        step = x[:, t : t + tokens_per_step]
        batch = torch.stack([step[0], torch.full_like(step[0], 9.0), step[1]])
        y = gd.causal_conv1d_update(batch if tokens_per_step > 1 else batch[:, 0], pool, w, b, slots)
        ys.append(y if tokens_per_step > 1 else y.unsqueeze(1))
        assert torch.count_nonzero(ys[-1][1]) == 0
    y = torch.cat(ys, 1)
    torch.testing.assert_close(y[0], y_ref[0])
    torch.testing.assert_close(pool[3], s_ref[0])
    assert torch.equal(pool[[1, 2, 4]], before[[1, 2, 4]])


# ----------------------------------------------------------------------------- the checker

def test_checker_catches_a_wrong_answer_and_an_unwritten_output():
    p = ProblemSpec(B=2, T=70, H=1, group=2, K=16, V=16, seed=5).build()

    def wrong_scale(**kw):
        return gd.chunk_gated_delta_rule(**{**kw, "scale": 0.9 * (kw["scale"] or 0.25)})

    def forgets_a_token(**kw):
        o, s = gd.chunk_gated_delta_rule(**kw)
        out = torch.empty_like(o)
        out[:, :-1] = o[:, :-1]
        return out, s

    for broken in (wrong_scale, forgets_a_token):
        with pytest.raises(AssertionError, match="reproduce with"):
            check(broken, p)


def test_op_bodies_run_on_their_inputs_device(monkeypatch):
    """Each op body makes its first input's CUDA device current (Triton launches on the
    current device): a stand-in records the device it is asked for."""
    from graphdelta import ops

    assert isinstance(ops.on_device_of(torch.zeros(1)), type(__import__("contextlib").nullcontext()))

    class OnCuda1:
        device = torch.device("cuda", 1)

    assert ops.on_device_of(OnCuda1()).idx == 1  # torch.cuda.device(1), entered by the body
    seen = []
    real = ops.on_device_of

    def spy(t):
        seen.append(t.device)
        return real(t)

    monkeypatch.setattr(ops, "on_device_of", spy)
    p = ProblemSpec(T=5, K=16, V=16, initial_state=True).build()
    gd.chunk_gated_delta_rule(p.q, p.k, p.v, p.g, p.beta, initial_state=p.initial_state)
    gd.recurrent_gated_delta_rule(p.q, p.k, p.v, p.g, p.beta)
    pool = torch.zeros(2, 1, 16, 16)
    gd.gated_delta_rule_decode(p.q[:, :1], p.k[:, :1], p.v[:, :1], p.g[:, :1], p.beta[:, :1], pool,
                               torch.tensor([1]))
    x, w = torch.randn(1, 5, 8), torch.randn(8, 4)
    gd.causal_conv1d(x, w)
    gd.causal_conv1d_update(x[:, :1], torch.zeros(1, 8, 3), w)
    gd.gated_rms_norm(x, x, torch.ones(8))
    assert seen == [torch.device("cpu")] * 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_the_second_gpu_match_the_first(monkeypatch):
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "triton")
    p = ProblemSpec(T=70, K=32, V=32, dtype="bfloat16", initial_state=True, seed=3).build()
    args = [x.to("cuda:1") for x in (p.q, p.k, p.v, p.g, p.beta)]
    o, s = gd.chunk_gated_delta_rule(*args, initial_state=p.initial_state.to("cuda:1"), output_final_state=True)
    ref_o, ref_s = gd.chunk_gated_delta_rule(*(x.cuda(0) for x in args), initial_state=p.initial_state.cuda(0),
                                             output_final_state=True)
    assert o.device == torch.device("cuda", 1)
    assert torch.equal(o.cpu(), ref_o.cpu()) and torch.equal(s.cpu(), ref_s.cpu())
