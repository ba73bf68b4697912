"""The runtime against transformers and against itself: greedy parity with ``model.generate``,
slot isolation, chunked == one-shot prefill, snapshots, truncation atomicity, speculative
rollback, sampling and streaming. Tiny fp32 models on CPU (tests/models.py)."""
import contextlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphdelta
from graphdelta.runtime import Runner
from graphdelta.runtime.generate import generate, runner_for, sample

from models import build, build_multimodal, build_newer, config, newer_available, tokens

# the later families (models.NEWER_FAMILIES) the runtime runs: olmo_hybrid (post-norm attention
# layers, NoPE or rotary, GDN with V = 2K and beta up to 2) and bailing_hybrid (MLA with
# interleaved rotary and a gate per head, KDA with a lower-bounded gate, transformers 5.23)
PARITY_FAMILIES = ["qwen3_next", "qwen3_5", "kimi_linear", "olmo_hybrid", "bailing_hybrid"]
# prefill + decode logits only: the MoE variant of Qwen3.5, Qwen3.5's image-text model
# (``*ForConditionalGeneration``, as its checkpoints load) on text, and OLMo-Hybrid as released,
# without rotary embeddings
LOGIT_FAMILIES = ["qwen3_5_moe", "qwen3_5_image_text", "olmo_hybrid_nope"]
PROMPT_LENGTHS = [(7, 1), (19, 2), (12, 3)]  # (length, seed)
NEW_TOKENS = 32
ATOL = 2e-5

_models: dict = {}


def model(family: str):
    if family not in _models:
        if family == "qwen3_5_image_text":
            _models[family] = build_multimodal("qwen3_5")
        elif family.startswith("olmo_hybrid"):
            if not newer_available("olmo_hybrid"):
                pytest.skip("this transformers has no OlmoHybridForCausalLM")
            nope = dict(rope_parameters={"rope_type": "default", "rope_theta": None}) if family.endswith("nope") else {}
            _models[family] = build_newer("olmo_hybrid", layers=4, **nope)
        elif family == "kimi_linear_v24":  # MLA whose values (24) are not the keys' size (32)
            import transformers as tf

            cfg = config("kimi_linear")
            cfg.v_head_dim = 24
            torch.manual_seed(0)
            _models[family] = tf.KimiLinearForCausalLM(cfg).eval()
        elif family == "bailing_hybrid":
            if not newer_available(family):
                pytest.skip("this transformers has no BailingHybridForCausalLM")
            _models[family] = build_newer(family, layers=4)
        else:
            _models[family] = build(family)
    return _models[family]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qwen():
    return model("qwen3_next")


def prompts():
    return [tokens(n, seed=s)[0] for n, s in PROMPT_LENGTHS]


def greedy(runner: Runner, slot: int, logits: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Decode ``steps`` greedy tokens for ``slot`` alone, from the logits of its last token."""
    out, seen = [], []
    for _ in range(steps):
        token = int(logits.argmax())
        out.append(token)
        logits = runner.decode([slot], [token])[0]
        seen.append(logits)
    return out, seen


def cache_copy(runner: Runner) -> list[torch.Tensor]:
    return [t.clone() for t in runner.cache.buffers()]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_greedy_matches_transformers_generate(family):
    m = model(family)
    got = graphdelta.generate(m, prompts(), max_new_tokens=NEW_TOKENS, eos_token_id=[])
    for prompt, mine in zip(prompts(), got):
        ref = m.generate(prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        ref = ref[0, prompt.numel():].tolist()
        assert len(mine) == NEW_TOKENS
        # transformers stops early only at the model's EOS token; we were told to ignore it.
        assert mine[: len(ref)] == ref


@pytest.mark.parametrize("family", LOGIT_FAMILIES + PARITY_FAMILIES[:1])
def test_prefill_and_decode_logits_match_transformers(family):
    m = model(family)
    runner = Runner(m, max_seqs=2, max_len=64)
    slot = runner.allocate()
    ids = tokens(21, seed=4)[0]
    logits = runner.prefill([slot], [ids[:-3]])[0]
    with torch.no_grad():
        ref = m(ids[None]).logits[0]
    torch.testing.assert_close(logits, ref[-4], atol=ATOL, rtol=0)
    for i in range(3):
        logits = runner.decode([slot], [int(ids[-3 + i])])[0]
        torch.testing.assert_close(logits, ref[-3 + i], atol=ATOL, rtol=0)


def test_generate_accepts_a_wrapper_and_leaves_the_model_usable(qwen):
    class Compiled(torch.nn.Module):  # what graphdelta.compile returns exposes .model
        def __init__(self, model):
            super().__init__()
            self.model = model

    p = prompts()[:1]
    experts = qwen.config._experts_implementation
    expected = graphdelta.generate(qwen, p, max_new_tokens=8, eos_token_id=[])
    assert graphdelta.generate(Compiled(qwen), p, max_new_tokens=8, eos_token_id=[]) == expected
    assert qwen.config._experts_implementation == experts  # the runtime leaves the model as it was
    ref = qwen.generate(p[0][None], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ref[0, p[0].numel():].tolist() == expected[0]


def test_generate_on_a_compiled_model(qwen):
    """``graphdelta.generate`` runs what ``graphdelta.compile`` returns, in the state layout it
    chose, with the greedy tokens of transformers' ``generate``."""
    compiled = graphdelta.compile(qwen, backend="eager", state_layout="vk", warn=False)
    runner = runner_for(compiled, max_seqs=2, max_len=32)
    assert runner.cache.state_layout == "vk" and runner.model is qwen
    p = prompts()[2]
    got = graphdelta.generate(compiled, [p], max_new_tokens=8, eos_token_id=[])
    ref = qwen.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got == [ref[0, p.numel():].tolist()]


# ----------------------------------------------------------------------------- batching


def test_slot_isolation(qwen):
    """A sequence's tokens and logits do not depend on who else is in the batch."""
    alone = Runner(qwen, max_seqs=4, max_len=64)
    a = alone.allocate()
    ref_tokens, ref_logits = greedy(alone, a, alone.prefill([a], [prompts()[0]])[0], 12)

    runner = Runner(qwen, max_seqs=4, max_len=64)
    a, b = runner.allocate(), runner.allocate()
    first = runner.prefill([a, b], [prompts()[0], prompts()[1]])  # packed with another prompt
    last = {a: first[0], b: first[1]}
    c = None
    got_tokens, got_logits = [], []
    for step in range(12):
        if step == 3:
            c = runner.allocate()
            last[c] = runner.prefill([c], [prompts()[2]])[0]  # joins mid-way
        if step == 8:
            runner.free(b)  # leaves; bucket of 2 with a and c
            del last[b]
        slots = list(last)  # 2 or 3 rows: bucket 4 has padded rows
        toks = [int(last[s].argmax()) for s in slots]
        got_tokens.append(toks[0])
        out = runner.decode(slots, toks)
        last = {s: out[i] for i, s in enumerate(slots)}
        got_logits.append(out[0])
    assert got_tokens == ref_tokens
    for x, y in zip(got_logits, ref_logits):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_padded_rows_change_nothing(qwen):
    runner = Runner(qwen, max_seqs=8, max_len=32)
    slots = [runner.allocate() for _ in range(3)]
    runner.prefill(slots, prompts())
    before = cache_copy(runner)
    runner.decode(slots[:1], [5])  # bucket 1: no padding
    runner.decode(slots[1:], [6, 7])  # bucket 2
    runner.decode(slots, [1, 2, 3])  # bucket 4: one padded row
    after = runner.cache.buffers()
    for b, a in zip(before, after):
        assert a.shape[0] == 9  # 8 slots and the sentinel row that padded rows use
        assert torch.equal(b[3:8], a[3:8])  # unused slots: attention, conv and recurrent state untouched


@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear_v24"])
def test_compiled_steps_match_eager_steps(family, monkeypatch):
    """``compile_steps=True`` (inductor over the whole step, static MoE dispatch, the sentinel
    row for the padded row of bucket 4, attention as reductions: GQA for Qwen3-Next, MLA's
    expanded heads with a value size of their own for Kimi Linear) gives the eager steps'
    logits and cache."""
    import types

    from graphdelta.runtime import forward

    def sdpa(*args, **kwargs):  # eager steps only: the compiled ones write attention as reductions
        assert not torch.compiler.is_compiling(), "a compiled decode step traced SDPA"
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    functional = types.SimpleNamespace(**vars(torch.nn.functional))
    functional.scaled_dot_product_attention = sdpa
    monkeypatch.setattr(forward, "F", functional)
    runners = [Runner(model(family), max_seqs=4, max_len=40, compile_steps=c) for c in (False, True)]
    logits = []
    for runner in runners:
        slots = [runner.allocate() for _ in range(3)]
        last = runner.prefill(slots, prompts())
        seen = []
        for _ in range(3):
            last = runner.decode(slots, last.argmax(-1).tolist())
            seen.append(last)
        logits.append(torch.stack(seen))
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)
    assert [key[:3] for key in runners[1]._replays] == [(4, 1, False)]  # the later steps replayed
    for a, b in zip(runners[0].cache.buffers(), runners[1].cache.buffers()):
        torch.testing.assert_close(a[:3], b[:3], atol=ATOL, rtol=0)


@settings(deadline=None)
@given(st.sampled_from([(4, 2), (4, 4), (6, 2), (8, 1)]), st.sampled_from([(16, 16), (24, 8)]),
       st.integers(1, 3), st.integers(1, 70), st.sampled_from([torch.float32, torch.bfloat16]),
       st.sampled_from([None, 0.07, 0.5, 1.3]), st.integers(0, 2**31 - 1))
def test_one_query_attention_matches_float64_attention(heads, dims, n, window, dtype, scale, seed):
    """The compiled CPU decode step's attention (``one_query_attention``) against float64
    softmax attention: query head h reads key head h // (H / Hkv), masked positions (past each
    row's own, at least position 0 attended) take no weight, the scale is the one given (SDPA's
    1 / sqrt(D) for None). Tolerance: float32 2e-6, bfloat16
    1e-2 relative to the largest output (its result is rounded to bfloat16 once)."""
    from graphdelta.runtime.forward import one_query_attention

    (H, Hkv), (D, Dv) = heads, dims
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 1, H, D, generator=g).to(dtype)
    keys = torch.randn(n, Hkv, window, D, generator=g).to(dtype)
    values = torch.randn(n, Hkv, window, Dv, generator=g).to(dtype)
    last = torch.randint(0, window, (n,), generator=g)  # each row's position
    mask = torch.arange(window)[None, None, :] <= last[:, None, None]
    group = H // Hkv
    k64 = keys.double().repeat_interleave(group, dim=1)  # [n, H, W, D]
    v64 = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,nhwd->nhw", q.double()[:, 0], k64) * (D ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask, float("-inf"))
    want = torch.einsum("nhw,nhwd->nhd", scores.softmax(-1), v64)[:, None]
    got = one_query_attention(q, keys, values, mask, scale)
    assert got.shape == (n, 1, H, Dv) and got.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


def _spy_on_the_decomposition(monkeypatch):
    """What inductor's one-row matmul pass decides per matmul during a compile: [(size limit
    in force, decomposed?)]. (inductor's counters of the same name also count its own
    decompositions of tiny dot products, so they cannot tell.)"""
    from graphdelta.runtime import runner as module

    if module._decompose_module() is None:
        pytest.skip("this torch has no decompose_mm_pass")
    decisions = []
    decide = module._decompose_module().should_decompose_mm

    def spy(mat1, mat2):
        decisions.append((module._decompose_module().cpu_max_other_dimension_decomposition, decide(mat1, mat2)))
        return decisions[-1][1]

    monkeypatch.setattr(module._decompose_module(), "should_decompose_mm", spy)
    return module, decisions


def test_runner_steps_compile_with_the_matmul_limit_lifted(qwen, monkeypatch):
    """A runner's compiled CPU step decomposes its one-row matmuls whatever the pass's size limit
    (lowered to 1 here, so that every weight of the tiny model is past it), and leaves the limit
    as it was."""
    module, decisions = _spy_on_the_decomposition(monkeypatch)
    monkeypatch.setattr(module._decompose_module(), "cpu_max_other_dimension_decomposition", 1)
    runner = Runner(qwen, max_seqs=1, max_len=16, compile_steps=True)
    slot = runner.allocate()
    last = runner.prefill([slot], [tokens(5, seed=1)[0]])
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        runner.decode([slot], last.argmax(-1).tolist())  # compiles the step
    assert decisions and all(limit == module._LIFTED and decomposed for limit, decomposed in decisions)
    assert module._decompose_module().cpu_max_other_dimension_decomposition == 1


def test_cpu_steps_turn_one_row_matmuls_into_reductions_of_any_size(monkeypatch):
    """CPU steps compile batch-1 matmuls as inductor's reductions (faster than MKL's GEMV), for
    weights past the pass's default size limit too, which is lifted only while a step compiles
    (and restored when that compile fails); the result is the matmul's."""
    module, decisions = _spy_on_the_decomposition(monkeypatch)
    default = module._decompose_module().cpu_max_other_dimension_decomposition
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in [(1, 96), (default + 40, 96), (default + 40,)])
    step = torch.compile(lambda x: torch.nn.functional.linear(x, w, b), dynamic=False,
                         options=module._cpu_step_options())
    with (torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False),
          module._compiling(contextlib.nullcontext(), torch.device("cpu"))):
        assert module._decompose_module().cpu_max_other_dimension_decomposition > default
        got = step(x)
    assert module._decompose_module().cpu_max_other_dimension_decomposition == default
    assert decisions == [(module._LIFTED, True)]
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="inside"):
        with module._compiling(contextlib.nullcontext(), torch.device("cpu")):
            raise RuntimeError("inside")
    assert module._decompose_module().cpu_max_other_dimension_decomposition == default


def test_steps_of_a_few_rows_compute_their_matmuls_as_reductions(qwen, monkeypatch):
    """A compiled CPU step of 2 rows (batch 2) decomposes its 2-row matmuls into reductions too
    (the row limit is the step's while it compiles, and restored after), but no batched MoE
    experts matmul (batch rows x top-k, past the limit); its logits are the eager runner's.
    The row limit is 1 for steps of more than _LIFTED_ROWS rows, for models with fewer than 2
    experts per token, and for verify steps."""
    module, _ = _spy_on_the_decomposition(monkeypatch)
    pass_ = module._decompose_module()
    default = pass_.cpu_max_first_dimension_decomposition
    decisions = []
    for name in ("should_decompose_mm", "should_decompose_bmm"):
        def spy(mat1, mat2, decide=getattr(pass_, name), name=name):
            decisions.append((name, pass_.cpu_max_first_dimension_decomposition, mat1.meta["val"].shape[0],
                              decide(mat1, mat2)))
            return decisions[-1][-1]

        monkeypatch.setattr(pass_, name, spy)
    eager, static = (Runner(qwen, max_seqs=2, max_len=16, compile_steps=c) for c in (False, True))
    logits = []
    for runner in (eager, static):
        slots = [runner.allocate(), runner.allocate()]
        last = runner.prefill(slots, [tokens(5, seed=1)[0], tokens(3, seed=2)[0]])
        with (torch._inductor.config.patch(fx_graph_cache=False),
              torch._functorch.config.patch(enable_autograd_cache=False)):
            logits.append(runner.decode(slots, last.argmax(-1).tolist()))  # the static one compiles
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)
    mms = [d for d in decisions if d[0] == "should_decompose_mm"]
    bmms = [d for d in decisions if d[0] == "should_decompose_bmm"]
    assert mms and all(limit == 2 and rows == 2 and decomposed for _, limit, rows, decomposed in mms)
    assert bmms and not any(decomposed for *_, decomposed in bmms)
    assert pass_.cpu_max_first_dimension_decomposition == default
    assert [static._reduction_rows(r) for r in (1, 2, 4, 8)] == [1, 2, 4, 1]
    monkeypatch.setattr(static.forward.experts_configs[0], "num_experts_per_tok", 1)
    assert static._reduction_rows(2) == 1
    monkeypatch.undo()
    seen, base = [], static._dynamo_context
    monkeypatch.setattr(static, "_dynamo_context", lambda rows=1, guarded=False: seen.append(rows) or base(rows, guarded))
    monkeypatch.setattr(static, "_forward", static.forward)  # eager: only the rows it is given are checked
    static.verify(slots[:1], torch.tensor([[3, 4]]))
    static.accept([2])
    assert seen == [1]  # a verify step of 2 tokens of one sequence keeps the limit of 1


def test_compiled_steps_skip_guards_only_once_compiled(qwen):
    """Compiled steps skip Dynamo's guard evaluation after their first call: the guards that
    tell the compiled shapes apart still choose the step, so decoding across a window bucket
    boundary (64 -> 128 positions) and back to a new slot's first window gives the eager
    steps' logits."""
    eager, static = (Runner(qwen, max_seqs=3, max_len=128, compile_steps=c) for c in (False, True))
    assert static.skip_guards
    chosen = []
    base = static._dynamo_context

    def observed(rows=1, guarded=False):  # (calling torch.compiler.set_stance sets the stance: once, as _run does)
        context = base(rows, guarded)
        chosen.append((static._compiling, type(context).__name__))
        return context

    static._dynamo_context = observed
    logits = []
    for runner in (eager, static):
        first, second = runner.allocate(), runner.allocate()
        last = runner.prefill([first], [tokens(62, seed=4)[0]])
        seen = []
        for _ in range(4):  # positions 62 .. 65: windows 64, then 128
            last = runner.decode([first], last.argmax(-1).tolist())
            seen.append(last)
        runner.prefill([second], [tokens(5, seed=6)[0]])
        seen.append(runner.decode([second], [7]))  # window 64 again, compiled already
        logits.append(torch.stack(seen))
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)
    # compiles for windows 64 and 128; the other steps replay those (no Dynamo: replay.py)
    assert [c for c, _ in chosen] == [True, True]
    assert sorted(static._replays) == [(1, 1, False, 64), (1, 1, False, 128)]
    replays = dict(static._replays)
    static._replays.clear()  # where a step has no replay (verify steps), Dynamo skips the guards
    static.decode([second], [8])
    assert chosen[-1] == (False, "set_stance")
    static._replays.update(replays)

    # Dynamo's caches reset (the compiled shapes are gone): the next steps compile again, with
    # their guards, and never reach an entry compiled for another window.
    torch._dynamo.reset()
    chosen.clear()
    slot = static.allocate()
    last = static.prefill([slot], [tokens(62, seed=4)[0]])
    again = []
    for _ in range(4):
        last = static.decode([slot], last.argmax(-1).tolist())
        again.append(last)
    torch.testing.assert_close(torch.stack(again), logits[0][:4], atol=ATOL, rtol=0)
    # the runner saw the reset (Runner._forget_if_reset): the first step of each window compiles
    # anew as a first call (under _compiling's limits) and is captured again; the others replay
    compiling = "_GeneratorContextManager"
    assert chosen == [(True, compiling), (True, compiling)]
    assert sorted(static._replays) == [(1, 1, False, 64), (1, 1, False, 128)]
    assert all(static._replays[key] is not replays[key] for key in replays)
    with torch.compiler.set_stance("force_eager"):  # a stance of the user's is kept: no skipping
        static.decode([slot], [7])
    assert chosen[-1] == (False, compiling)


def test_static_steps_read_a_window_bucket(qwen):
    """Attention reads the longest live sequence's positions, rounded up: to a power-of-two
    bucket from 64 for static steps (compiled or CUDA graphs: few shapes; max_len absorbs the
    bucket below it when less than twice it), to a multiple of 64 eagerly; never the whole
    cache for short sequences."""
    static = Runner(qwen, max_seqs=2, max_len=1000, compile_steps=True)  # compiles on first use only
    eager = Runner(qwen, max_seqs=2, max_len=1000)
    assert static.windows == [64, 128, 256, 1000]
    assert [static._window(n) for n in (1, 64, 65, 200, 300, 513, 1000)] == [64, 64, 128, 256, 1000, 1000, 1000]
    assert Runner(qwen, max_seqs=1, max_len=80, compile_steps=True).windows == [80]
    assert Runner(qwen, max_seqs=1, max_len=3000, compile_steps=True).windows == [64, 128, 256, 512, 1024, 3000]
    assert [eager._window(n) for n in (1, 65, 130, 999)] == [64, 128, 192, 1000]
    assert static._window(130, packed=True) == 192  # prefill is never static


def test_prepare_compiles_every_window_of_a_run_on_padded_rows(qwen, monkeypatch):
    """``generate`` compiles the decode step of every window its sequences will grow through
    before the first token (not between streamed tokens), on padded rows: no slot changes."""
    runner = Runner(qwen, max_seqs=2, max_len=200, compile_steps=True)
    calls = []
    monkeypatch.setattr(runner, "_run", lambda tokens, slots, starts, window, keep: calls.append(
        (tokens.shape, slots.tolist(), window, keep)))
    runner.prepare(2, 10, 150)
    assert calls == [((2, 1), [-1, -1], 64, False), ((2, 1), [-1, -1], 200, False)]
    runner.prepare(2, 10, 150)  # compiled already
    runner.prepare(2, 10, 9)  # a single new token: no decode step
    assert len(calls) == 2 and runner.cache.lengths == [0, 0]
    eager = Runner(qwen, max_seqs=2, max_len=200)  # eager steps: nothing to compile
    monkeypatch.setattr(eager, "_run", lambda *args: calls.append(args))
    eager.prepare(2, 10, 150)
    assert len(calls) == 2


def test_prepared_step_serves_the_decode_steps(qwen):
    """What ``prepare`` compiled is what the decode steps run (with gradients on around them, as
    a caller of ``generate`` may have: the steps run without, and so does ``prepare``)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    runner = Runner(qwen, max_seqs=1, max_len=40, compile_steps=True)
    runner._forward = torch.compile(runner.forward, backend=backend, dynamic=False)
    with torch.enable_grad():
        runner.prepare(1, 9, 12)
    compiled = len(graphs)
    assert compiled >= 1
    slot = runner.allocate()
    last = runner.prefill([slot], [tokens(8, seed=2)[0]])
    for _ in range(4):
        last = runner.decode([slot], last.argmax(-1).tolist())
    assert len(graphs) == compiled and all(not t.requires_grad for t in runner.cache.buffers())


def test_a_window_bucket_gives_the_logits_of_the_whole_cache(qwen):
    """The same step over a 128-position window and over all 512: the positions past the
    sequences are masked, and the logits are the same."""
    runners = [Runner(qwen, max_seqs=2, max_len=512) for _ in range(2)]
    logits = []
    for runner, window in zip(runners, (128, 512)):
        slots = [runner.allocate() for _ in range(2)]
        last = runner.prefill(slots, [tokens(70, seed=4)[0], tokens(9, seed=5)[0]])
        with torch.no_grad():
            out, _ = runner._run(last.argmax(-1)[:, None], torch.tensor(slots), torch.tensor([70, 9]), window,
                                 keep=False)
        logits.append(out)
    torch.testing.assert_close(logits[0], logits[1], atol=ATOL, rtol=0)


def test_prefill_validates_once_on_the_host(qwen, monkeypatch):
    """The runner builds cu_seqlens on the host from lengths it checked; the layers call the
    unchecked ops, whose checks would read cu_seqlens back from the device in every layer."""
    runner = Runner(qwen, max_seqs=2, max_len=64)
    slots = [runner.allocate() for _ in range(2)]

    def refuse(*args, **kwargs):
        raise AssertionError("a layer checked cu_seqlens")

    monkeypatch.setattr(graphdelta.checks, "check_cu_seqlens", refuse)
    prompt = tokens(19, seed=2)[0]
    got = runner.prefill(slots, [tokens(7, seed=1)[0], prompt])
    with torch.no_grad():
        ref = qwen(prompt[None]).logits[0, -1]
    torch.testing.assert_close(got[1], ref, atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_shot(qwen):
    long_prompt = tokens(70, seed=7)[0]
    one = Runner(qwen, max_seqs=2, max_len=96)
    s = one.allocate()
    ref = one.prefill([s], [long_prompt])[0]
    ref_states = [t[s].clone() for t in one.cache.state + one.cache.conv]
    ref_tokens, _ = greedy(one, s, ref, 4)

    chunked = Runner(qwen, max_seqs=2, max_len=96)
    s, other = chunked.allocate(), chunked.allocate()
    pieces = [long_prompt[:13], long_prompt[13:14], long_prompt[14:50], long_prompt[50:]]
    chunked.prefill([s, other], [pieces[0], prompts()[1]])  # a piece packed with another prompt
    for piece in pieces[1:]:
        logits = chunked.prefill([s], [piece])[0]
    assert chunked.cache.length(s) == 70
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    for a, b in zip(ref_states, chunked.cache.state + chunked.cache.conv):
        torch.testing.assert_close(a, b[s], atol=ATOL, rtol=0)
    got_tokens, _ = greedy(chunked, s, logits, 4)
    assert got_tokens == ref_tokens


# ----------------------------------------------------------------------------- snapshots


def test_snapshot_restore_and_fork(qwen):
    runner = Runner(qwen, max_seqs=4, max_len=64)
    s = runner.allocate()
    logits = runner.prefill([s], [prompts()[1]])[0]
    snap = runner.cache.snapshot(s)
    ref_tokens, ref_logits = greedy(runner, s, logits, 6)
    live = runner.cache.fork(s)  # branch of the live sequence at 19 + 6 tokens
    assert runner.cache.length(live) == runner.cache.length(s)

    runner.cache.restore(snap)  # back to the end of the prompt
    assert runner.cache.length(s) == prompts()[1].numel()
    again_tokens, again_logits = greedy(runner, s, logits, 6)
    assert again_tokens == ref_tokens
    for x, y in zip(again_logits, ref_logits):
        torch.testing.assert_close(x, y, atol=0, rtol=0)

    prefix = runner.cache.fork(snap)  # prefix reuse: a new sequence from the snapshot
    fork_tokens, _ = greedy(runner, prefix, logits, 6)
    assert fork_tokens == ref_tokens
    # The live fork continues exactly like the original would have.
    cont = runner.decode([live], [ref_tokens[-1]])[0]
    runner.cache.truncate(s, prompts()[1].numel())
    greedy(runner, s, logits, 6)
    torch.testing.assert_close(cont, runner.decode([s], [ref_tokens[-1]])[0], atol=ATOL, rtol=0)


def test_truncate_without_snapshot_fails_and_changes_nothing(qwen):
    runner = Runner(qwen, max_seqs=3, max_len=64)
    s = runner.allocate()
    logits = runner.prefill([s], [prompts()[0]])[0]
    snap = runner.cache.snapshot(s)  # at 7 tokens
    greedy(runner, s, logits, 5)  # 12 tokens
    before, length = cache_copy(runner), runner.cache.length(s)
    with pytest.raises(ValueError, match=r"no snapshot at 9 \(snapshots at \[7\]\)"):
        runner.cache.truncate(s, 9)
    with pytest.raises(ValueError, match="to 20 tokens"):
        runner.cache.truncate(s, 20)
    assert runner.cache.length(s) == length
    for b, a in zip(before, runner.cache.buffers()):
        assert torch.equal(b, a)
    runner.cache.truncate(s, 7)  # honored by the snapshot
    assert runner.cache.length(s) == 7
    runner.cache.truncate(s, 0)  # always possible: the empty sequence
    assert not snap.valid
    with pytest.raises(ValueError, match="no longer valid"):
        runner.cache.restore(snap)
    with pytest.raises(ValueError, match="no longer valid"):
        runner.cache.fork(snap)
    # A fork that finds no free slot changes nothing either.
    runner.allocate(), runner.allocate()
    with pytest.raises(RuntimeError, match="all 3 cache slots are in use"):
        runner.cache.fork(s)


@pytest.mark.parametrize("call,error,message", [
    (lambda r, s: r.prefill([s], [[1, 600]]), ValueError, "the piece for slot 0 holds token id 600, outside the vocabulary [0, 512)"),
    (lambda r, s: r.decode([s], [-1]), ValueError, "decode tokens holds token id -1, outside the vocabulary [0, 512)"),
    (lambda r, s: r.decode([s], [3, 4]), ValueError, "decode needs one token per slot, got 2 tokens for slots [0]"),
    (lambda r, s: r.verify([s], torch.tensor([[1.0, 2.0]])), TypeError, "verify tokens must be integer token ids, got dtype torch.float32"),
    (lambda r, s: generate(r.model, "def f", runner=r), TypeError, "prompts must be token ids, one sequence per prompt, got str 'def f'"),
    (lambda r, s: generate(r.model, [[5], [7, 512]], max_new_tokens=2, runner=r), ValueError, "prompt 1 holds token id 512, outside the vocabulary [0, 512)"),
    (lambda r, s: generate(r.model, [[5]], max_new_tokens=-1, runner=r), ValueError, "max_new_tokens must be an int >= 0, got -1"),
])
def test_bad_tokens_raise_and_change_nothing(qwen, call, error, message):
    """An id outside the vocabulary would read past the embedding table (inside a graph replay
    on CUDA): it is refused by name before anything runs."""
    runner = Runner(qwen, max_seqs=2, max_len=32)
    s = runner.allocate()
    runner.prefill([s], [[1, 2, 3]])
    before = cache_copy(runner)
    with pytest.raises(error, match=re.escape(message)):
        call(runner, s)
    assert runner.cache.length(s) == 3 and runner.cache.allocator.available == 1
    assert all(torch.equal(b, a) for b, a in zip(before, runner.cache.buffers()))


def test_host_token_lists_take_the_quick_check_with_the_same_result():
    """A short list of host ints (generate's decode tokens) is range-checked in Python, not as a
    tensor: the same ids and the same errors either way; anything else takes the tensor path."""
    from graphdelta.runtime.runner import to_device, token_ids

    for tokens in ([3], [0, 9, 4], torch.tensor([[0, 9]]), list(range(10)) * 30):
        got = token_ids(tokens, "t", 10)
        assert got.dtype == torch.long and got.tolist() == torch.as_tensor(tokens).tolist()
    for tokens, error, message in (([3, 10], ValueError, "t holds token id 10, outside the vocabulary [0, 10)"),
                                   ([-1], ValueError, "t holds token id -1, outside the vocabulary [0, 10)"),
                                   ([True], TypeError, "t must be integer token ids, got dtype torch.bool"),
                                   ([1, 2.0], TypeError, "t must be integer token ids, got dtype torch.float32")):
        with pytest.raises(error, match=re.escape(message)):
            token_ids(tokens, "t", 10)
    assert token_ids([10**6], "t").tolist() == [10**6]  # no vocabulary: no range check
    # On CPU the parts come back as they are, flattened, int64 (no batched copy).
    parts = to_device([[1, 2], torch.tensor([[3], [4]], dtype=torch.int32), []], torch.device("cpu"))
    assert [p.tolist() for p in parts] == [[1, 2], [3, 4], []] and all(p.dtype == torch.long for p in parts)


# ----------------------------------------------------------------------------- speculative


@pytest.mark.parametrize("state_layout", ["kv", "vk"])
def test_speculative_rollback_is_exact(qwen, state_layout):
    """Verify 3 drafts per sequence, accept 2 of 4 and 4 of 4: the result equals decoding only
    the accepted tokens."""
    p = prompts()[:2]
    ref = Runner(qwen, max_seqs=2, max_len=64, state_layout=state_layout)
    ra = [ref.allocate(), ref.allocate()]
    first = ref.prefill(ra, p)
    drafts = torch.tensor([[int(first[0].argmax()), 11, 12, 13], [int(first[1].argmax()), 21, 22, 23]])

    spec = Runner(qwen, max_seqs=2, max_len=64, state_layout=state_layout)
    sa = [spec.allocate(), spec.allocate()]
    spec.prefill(sa, p)
    verified = spec.verify(sa, drafts)  # [2, 4, V]
    spec.accept([2, 4])

    for row, (slot, accepted) in enumerate(zip(ra, (2, 4))):
        for t in range(accepted):
            logits = ref.decode([slot], [int(drafts[row, t])])[0]
            torch.testing.assert_close(verified[row, t], logits, atol=ATOL, rtol=0)
    assert [spec.cache.length(s) for s in sa] == [ref.cache.length(s) for s in ra] == [9, 23]
    for a, b in zip(ref.cache.state + ref.cache.conv, spec.cache.state + spec.cache.conv):
        torch.testing.assert_close(a[:2], b[:2], atol=ATOL, rtol=0)
    nxt = [5, 6]
    torch.testing.assert_close(spec.decode(sa, nxt), ref.decode(ra, nxt), atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="needs a verify"):
        spec.accept([1, 1])


# ----------------------------------------------------------------------------- generate API


def test_generate_sampling_stream_and_eos(qwen):
    p = prompts()
    kwargs = dict(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[])
    streamed = []
    first = graphdelta.generate(qwen, p, seed=3, stream=lambda i, t: streamed.append((i, t)), **kwargs)
    assert graphdelta.generate(qwen, p, seed=3, **kwargs) == first
    assert all(len(x) == 10 for x in first)
    for i in range(len(p)):
        assert [t for j, t in streamed if j == i] == first[i]

    greedy_out = graphdelta.generate(qwen, p, max_new_tokens=6, eos_token_id=[])
    eos = greedy_out[1][2]  # sequence 1 stops at its third token; the others run on
    stopped = graphdelta.generate(qwen, p, max_new_tokens=6, eos_token_id=eos, max_batch=2)
    assert stopped[1] == greedy_out[1][: greedy_out[1].index(eos) + 1]
    for i in (0, 2):
        cut = greedy_out[i].index(eos) + 1 if eos in greedy_out[i] else 6
        assert stopped[i] == greedy_out[i][:cut]


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample(logits).tolist() == [3]
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, top_k=1, generator=g)) for _ in range(20)} == {3}
    assert {int(sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} <= {2, 3}
    with pytest.raises(ValueError, match=re.escape("top_p must be a number in (0, 1], got 1.5")):
        sample(logits, 1.0, top_p=1.5)


# ----------------------------------------------------------------------------- CUDA graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_graph_replay_equals_eager_and_addresses_never_change():
    m = build("qwen3_next").cuda()
    graphs = Runner(m, max_seqs=4, max_len=64, cuda_graphs=True)
    eager = Runner(m, max_seqs=4, max_len=64, cuda_graphs=False)
    addresses = graphs.cache.addresses()
    unused = [t[3].clone() for t in graphs.cache.conv + graphs.cache.state]  # slot 3 is never allocated
    gs = [graphs.allocate() for _ in range(3)]
    es = [eager.allocate() for _ in range(3)]
    lg = graphs.prefill(gs[:2], prompts()[:2])
    le = eager.prefill(es[:2], prompts()[:2])
    for step in range(6):
        if step == 2:  # a third sequence joins: same bucket sizes, no new capture
            lg = torch.cat([lg, graphs.prefill(gs[2:], prompts()[2:])])
            le = torch.cat([le, eager.prefill(es[2:], prompts()[2:])])
        toks = le.argmax(-1).tolist()
        lg = graphs.decode(gs[: len(toks)], toks)
        le = eager.decode(es[: len(toks)], toks)
        torch.testing.assert_close(lg, le, atol=1e-4, rtol=0)
    graphs.free(gs[0])
    eager.free(es[0])
    toks = le[1:].argmax(-1).tolist()
    torch.testing.assert_close(graphs.decode(gs[1:], toks), eager.decode(es[1:], toks), atol=1e-4, rtol=0)
    assert sorted(graphs._graphs) == [(2, 1, False, 64), (4, 1, False, 64)]  # one capture per bucket used
    assert graphs.cache.addresses() == addresses
    for before, pool in zip(unused, graphs.cache.conv + graphs.cache.state):  # padded rows wrote nothing
        assert torch.equal(before, pool[3])
