"""graphdelta.compile on a GPU, with its default backend: inductor compiles the graphs and every
graphdelta op runs on its Triton kernel (on CUDA the CPU decompositions of the conv1d and the
gated RMSNorm decline). Logits and cache against eager, one prefill graph for every length, in
both state layouts, for GDN and KDA, in float32 and in bf16. Skipped without CUDA.

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


# (family, state layout, dtype): both layouts, GDN and KDA, and the models' own bf16
VARIANTS = [("qwen3_next", "kv", torch.float32), ("qwen3_next", "vk", torch.float32),
            ("kimi_linear", "vk", torch.float32), ("qwen3_next", "kv", torch.bfloat16)]
BF16_TOL = 3e-2  # norm-relative, bf16 compiled against bf16 eager (both round every layer)


def error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-relative in float32 (``test_compile.rel_err``), norm-relative in bf16, where a
    single rounding step of a large logit is already ~1e-2 of the largest."""
    if ref.dtype == torch.bfloat16:
        x, ref = x.double(), ref.double()
        return ((x - ref).norm() / ref.norm()).item()
    return rel_err(x, ref)


def tolerance(dtype: torch.dtype) -> float:
    return BF16_TOL if dtype == torch.bfloat16 else TOL


def ids_on_gpu(length: int, seed: int = 1) -> torch.Tensor:
    return models.tokens(length, seed=seed).cuda()


@torch.no_grad()
@pytest.mark.parametrize("family,layout,dtype", VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_model_matches_eager_on_the_kernels(family, layout, dtype, monkeypatch):
    """One prefill graph for every length, eager's logits; then a prefill into a cache and decode
    steps: eager's logits, and eager's recurrent state read in the layout the cache was given.
    One test per variant, so that parallel workers compile each model once."""
    # Eager's conv1d runs on cuDNN, which rounds float32 through TF32 by default; the kernels
    # and the rest of eager compute in full float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        model = models.build(family, device="cuda", dtype=dtype)
        compiled = compile_fused(model, state_layout=layout)
        tol = tolerance(dtype)
        used = spy_implementations(monkeypatch)
        for length in LENGTHS:
            ids = ids_on_gpu(length)
            err = error(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
            assert err < tol, (length, err)
        before = len(compiled.graph_log.graphs)
        for length in SAME_GRAPH_LENGTHS:
            ids = ids_on_gpu(length)
            err = error(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
            assert err < tol, (length, err)
        new = compiled.graph_log.graphs[before:]
        assert new == [], [g.reason for g in new]
        assert used.get("chunk_gated_delta_rule") == {"triton_chunk"}, used

        used.clear()
        ids = ids_on_gpu(PREFILL)
        ref, out = model(ids, use_cache=True), compiled(ids, use_cache=True)
        assert error(out.logits, ref.logits) < tol
        for step in range(STEPS):
            nxt = ids_on_gpu(1, seed=10 + step)
            ref = model(nxt, **models.cached(model, ref), use_cache=True)
            out = compiled(nxt, **models.cached(compiled, out), use_cache=True)
            err = error(out.logits, ref.logits)
            assert err < tol, (step, err)
        plan = next(lp for lp in compiled.plan.layers if lp.regions and lp.state_layout)
        assert plan.state_layout == layout
        index = plan.layer.module.layer_idx
        state = hf.output_cache(out).layers[index].recurrent_states[0]
        if layout == "vk":
            state = state.transpose(-1, -2)
        err = error(state, hf.output_cache(ref).layers[index].recurrent_states[0])
        assert err < tol, err
        assert used == {op: {module} for op, module in TRITON_MODULES.items()}, used
