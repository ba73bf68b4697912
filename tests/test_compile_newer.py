"""graphdelta.compile on hybrids it has no code for: the families transformers added after the
four the compiler was written against (``models.NEWER_FAMILIES``). Their layers are written
differently (separate q/k/v projections, beta in [0, 2], V = 2K, a lower-bounded KDA gate,
hyper-connections, an image-text wrapper), so fusing them shows that recognition is structural.

Each family: every linear-attention function is replaced (no warning), generate gives eager's
tokens and logits through a cached prefill and decode steps, a prompt without a cache gives
eager's logits, and the graphs hold graphdelta's ops and nothing of the chunk pipeline. The
state is kept in the vk layout, where V != K shows a transposed read. graphdelta's own runtime
runs OLMo-Hybrid and Bailing-Hybrid and refuses the others with an error naming them.

Qwen4-Exp and GLM-5-Next are marked slow (1-2 minutes each): transformers' token indexer in
their attention layers loops over query tokens with data-dependent shapes, and Dynamo splits
the model into a few dozen graphs around it.
"""
from __future__ import annotations

import pytest
import torch

import graphdelta
import models
from test_compile import RTOL, compile_fused, rel_err

SLOW = ("qwen4_exp", "glm5_next")


def _param(family: str):
    marks = [pytest.mark.slow] if family in SLOW else []
    if not models.newer_available(family):
        marks.append(pytest.mark.skip(reason=f"this transformers has no {models.NEWER_FAMILIES[family]}"))
    return pytest.param(family, marks=marks)


@pytest.mark.parametrize("family", [_param(f) for f in models.NEWER_FAMILIES])
@torch.no_grad()
def test_newer_family_is_fused_and_matches_eager(family):
    model = models.build_newer(family)
    compiled = compile_fused(model, backend="eager", state_layout="vk")
    counters = compiled.plan.counters
    # the 2-layer model: one linear-attention layer, one full (or indexed) attention layer
    for kind in ("gated_delta_chunk", "gated_delta_recurrent", "conv", "conv_update", "gated_norm"):
        assert counters[kind] == 1, (kind, dict(counters))
    assert not any(lp.fallbacks for lp in compiled.plan.layers)

    prompt = models.tokens(40)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompt, **kwargs)
    out = compiled.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert rel_err(a, b) < RTOL, step

    ids = models.tokens(130, seed=3)  # 3 chunks, no cache
    assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < RTOL

    graphs = compiled.graph_log.graphs
    ops = [name for g in graphs for name in g.graphdelta_ops]
    for op in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv1d", "causal_conv1d_update"):
        assert op in ops, (op, [g.graphdelta_ops for g in graphs])
    for g in graphs:
        assert not g.leftovers and g.matmuls == 0, (g.index, g.leftovers, g.matmuls)

    # the fixed-address runtime is written per family: OLMo-Hybrid's and Bailing-Hybrid's give
    # transformers' tokens (tests/test_runtime.py), the others are refused by name
    if family in ("olmo_hybrid", "bailing_hybrid"):
        tokens = graphdelta.generate(compiled, [prompt[0]], max_new_tokens=4, eos_token_id=[])
        assert tokens == [out.sequences[0, 40:].tolist()]
    else:
        with pytest.raises(NotImplementedError, match="runtime"):
            graphdelta.generate(compiled, [prompt[0]], max_new_tokens=1)


def test_image_text_only_models_load_through_the_image_text_auto_class():
    """``graphdelta explain DIR`` and ``graphdelta generate --model DIR`` pick the auto class:
    GLM-5-Next has no causal-LM class."""
    import transformers

    from graphdelta.assets import auto_model_class

    assert auto_model_class(models.config("qwen3_next")) is transformers.AutoModelForCausalLM
    if not models.newer_available("glm5_next"):
        pytest.skip("this transformers has no GLM-5-Next")
    assert auto_model_class(models.newer_config("glm5_next")) is transformers.AutoModelForImageTextToText
    with pytest.raises(ValueError, match="ViTConfig"):  # an image classifier
        auto_model_class(transformers.ViTConfig())
