"""graphdelta.compile on the transformers hybrid families: logits and cache against eager, the
graphdelta ops in the compiled graph and nothing of the chunk pipeline left, one prefill graph
for every prompt length, both state layouts, the graphs' ops on the Triton kernels (under the
interpreter; ``test_compile_cuda.py`` runs the GPU's inductor and kernels), GDN head shapes
beyond the tiny configs'.

Each family compiles once (module-scoped fixture). Qwen3-Next goes through ``aot_eager``
(Dynamo and AOT autograd over the graphdelta ops: their fakes and the functionalized in-place
conv update), the other families through Dynamo alone (``eager``); inductor costs ~30 s a
graph on 2 CPU cores, so one test runs it, on one prefill graph.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphdelta
from graphdelta import hf
import models

FAMILIES = models.FAMILIES
LENGTHS = (7, 100)  # 1 and 2 chunks
CACHED = (70, 1)  # a 70-token prefill into a cache, then one decode step
ONE_GRAPH_LENGTHS = (2, 63, 64, 65, 129, 200, 321, 600)  # chunk counts 1, 2, 3, 4, 6, 10
RTOL = 1e-4
BACKENDS = {"qwen3_next": "aot_eager"}  # others: "eager"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def compile_fused(model: torch.nn.Module, **kwargs):
    """``graphdelta.compile(model, **kwargs)``, failing on any graphdelta warning: every
    linear-attention function must fuse."""
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = graphdelta.compile(model, **kwargs)
    assert not [str(w.message) for w in caught if "graphdelta" in str(w.message)]
    return compiled


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = models.build(request.param)
    compiled = compile_fused(model, backend=BACKENDS.get(request.param, "eager"), state_layout="kv")
    return request.param, model, compiled


@torch.no_grad()
def test_logits_match_eager(family):
    name, model, compiled = family
    for length in LENGTHS:
        ids = models.tokens(length)
        ref = model(ids, use_cache=False).logits
        out = compiled(ids, use_cache=False).logits
        assert rel_err(out, ref) < RTOL, (name, length)


def check_cached_prefill_and_step(name, model, compiled) -> None:
    """The ``CACHED`` prefill into a cache, then a decode step: eager's logits after each, and
    eager's recurrent state in the first replaced layer."""
    prefill, step = CACHED
    ids = models.tokens(prefill)
    ref = model(ids, use_cache=True)
    out = compiled(ids, use_cache=True)
    assert rel_err(out.logits, ref.logits) < RTOL
    nxt = models.tokens(step, seed=7)
    ref2 = model(nxt, **models.cached(model, ref), use_cache=True)
    out2 = compiled(nxt, **models.cached(compiled, out), use_cache=True)
    assert rel_err(out2.logits, ref2.logits) < RTOL, name
    layer = next(lp for lp in compiled.plan.layers if lp.regions).layer.module.layer_idx
    ref_state = hf.output_cache(ref2).layers[layer].recurrent_states[0]
    out_state = hf.output_cache(out2).layers[layer].recurrent_states[0]
    assert rel_err(out_state, ref_state) < RTOL


@torch.no_grad()
def test_cache_matches_eager(family):
    check_cached_prefill_and_step(*family)


TRITON_MODULES = {
    "chunk_gated_delta_rule": "triton_chunk", "recurrent_gated_delta_rule": "triton_recurrent",
    "causal_conv1d": "triton_conv", "causal_conv1d_update": "triton_conv", "gated_rms_norm": "triton_norm",
}


def spy_implementations(monkeypatch) -> dict[str, set[str]]:
    """Records, per graphdelta op, the modules of the implementations its calls ran."""
    import graphdelta.ops

    used: dict[str, set[str]] = {}
    real = graphdelta.ops.implementation

    def spy(op, t):
        fn = real(op, t)
        used.setdefault(op, set()).add(fn.__module__.rsplit(".", 1)[-1])
        return fn

    monkeypatch.setattr(graphdelta.ops, "implementation", spy)
    return used


@torch.no_grad()
def test_triton_lowering_matches_eager(family, monkeypatch):
    """The compiled graphs with every graphdelta op on its Triton kernel (the GPU's lowering; on
    CPU under the interpreter): eager's logits and recurrent state after a prefill into a cache
    and a decode step. The graphs are the ones the torch path ran, so this checks the arguments
    the passes hand the ops (strides, layout, the cache's state updated in place) on the kernels."""
    name, model, compiled = family
    if name not in ("qwen3_next", "kimi_linear"):
        pytest.skip("one GDN and one KDA family: the Qwen3.5 families call the same ops")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the model is on the CPU and Triton is not interpreted (test_compile_cuda.py on GPU)")
    exercised(family)  # the graphs exist: only kernels run below (the interpreter: ~10 s)
    used = spy_implementations(monkeypatch)
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "triton")
    before = len(compiled.graph_log.graphs)
    check_cached_prefill_and_step(name, model, compiled)
    assert compiled.graph_log.graphs[before:] == []
    # Every graphdelta op of the graphs ran, and on its Triton kernel only.
    assert used == {op: {module} for op, module in TRITON_MODULES.items()}


@torch.no_grad()
def exercised(family) -> "graphdelta.compiler.CompiledModel":
    """The family's compiled model after a prefill without a cache, one into a cache and a
    decode step: the graphs the numerical tests compile, for tests that read the graph log
    (and may run alone). Calls whose graphs exist compile nothing."""
    _, _, compiled = family
    prefill, step = CACHED
    compiled(models.tokens(LENGTHS[-1]), use_cache=False)
    out = compiled(models.tokens(prefill), use_cache=True)
    compiled(models.tokens(step, seed=7), **models.cached(compiled, out), use_cache=True)
    return compiled


def test_graph_holds_graphdelta_ops(family):
    name = family[0]
    compiled = exercised(family)
    graphs = compiled.graph_log.graphs
    n_linear = sum(1 for lp in compiled.plan.layers if any(r.callee != "forward" for r in lp.regions))
    norms = [lp for lp in compiled.plan.layers if [r.op for r in lp.regions] == ["graphdelta::gated_rms_norm"]]
    assert n_linear == len(norms) == 3
    prefill = [g for g in graphs if "chunk_gated_delta_rule" in g.graphdelta_ops]
    decode = [g for g in graphs if "recurrent_gated_delta_rule" in g.graphdelta_ops]
    assert prefill and decode
    for g in prefill:
        assert g.graphdelta_ops["chunk_gated_delta_rule"] == n_linear
        assert g.graphdelta_ops["causal_conv1d"] == n_linear
    for g in decode:
        assert g.graphdelta_ops["causal_conv1d_update"] == n_linear
    for g in graphs:
        # the full-attention layer runs SDPA without a materialized mask, as in eager
        assert g.attention == {"unmasked": 1}, (name, g.attention)
        assert g.norm_gates == n_linear, (name, g.norm_gates)  # the gate keeps its shape (passes/norm_gate.py)
        assert g.graphdelta_ops["gated_rms_norm"] == n_linear
        assert not g.leftovers, (name, g.leftovers)  # no solve_triangular
        assert g.matmuls == 0, (name, g.matmuls)  # no per-chunk matmul chain
    counters = compiled.plan.counters
    assert counters["gated_delta_chunk"] == counters["gated_delta_recurrent"] == n_linear
    assert counters["conv"] == counters["conv_update"] == counters["gated_norm"] == n_linear


@torch.no_grad()
def test_one_prefill_graph_for_all_lengths(family):
    name, model, compiled = family
    if name != "qwen3_5":
        pytest.skip("one family is enough: the graph count does not depend on the family")
    exercised(family)
    before = len(compiled.graph_log.graphs)
    for length in ONE_GRAPH_LENGTHS:
        compiled(models.tokens(length), use_cache=False)
    compiled(models.tokens(700)[:, :300], use_cache=False)  # a slice: strides of a longer prompt
    new = compiled.graph_log.graphs[before:]
    # exercised compiled the no-cache prefill graph: no length or stride here needs another.
    assert new == [], [g.reason for g in new]
    ids = models.tokens(ONE_GRAPH_LENGTHS[-1])
    assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < RTOL


@torch.no_grad()
def test_packed_position_ids_keep_their_mask(family):
    """Positions that restart mid-row mark packed sequences: SDPA must get transformers' mask."""
    name, model, compiled = family
    if name != "qwen3_5":
        pytest.skip("one family is enough: the masking code is transformers' own")
    ids = models.tokens(60)
    positions = torch.cat([torch.arange(30), torch.arange(30)])[None]
    ref = model(ids, position_ids=positions, use_cache=False).logits
    before = len(compiled.graph_log.graphs)
    out = compiled(ids, position_ids=positions, use_cache=False).logits
    assert rel_err(out, ref) < RTOL
    assert [g.attention for g in compiled.graph_log.graphs[before:]] == [{"masked": 1}]
    # the packed mask matters: without it the second half would attend to the first
    assert rel_err(model(ids, use_cache=False).logits, ref) > 1e-2


@torch.no_grad()
def test_generate_matches_transformers(family):
    """``compiled.generate`` is transformers' generate over the compiled graphs: the same greedy
    tokens for a left-padded batch and for a prefill in chunks, and a second prompt length
    reuses its graphs."""
    name, model, compiled = family
    if name not in ("qwen3_5", "kimi_linear"):
        pytest.skip("one GDN and one KDA family: generate is transformers' own code")
    new = []
    for length in (30, 47):
        ids = models.tokens(length, batch=2)
        mask = torch.ones_like(ids)
        mask[1, :9] = 0
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        before = len(compiled.graph_log.graphs)
        out = compiled.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        new.append(compiled.graph_log.graphs[before:])
        assert torch.equal(out, ref), (name, length)
        assert "forward" not in vars(model)  # the module is left as it was
    # the first length compiled generate's prefill (graphdelta's op in it); the second, nothing
    assert any("chunk_gated_delta_rule" in g.graphdelta_ops for g in new[0]), [g.reason for g in new[0]]
    assert new[1] == [], [g.reason for g in new[1]]
    # a chunked prefill: later chunks start from the state the earlier ones left in the cache
    ids = models.tokens(150)
    ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=64), ref)


@given(data=st.data())
@settings(max_examples=max(4, settings().max_examples // 4))
@torch.no_grad()
def test_random_padded_batches_match_eager(family, data):
    """Drawn batches: 2-3 prompts of one drawn length with drawn left padding (as transformers'
    generate pads), a prefill into a cache and 0-2 decode steps (batch 1, which Dynamo
    specializes into graphs of its own, is the other tests'). The logits of every real
    token match eager's; the graphs are the compiled model's shared ones, so after the first
    examples nothing compiles and every call checks the fused graphs on new shapes. It runs
    after the tests that inspect every graph (padded prompts need a masked SDPA)."""
    name, model, compiled = family
    if name not in ("qwen3_5", "kimi_linear"):
        pytest.skip("one GDN and one KDA family: the padding code is transformers' own")
    if name == "kimi_linear" and os.environ.get("GRAPHDELTA_SLOW") != "1":
        pytest.skip("slow: set GRAPHDELTA_SLOW=1 to run it (its padded graphs compile for ~20 s)")
    batch = data.draw(st.integers(2, 3), label="batch")
    length = data.draw(st.integers(1, 150), label="length")
    pads = data.draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch), label="left pads")
    steps = data.draw(st.integers(0, 2), label="decode steps")
    ids = models.tokens(length, batch=batch, seed=data.draw(st.integers(0, 2**16), label="seed"))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    real = mask.bool()
    ref = model(ids, attention_mask=mask, use_cache=True)
    out = compiled(ids, attention_mask=mask, use_cache=True)
    assert rel_err(out.logits[real], ref.logits[real]) < RTOL
    for step in range(steps):
        nxt = ref.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        ref = model(nxt, attention_mask=mask, **models.cached(model, ref), use_cache=True)
        out = compiled(nxt, attention_mask=mask, **models.cached(compiled, out), use_cache=True)
        assert rel_err(out.logits, ref.logits) < RTOL, step


def test_gradients_run_the_original_model(family):
    """With gradients on and parameters that require them, a call runs the model as it is (the
    ops have no backward; AOT autograd would fail to compile): eager's gradients, and a warning
    that says how to get graphdelta's ops. Under no_grad the fused graphs serve again."""
    name, model, compiled = family
    if name != "qwen3_next":
        pytest.skip("one family, the one compiled through AOT autograd")
    ids = models.tokens(40)
    with torch.no_grad():
        compiled(ids, use_cache=False)  # the no-cache prefill graph, if no test compiled it yet
    model.zero_grad()
    model(ids, use_cache=False).logits.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if "linear_attn" in n and p.grad is not None}
    model.zero_grad()
    with pytest.warns(UserWarning, match="torch.no_grad"):
        out = compiled(ids, use_cache=False)
    out.logits.square().mean().backward()
    assert ref and all(rel_err(dict(model.named_parameters())[n].grad, g) < 1e-3 for n, g in ref.items())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        before = len(compiled.graph_log.graphs)
        compiled(models.tokens(41), use_cache=False)
    assert compiled.graph_log.graphs[before:] == []


@pytest.mark.parametrize("family_name,dtype", [
    ("qwen3_5", torch.bfloat16), ("qwen3_5", torch.float16), ("kimi_linear", torch.bfloat16)])
@torch.no_grad()
def test_low_precision_model_is_fused(family_name, dtype):
    """A bf16 or fp16 model is recognized like a float32 one (the numerical checks run in float32)
    and is no further from the float32 model than eager is. Accuracy is checked on the dense
    family: in the MoE families a low-precision rounding flips expert choices, eager's too."""
    model = models.build(family_name).to(dtype)
    compiled = compile_fused(model, backend="eager")
    counters = compiled.plan.counters
    assert counters["gated_delta_chunk"] == counters["conv"] == counters["gated_norm"] == 3, counters
    ids, nxt = models.tokens(70), models.tokens(1, seed=3)
    out = compiled(ids, use_cache=True)
    out2 = compiled(nxt, **models.cached(compiled, out), use_cache=True)
    assert out.logits.dtype == dtype and torch.isfinite(out2.logits).all()
    if family_name != "qwen3_5":
        return
    exact = models.build(family_name)
    ref = exact(ids, use_cache=True)
    ref2 = exact(nxt, **models.cached(exact, ref), use_cache=True)
    low = model(ids, use_cache=True)
    low2 = model(nxt, **models.cached(model, low), use_cache=True)
    for got, eager, truth in ((out, low, ref), (out2, low2, ref2)):
        assert rel_err(got.logits.float(), truth.logits) <= 1.5 * rel_err(eager.logits.float(), truth.logits) + 1e-3


@torch.no_grad()
def test_image_text_model_is_fused():
    """Qwen3.5 checkpoints load as ``Qwen3_5ForConditionalGeneration``: its text layers are fused
    like the causal LM's, and a prompt with an image gives eager's logits and greedy tokens."""
    model = models.build_multimodal("qwen3_5")
    compiled = compile_fused(model, backend="eager")
    counters = compiled.plan.counters
    assert counters["gated_delta_chunk"] == counters["gated_delta_recurrent"] == counters["conv"] == 3, counters
    ids = models.tokens(70, vocab=500)
    assert rel_err(compiled(ids).logits, model(ids).logits) < RTOL
    prompt = dict(models.image_prompt(40), max_new_tokens=4, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    ref, out = model.generate(**prompt), compiled.generate(**prompt)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(rel_err(got, want) < RTOL for got, want in zip(out.logits, ref.logits, strict=True))
    assert any("chunk_gated_delta_rule" in g.graphdelta_ops for g in compiled.graph_log.graphs)


@torch.no_grad()
def test_state_layouts_agree():
    model = models.build("qwen3_next")
    ids, nxt = models.tokens(80), models.tokens(1, seed=3)
    logits, states = {}, {}
    for layout in ("kv", "vk"):
        compiled = graphdelta.compile(model, backend="eager", state_layout=layout)
        out = compiled(ids, use_cache=True)
        out2 = compiled(nxt, **models.cached(compiled, out), use_cache=True)
        assert all(lp.state_layout == layout for lp in compiled.plan.layers
                   if any(r.op.endswith("gated_delta_rule") for r in lp.regions))
        logits[layout] = (out.logits, out2.logits)
        states[layout] = hf.output_cache(out2).layers[0].recurrent_states[0]
    ref = model(ids, use_cache=True)
    ref2 = model(nxt, **models.cached(model, ref), use_cache=True)
    for layout, (a, b) in logits.items():
        assert rel_err(a, ref.logits) < RTOL and rel_err(b, ref2.logits) < RTOL, layout
    # the cache holds the layout the kernels use: vk is the transpose of kv
    assert rel_err(states["vk"], states["kv"].transpose(-1, -2)) < RTOL


def test_explain_reports_layers_and_graphs(family):
    compiled = exercised(family)
    text = graphdelta.explain(compiled)
    assert "-> graphdelta::chunk_gated_delta_rule" in text
    assert "-> graphdelta::recurrent_gated_delta_rule" in text
    assert "-> graphdelta::causal_conv1d_update" in text
    assert "state layout: kv" in text
    assert f"graphs compiled so far: {len(compiled.graph_log.graphs)}" in text
    assert "compiled because: first call" in text
    # a recompile names the guards that missed: those of this model's earlier graphs of the frame
    graphs = compiled.graph_log.graphs
    recompiles = [g for g in graphs if g.reason.startswith("guard failed: ")]
    assert recompiles, [g.reason for g in graphs]
    ids = {g.compile_id for g in graphs}
    for g in recompiles:
        frame, n = g.compile_id.split("/")
        for failure in g.reason.removeprefix("guard failed: ").split(" | "):
            entry = failure.split(": ")[0]
            assert entry in ids and entry.split("/")[0] == frame and int(entry.split("/")[1]) < int(n), \
                (g.compile_id, failure)


def test_compiled_model_reads_through_to_the_model(family):
    from graphdelta.runtime.runner import unwrap

    _, model, compiled = family
    assert compiled.device == model.device and compiled.dtype == model.dtype
    assert compiled.generation_config is model.generation_config
    assert compiled.get_input_embeddings() is model.get_input_embeddings()
    assert unwrap(compiled) is model and unwrap(model) is model
    with pytest.raises(AttributeError, match="no_such_attribute"):
        compiled.no_such_attribute


def test_report_command_line(tmp_path, capsys):
    from graphdelta import report

    models.config("qwen3_5").save_pretrained(tmp_path)
    assert report.main([str(tmp_path), "--lengths", "20", "--backend", "eager"]) == 0
    text = capsys.readouterr().out
    assert "replaced torch_chunk_gated_delta_rule -> graphdelta::chunk_gated_delta_rule" in text
    assert "graphs compiled so far: 1" in text


@torch.no_grad()
def test_inductor_matches_eager_and_inlines_the_norm_and_conv(monkeypatch):
    """The default backend end to end, one prefill graph: eager's logits, and on CPU the gated
    RMSNorm and the causal conv1d decomposed into inductor's own kernels (their op bodies never
    run)."""
    from graphdelta.lowering import torch_conv, torch_norm

    model = models.build("qwen3_5")
    compiled = graphdelta.compile(model, state_layout="kv")
    real_calls = []

    def counting(module, name):
        original = getattr(module, name)

        def counted(x, *args):
            if type(x) is torch.Tensor:  # not a fake or functional tensor of a trace
                real_calls.append((name, x.shape))
            return original(x, *args)

        monkeypatch.setattr(module, name, counted)

    counting(torch_norm, "gated_rms_norm")
    counting(torch_conv, "causal_conv1d")
    ids = models.tokens(100)
    out = compiled(ids, use_cache=False).logits
    assert rel_err(out, model(ids, use_cache=False).logits) < RTOL
    graphs = compiled.graph_log.graphs
    assert all(g.graphdelta_ops.get("gated_rms_norm") == 3 for g in graphs)
    # Dynamo may restart a trace once when the backend asks (the log says why): one graph ran.
    assert len([g for g in graphs if "; backend gave up" not in g.reason]) == 1
    assert real_calls == []


# GDN head shapes beyond the tiny configs' (GVA ratio 2, K = V): three value heads per key
# head with V = 2K, and (marked slow: ~30 s) as many value heads as key heads.
HEAD_SHAPES = {
    "ratio_3_v_2k": dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_value_head_dim=64),
    "ratio_1": dict(linear_num_key_heads=2, linear_num_value_heads=2),
}


@pytest.mark.parametrize("shape", [pytest.param(s, marks=[pytest.mark.slow] if s == "ratio_1" else [])
                                   for s in HEAD_SHAPES])
@torch.no_grad()
def test_other_head_shapes_are_fused(shape):
    import transformers

    cfg = models.config("qwen3_5")
    for key, value in HEAD_SHAPES[shape].items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(cfg).eval()
    compiled = compile_fused(model, backend="eager", state_layout="vk")
    assert compiled.plan.counters["gated_delta_chunk"] == 3, compiled.plan.counters
    for length in (1, 65):
        ids = models.tokens(length, batch=2)
        assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < RTOL, length
    ids, nxt = models.tokens(70), models.tokens(1, seed=3)
    ref, out = model(ids, use_cache=True), compiled(ids, use_cache=True)
    ref2 = model(nxt, **models.cached(model, ref), use_cache=True)
    out2 = compiled(nxt, **models.cached(compiled, out), use_cache=True)
    assert rel_err(out.logits, ref.logits) < RTOL and rel_err(out2.logits, ref2.logits) < RTOL
