"""Coverage: the gated delta rule is fused however it is written (``styles.py``: 12 chunked and
5 token-loop styles: factored or masked decays (KDA's too), chunk sizes 16 to 256, the inverse by
``linalg.inv``, doubling products, a right-hand ``solve_triangular``, ``linalg.solve`` or row
substitution, outputs from stored chunk states, KDA heads-last with ``einsum``, a vk state in
the user's code, heads-first arguments, GVA by expand and by indexing).

One model holds every style in a layer of its own. Each style must equal the float64
reference, be fused in prefill and decode (the ops show in the profiler), give eager's outputs,
and compile one prefill graph for every prompt length from 2 to 600 (length 1 gets a graph of
its own: Dynamo specializes sizes of 1).

The layout pass's choice for kv code is a measurement; here it is fixed so that one kv style
(``FLIPPED``, K != V so a misread state cannot go unnoticed) is held vk by the compiled model and
every other keeps its own layout: the cache the user passes then holds that layer's state as
``[.., V, K]``, and everything else must be unchanged.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import graphdelta
import styles
from graphdelta import reference
from graphdelta.passes import layout

RTOL = 1e-4
LENGTHS = (2, 65, 600)
FLIPPED = 1  # doubling_inverse with V = 16: the one kv style of its head shape


def _native(style: styles.Style) -> str:
    return "vk" if style.state_vk else "kv"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def styled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = styles.StyleLM().eval()
    f = styles.STYLES[FLIPPED]
    flip = (f.heads, f.value_heads, f.key_dim, f.value_dim)

    def measure(shape, per_channel, device):
        return ("vk", "measured: vk (set by the test)") if tuple(shape[1:]) == flip else ("kv", "measured: kv")

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("always")
        mp.setattr(layout, "measure", measure)
        compiled = graphdelta.compile(model, backend="eager", probe=styles.probe)
    assert not [str(w.message) for w in caught if "graphdelta" in str(w.message)]
    return model, compiled


def _inputs(style: styles.Style, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, H, HV, K, V = 2, style.heads, style.value_heads, style.key_dim, style.value_dim
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, HV, *((K,) if style.per_channel else ()), generator=gen) * 2
    beta = 2 * torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("fn_name", sorted({f.__name__ for s in styles.STYLES for f in (s.chunks, s.steps)}))
def test_style_matches_the_reference(fn_name):
    style, fn = next((s, f) for s in styles.STYLES for f in (s.chunks, s.steps) if f.__name__ == fn_name)
    for T in (1, 37, 70):
        q, k, v, g, beta, h0 = _inputs(style, T, seed=T)
        ref_o, ref_s = reference.gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                                  initial_state=h0.double(), output_final_state=True)
        args = [q, k, v, g, beta]
        if style.heads_first:
            args = [x.transpose(1, 2) for x in args]
        o, s = fn(*args, h0.transpose(-1, -2) if style.state_vk else h0)
        o = o.transpose(1, 2) if style.heads_first else o
        s = s.transpose(-1, -2) if style.state_vk else s
        assert rel_err(o, ref_o) < RTOL and rel_err(s, ref_s) < RTOL, (fn_name, T)


def test_every_style_is_fused(styled):
    _, compiled = styled
    for i, style in enumerate(styles.STYLES):
        lp = next(lp for lp in compiled.plan.layers if lp.path == f"mixers.{i}")
        assert {r.callee: r.op for r in lp.regions} == {
            "delta": "graphdelta::chunk_gated_delta_rule", "step": "graphdelta::recurrent_gated_delta_rule"}, i
        assert lp.state_layout == ("vk" if i == FLIPPED else _native(style)), (i, lp.layout_reason)
        assert lp.flipped == (i == FLIPPED), i
    report = graphdelta.explain(compiled)
    for form in ("chunk size 16", "chunk size 256", "inverse: linalg.inv", "inverse: linalg.solve",
                 "inverse: forward substitution or products", "decay: factored exponentials",
                 "decay: masked difference", "arguments heads first", "state vk in the function's code",
                 "per-channel (KDA) gate", "vk, the user's own layout"):
        assert form in report, form


def _profiled_ops(fn) -> tuple:
    """``fn()`` and how many times each graphdelta op ran in it, by the profiler's op names (a
    custom op shows as more than one event per call: counts are divided by one call's)."""
    def events(run) -> dict[str, int]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = run()
        return out, {e.key: e.count for e in prof.key_averages() if e.key.startswith("graphdelta::")}

    q = torch.randn(1, 3, 1, 8)
    _, one = events(lambda: torch.ops.graphdelta.chunk_gated_delta_rule(
        q, q, q, -torch.rand(1, 3, 1), torch.rand(1, 3, 1), 0.3, None, None, False, "kv"))
    per_call = one["graphdelta::chunk_gated_delta_rule"]
    out, counts = events(fn)
    return out, {name: n // per_call for name, n in counts.items()}


@torch.no_grad()
def test_one_prefill_graph_for_every_length(styled):
    model, compiled = styled
    gen = torch.Generator().manual_seed(3)
    layers = len(styles.STYLES)
    compiled(torch.randint(0, 64, (1, LENGTHS[0]), generator=gen))  # compiles (and runs the ops while it does)
    before = len(compiled.graph_log.graphs)
    for T in LENGTHS:
        ids = torch.randint(0, 64, (1, T), generator=gen)
        out, ops = _profiled_ops(lambda: compiled(ids))
        assert rel_err(out, model(ids)) < RTOL, T
        assert ops.get("graphdelta::chunk_gated_delta_rule") == layers, ops
    assert len(compiled.graph_log.graphs) == before  # no length compiled a graph of its own
    ids = torch.randint(0, 64, (1, 1), generator=gen)
    assert rel_err(compiled(ids), model(ids)) < RTOL


@torch.no_grad()
def test_cached_prefill_and_four_decode_steps(styled):
    model, compiled = styled
    ids = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(4))
    ref_cache, out_cache = {}, {}
    assert rel_err(compiled(ids, out_cache), model(ids, ref_cache)) < RTOL
    for t in range(4):
        step = ids[:, t:t + 1]
        graphs = len(compiled.graph_log.graphs)
        out, ops = _profiled_ops(lambda: compiled(step, out_cache))
        assert rel_err(out, model(step, ref_cache)) < RTOL, t
        if len(compiled.graph_log.graphs) == graphs:  # a call that compiled ran the ops twice
            assert ops.get("graphdelta::recurrent_gated_delta_rule") == len(styles.STYLES), ops
    for i in range(len(styles.STYLES)):  # the state, in the layout each layer holds it
        held = ref_cache[i].transpose(-1, -2) if i == FLIPPED else ref_cache[i]
        assert out_cache[i].shape == held.shape and rel_err(out_cache[i], held) < RTOL, i
