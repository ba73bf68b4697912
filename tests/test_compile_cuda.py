"""graphdelta.compile on a GPU, with its default backend: inductor compiles the graphs and every
graphdelta op runs on its Triton kernel (on CUDA the CPU decompositions of the conv1d and the
gated RMSNorm decline). float32 logits and cache against eager, one prefill graph for every
length, and the cache in the state layout the layout pass measured. Skipped without CUDA.

With fla installed, transformers' eager runs fla's kernels instead of its own PyTorch code, and
those may round float32 products through TF32: the tolerance against eager is then looser.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import models
from graphdelta import hf
from test_compile import RTOL, TRITON_MODULES, compile_fused, rel_err, spy_implementations

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTHS = (63, 1, 65, 200)  # 1 and 2 chunks, a decode-sized prompt, 4 chunks
SAME_GRAPH_LENGTHS = (100, 257, 600)  # chunk counts 2, 5, 10: no new graph
PREFILL, STEPS = 70, 3
TOL = 2e-3 if importlib.util.find_spec("fla") is not None else RTOL


@pytest.fixture(scope="module", params=["qwen3_next", "kimi_linear"])
def on_gpu(request):
    # Eager's conv1d runs on cuDNN, which rounds float32 through TF32 by default; the kernels
    # and the rest of eager compute in full float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        model = models.build(request.param, device="cuda")
        yield request.param, model, compile_fused(model)


def ids_on_gpu(length: int, seed: int = 1) -> torch.Tensor:
    return models.tokens(length, seed=seed).cuda()


@torch.no_grad()
def test_logits_match_eager_with_one_prefill_graph(on_gpu, monkeypatch):
    name, model, compiled = on_gpu
    used = spy_implementations(monkeypatch)
    for length in LENGTHS:
        ids = ids_on_gpu(length)
        assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < TOL, length
    before = len(compiled.graph_log.graphs)
    for length in SAME_GRAPH_LENGTHS:
        ids = ids_on_gpu(length)
        assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < TOL, length
    new = compiled.graph_log.graphs[before:]
    assert new == [], [g.reason for g in new]
    assert used.get("chunk_gated_delta_rule") == {"triton_chunk"}, used


@torch.no_grad()
def test_cache_matches_eager_on_the_kernels(on_gpu, monkeypatch):
    """A prefill into a cache and decode steps: eager's logits, and the recurrent state eager
    holds, read in the layout the cache was given."""
    name, model, compiled = on_gpu
    used = spy_implementations(monkeypatch)
    ids = ids_on_gpu(PREFILL)
    ref, out = model(ids, use_cache=True), compiled(ids, use_cache=True)
    assert rel_err(out.logits, ref.logits) < TOL
    for step in range(STEPS):
        nxt = ids_on_gpu(1, seed=10 + step)
        ref = model(nxt, **models.cached(model, ref), use_cache=True)
        out = compiled(nxt, **models.cached(compiled, out), use_cache=True)
        assert rel_err(out.logits, ref.logits) < TOL, step
    plan = next(lp for lp in compiled.plan.layers if lp.regions and lp.state_layout)
    layer = plan.layer.module.layer_idx
    state = hf.output_cache(out).layers[layer].recurrent_states[0]
    if plan.state_layout == "vk":
        state = state.transpose(-1, -2)
    assert rel_err(state, hf.output_cache(ref).layers[layer].recurrent_states[0]) < TOL
    assert used == {op: {module} for op, module in TRITON_MODULES.items()}, used
