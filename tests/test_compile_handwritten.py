"""graphdelta.compile on a gated-delta model written unlike transformers (``handwritten.py``):
recognized from its structure and numbers, fused, equal to eager; and two look-alikes that
must stay as written, with a warning naming the layer, and still give eager's answer."""
from __future__ import annotations

import warnings

import pytest
import torch

import graphdelta
import handwritten

LENGTHS = (5, 33, 100)  # 1, 2 and 4 chunks of 32
RTOL = 1e-4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def compile_recording(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = graphdelta.compile(model, backend="eager", probe=handwritten.probe, state_layout="kv")
    return compiled, [str(w.message) for w in caught if "graphdelta" in str(w.message)]


@torch.no_grad()
def check_against_eager(model, compiled, lengths=LENGTHS, cached: bool = True) -> None:
    gen = torch.Generator().manual_seed(3)
    for length in lengths:
        ids = torch.randint(0, 256, (1, length), generator=gen)
        assert rel_err(compiled(ids), model(ids)) < RTOL, length
    if not cached:
        return
    ids = torch.randint(0, 256, (1, 45), generator=gen)
    ref_mem, out_mem = [{} for _ in model.mixers], [{} for _ in model.mixers]
    assert rel_err(compiled(ids, out_mem), model(ids, ref_mem)) < RTOL
    step = ids[:, -1:]
    assert rel_err(compiled(step, out_mem), model(step, ref_mem)) < RTOL
    assert rel_err(out_mem[0]["state"], ref_mem[0]["state"]) < RTOL


@pytest.fixture(scope="module")
def fused():
    model = handwritten.build("delta")
    compiled, messages = compile_recording(model)
    return model, compiled, messages


def test_handwritten_is_fused(fused):
    _, compiled, messages = fused
    assert messages == []
    for i in range(2):
        ops = {lp.path: {r.callee: r.op for r in lp.regions} for lp in compiled.plan.layers}
        assert ops[f"mixers.{i}"] == {
            "delta_chunks": "graphdelta::chunk_gated_delta_rule",
            "delta_tokens": "graphdelta::recurrent_gated_delta_rule",
            "tap_mix": "graphdelta::causal_conv1d",
        }
        assert ops[f"mixers.{i}.out_norm"] == {"forward": "graphdelta::gated_rms_norm"}
    norm = next(lp for lp in compiled.plan.layers if lp.path == "mixers.0.out_norm").regions[0]
    assert "confirmed: sigmoid gate, gate, then norm, x='values', gate='gate'" in norm.evidence
    chunk = next(r for r in compiled.plan.layers[0].regions if r.callee == "delta_chunks")
    evidence = " ".join(chunk.evidence)
    assert "chunk size 32" in evidence and "forward substitution" in evidence and "per-channel" in evidence


def test_handwritten_matches_eager(fused):
    model, compiled, _ = fused
    check_against_eager(model, compiled)
    graphs = compiled.graph_log.graphs
    assert graphs and all(not g.leftovers and g.matmuls == 0 for g in graphs)
    prefill = [g for g in graphs if "chunk_gated_delta_rule" in g.graphdelta_ops]
    assert prefill and all(g.graphdelta_ops["chunk_gated_delta_rule"] == 2 for g in prefill)
    assert all(g.graphdelta_ops["gated_rms_norm"] == 2 for g in graphs)


def test_kernel_dispatcher_is_seen_through():
    model = handwritten.build("dispatched")
    compiled, messages = compile_recording(model)
    assert messages == []
    last = next(lp for lp in compiled.plan.layers if lp.path == "mixers.1")
    ops = {r.callee: r.op for r in last.regions}
    assert ops["dispatched_chunks"] == "graphdelta::chunk_gated_delta_rule"
    assert ops["dispatched_tap_mix"] == "graphdelta::causal_conv1d"
    check_against_eager(model, compiled, lengths=(40,), cached=False)


def test_lookalike_norm_is_kept_and_warned():
    model = handwritten.build("loose_norm")
    compiled, messages = compile_recording(model)
    assert any("layer mixers.1.out_norm: forward kept as written" in m and "no positive scalar eps" in m
               for m in messages), messages
    ops = {lp.path: [r.op for r in lp.regions] for lp in compiled.plan.layers}
    assert ops["mixers.0.out_norm"] == ["graphdelta::gated_rms_norm"] and ops["mixers.1.out_norm"] == []
    check_against_eager(model, compiled, lengths=(40,), cached=False)


@torch.no_grad()
def test_unrecognized_model_runs_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    with pytest.warns(UserWarning, match="no linear-attention region recognized in Sequential"):
        compiled = graphdelta.compile(model, backend="eager", probe=lambda m: m(torch.randn(2, 8)))
    x = torch.randn(3, 8)
    assert torch.allclose(compiled(x), model(x))
