"""graphdelta.compile on any ``nn.Module``: no config and no probe (the first call of each kind
is the probe, and a decode step found later is fused when it first runs), a root module that
calls the rule itself, and recognition per call site (two layers calling one function with
different arguments each get their own confirmed variants, and a call never confirmed runs as
written and says so)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphdelta
import handwritten
from lookalikes import delta_rule

RTOL = 1e-4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def graphdelta_ops(compiled) -> dict[str, int]:
    total: dict[str, int] = {}
    for g in compiled.graph_log.graphs:
        for op, n in g.graphdelta_ops.items():
            total[op] = total.get(op, 0) + n
    return total


@torch.no_grad()
def test_model_without_config_probes_on_its_own_calls():
    torch._dynamo.reset()
    model = handwritten.build("delta")
    assert not hasattr(model, "config")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = graphdelta.compile(model, backend="eager", state_layout="kv")
    assert not [w for w in caught if "graphdelta" in str(w.message)]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 45), generator=gen)
    for _ in range(2):  # the first call is the probe (eager), the second runs compiled
        assert rel_err(compiled(ids), model(ids)) < RTOL
    ops = {lp.path: {r.callee for r in lp.regions} for lp in compiled.plan.layers}
    assert ops["mixers.0"] == {"delta_chunks", "tap_mix"}  # decode not reached yet
    assert graphdelta_ops(compiled).get("chunk_gated_delta_rule") == 2
    # prefill into memory, then decode steps: new kinds of call, each probed when it first runs
    ref_mem, out_mem = [{} for _ in model.mixers], [{} for _ in model.mixers]
    assert rel_err(compiled(ids, out_mem), model(ids, ref_mem)) < RTOL
    for t in range(3):
        step = ids[:, t:t + 1]
        assert rel_err(compiled(step, out_mem), model(step, ref_mem)) < RTOL
        assert rel_err(out_mem[1]["state"], ref_mem[1]["state"]) < RTOL
    ops = {lp.path: {r.callee for r in lp.regions} for lp in compiled.plan.layers}
    assert ops["mixers.1"] == {"delta_chunks", "delta_tokens", "tap_mix"}
    assert graphdelta_ops(compiled).get("recurrent_gated_delta_rule", 0) >= 2
    assert "kind(s) of call so far" in graphdelta.explain(compiled)


def test_model_without_probe_refuses_vk():
    """Its probes run the original functions on the caller's states, which read kv."""
    with pytest.raises(ValueError, match="state_layout='vk' needs a probe"):
        graphdelta.compile(handwritten.build("delta"), backend="eager", state_layout="vk")


class RootRule(nn.Module):
    """No layers: the root module's own forward calls the rule."""

    def __init__(self, vocab: int = 64, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, 2 * 8 + 2 * 8 + 4)
        self.head = nn.Linear(2 * 8, vocab)

    def forward(self, ids: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        b, t = ids.shape
        q, k, v, a = self.proj(self.embed(ids)).split([8, 8, 16, 4], dim=-1)
        q, k = (F.normalize(x.reshape(b, t, 1, 8), dim=-1) for x in (q, k))
        g, beta = -F.softplus(a[..., :2]), torch.sigmoid(a[..., 2:])
        o, _ = delta_rule(q, k, v.reshape(b, t, 2, 8), g, beta)
        return self.head(o.reshape(b, t, -1))


@torch.no_grad()
def test_root_module_function_is_replaced():
    torch._dynamo.reset()
    model = RootRule().eval()
    compiled = graphdelta.compile(model, backend="eager", probe=lambda m: m(torch.zeros(1, 20, dtype=torch.long)))
    root = next(lp for lp in compiled.plan.layers if lp.path == "")
    assert {r.callee for r in root.regions} == {"delta_rule"}
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(2))
    assert rel_err(compiled(ids), model(ids)) < RTOL
    assert graphdelta_ops(compiled) == {"chunk_gated_delta_rule": 1}  # the replacement ran
    assert "layer (root) (RootRule)" in graphdelta.explain(compiled)


def scaled_rule(q, k, v, g, beta, state=None, sharpen=1.0):
    """The rule on sharpened keys (sharpen=1: the rule itself; else: not the rule)."""
    return delta_rule(q, k * sharpen, v, g, beta, state)


class TwoSites(nn.Module):
    """Two layers call ``scaled_rule``, with different plain arguments."""

    def __init__(self):
        super().__init__()
        self.a = Site(1.0)
        self.b = Site(2.0)

    def forward(self, x, sharpen_a=1.0):
        return self.b(self.a(x, sharpen_a))


class Site(nn.Module):
    def __init__(self, sharpen: float):
        super().__init__()
        self.sharpen = sharpen
        self.proj = nn.Linear(16, 36)

    def forward(self, x, sharpen=None):
        b, t, _ = x.shape
        q, k, v, a = self.proj(x).split([8, 8, 16, 4], dim=-1)
        q, k = (F.normalize(y.reshape(b, t, 1, 8), dim=-1) for y in (q, k))
        g, beta = -F.softplus(a[..., :2]), torch.sigmoid(a[..., 2:])
        o, _ = scaled_rule(q, k, v.reshape(b, t, 2, 8), g, beta, sharpen=self.sharpen if sharpen is None else sharpen)
        return x + o.reshape(b, t, 16)


@torch.no_grad()
def test_recognition_is_per_call_site():
    """Layer a calls with sharpen=1 (the rule), layer b with sharpen=2 (not the rule: keys of
    twice the norm): a is replaced, b is kept, and a call of a with an argument never confirmed
    runs as written and is reported."""
    torch._dynamo.reset()
    model = TwoSites().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = graphdelta.compile(model, backend="eager", state_layout="kv",
                                      probe=lambda m: m(torch.randn(1, 20, 16)))
    regions = {lp.path: {r.callee for r in lp.regions} for lp in compiled.plan.layers}
    assert regions["a"] == {"scaled_rule"} and regions["b"] == set()
    assert any("layer b: scaled_rule kept as written" in str(w.message) for w in caught)
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(4))
    assert rel_err(compiled(x), model(x)) < RTOL
    assert rel_err(compiled(x, 3.0), model(x, 3.0)) < RTOL  # never confirmed: runs as written
    report = graphdelta.explain(compiled)
    assert "a call with arguments never confirmed ran as written" in report and "3.0" in report
    # explain lists the kept chain's operations left in the first call's graph (layer b's)
    assert compiled.graph_log.graphs[0].leftovers == {"linalg_solve_triangular": 2}  # its two solves
