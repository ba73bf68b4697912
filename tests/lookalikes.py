"""A zoo of functions that look like the gated delta rule, and the two that are it.

``delta_rule`` (chunks of 16, heads-first, the decay as a masked difference, the inverse by
``solve_triangular``) and ``delta_steps`` (a token loop) compute the rule. Every entry of
``ZOO`` is one of them plus one change, made as an edit of its source (``variant``), the way a
user would write it: a clamp, a threshold, a periodic reset, a side effect, a container
argument, ... Each change is invisible on the inputs a model usually produces and visible on
others, so none may be replaced by a graphdelta op, unless it equals the rule on the whole input
domain (then it may be fused). ``ZooLM`` puts every entry in a layer of its own, so that one
``graphdelta.compile`` judges them all; ``tests/test_lookalikes.py`` checks the verdicts.
"""
from __future__ import annotations

import dataclasses
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 16
LOG: list = []  # written by a look-alike with a side effect
STATS = types.SimpleNamespace(calls=0)
CALLS = 0
SCALE = torch.full((2,), 1.0)  # a global tensor a look-alike reads


def delta_rule(q, k, v, g, beta, state=None):
    """The gated delta rule by chunks. q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV];
    state: [B, HV, K, V] or None. Returns (o [B, T, HV, V], final state [B, HV, K, V])."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    rep = HV // H
    q = q.repeat_interleave(rep, 2).transpose(1, 2).float() * K ** -0.5
    k = k.repeat_interleave(rep, 2).transpose(1, 2).float()
    v = v.transpose(1, 2).float()
    g = g.transpose(1, 2).float()
    beta = beta.transpose(1, 2).float()
    pad = (-T) % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // CHUNK
    q, k, v = (x.unflatten(2, (n, CHUNK)) for x in (q, k, v))
    g, beta = (x.unflatten(2, (n, CHUNK)) for x in (g, beta))
    G = g.cumsum(-1)
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2) * D).tril(-1)
    system = A + torch.eye(CHUNK, device=q.device)
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * G.exp()[..., None], upper=False, unitriangular=True)
    P = q @ k.transpose(-1, -2) * D
    S = q.new_zeros(B, HV, K, V) if state is None else state.float()
    out = []
    for i in range(n):
        c = u[:, :, i] - w[:, :, i] @ S
        out.append((q[:, :, i] * G[:, :, i, :, None].exp()) @ S + P[:, :, i] @ c)
        last = G[:, :, i, -1:]
        S = S * last[..., None].exp() + (k[:, :, i] * (last - G[:, :, i]).exp()[..., None]).transpose(-1, -2) @ c
    o = torch.stack(out, 2).flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o, S


def delta_steps(q, k, v, g, beta, state):
    """The same rule one token at a time (decode); state: [B, HV, K, V]."""
    B, T, H, K = q.shape
    rep = v.shape[2] // H
    q = q.repeat_interleave(rep, 2).float() * K ** -0.5
    k = k.repeat_interleave(rep, 2).float()
    S = state.float()
    outs = []
    for t in range(T):
        S = S * g[:, t, :, None, None].float().exp()
        err = v[:, t].float() - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None].float() * err)[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


def variant(base, name: str, edits: list[tuple[str, str]]):
    """``base`` with each ``(old, new)`` edit made once in its source, as a function ``name``."""
    source = textwrap.dedent(inspect.getsource(base))
    for old, new in edits:
        assert source.count(old) >= 1, (name, old)
        source = source.replace(old, new, 1)
    source = source.replace(f"def {base.__name__}(", f"def {name}(", 1)
    namespace = globals()
    exec(compile(source, f"{__file__}::{name}", "exec"), namespace)
    return namespace[name]


@dataclasses.dataclass
class Entry:
    name: str
    base: object  # delta_rule or delta_steps
    edits: list
    why: str  # a part of the reason it is kept; "" if it may be fused (equal on the whole domain)
    signature: str = ""  # a different call: "dict" passes options in a dict, "list" an output list


ZOO = [
    # ops that are the identity on typical inputs
    Entry("clamped_gate", delta_rule, [("g = g.transpose(1, 2).float()", "g = g.transpose(1, 2).float().clamp(min=-20)")], "clamp"),
    Entry("clamped_keys", delta_rule, [("k = k.repeat_interleave(rep, 2)", "k = k.clamp(-50, 50).repeat_interleave(rep, 2)")], "clamp"),
    Entry("clipped_beta", delta_rule, [("beta = beta.transpose(1, 2).float()", "beta = beta.transpose(1, 2).float().clip(0, 1)")], "clamp"),
    Entry("relu_beta", delta_rule, [("beta = beta.transpose(1, 2).float()", "beta = beta.transpose(1, 2).float().relu()")], "relu"),
    Entry("abs_gate", delta_rule, [("g = g.transpose(1, 2).float()", "g = -g.transpose(1, 2).float().abs()")], "abs"),
    Entry("nan_to_num_output", delta_rule, [("return o, S", "return torch.nan_to_num(o), S")], "nan_to_num"),
    Entry("threshold_beta", delta_rule, [("kb = k * beta[..., None]", "beta = torch.where(beta > 1e-3, beta, 0.0)\n    kb = k * beta[..., None]")], "compares data"),
    Entry("capped_state", delta_rule, [("    return o, S", "    S = torch.minimum(S, torch.full_like(S, 1e4))\n    return o, S")], "minimum"),
    Entry("max_subtracted", delta_rule, [("A = (kb @ k.transpose(-1, -2) * D).tril(-1)", "A = (kb @ k.transpose(-1, -2) * D).tril(-1)\n    A = A - A.amax(-1, keepdim=True) + A.amax(-1, keepdim=True)")], "amax"),
    Entry("data_mask", delta_rule, [("P = q @ k.transpose(-1, -2) * D", "P = q @ k.transpose(-1, -2) * D\n    P = P * (P.abs() < 1e6)")], "abs"),
    Entry("steep_gate_branch", delta_rule, [("G = g.cumsum(-1)", "if g.min() < -50:\n        g = g * 0.5\n    G = g.cumsum(-1)")], "not traceable"),
    Entry("rounded_keys", delta_rule, [("k = k.repeat_interleave(rep, 2).transpose(1, 2).float()", "k = k.repeat_interleave(rep, 2).transpose(1, 2).half().float()")], "rounds"),
    Entry("random_noise", delta_rule, [("v = v.transpose(1, 2).float()", "v = v.transpose(1, 2).float() + 0 * torch.rand_like(v.transpose(1, 2).float())")], "random"),
    Entry("sign_gate", delta_rule, [("G = g.cumsum(-1)", "G = (g * g.sign().abs()).cumsum(-1)")], "sign"),
    # behaviour past a length the usual check never reaches
    Entry("periodic_reset", delta_rule, [("        c = u[:, :, i]", "        if i % 5 == 4:\n            S = S * 0\n        c = u[:, :, i]")], "differs"),
    Entry("short_window", delta_rule, [("    for i in range(n):", "    for i in range(min(n, 6)):")], "differs"),
    Entry("long_prompt_branch", delta_rule, [("    return o, S", "    if T > 300:\n        o = o * 0.5\n    return o, S")], "differs"),
    Entry("far_branch", delta_rule, [("    return o, S", "    if T > 100000:\n        o = o * 0.5\n    return o, S")], "constant"),
    Entry("position_mask", delta_rule, [("    return o, S", "    o = o * (torch.arange(T, device=o.device) < 150)[None, :, None, None]\n    return o, S")], "differs"),
    Entry("capped_token_loop", delta_steps, [("    for t in range(T):", "    for t in range(min(T, 12)):")], "differs"),
    # the wrong computation, right on some inputs
    Entry("transposed_state", delta_rule, [("c = u[:, :, i] - w[:, :, i] @ S", "c = u[:, :, i] - w[:, :, i] @ S.transpose(-1, -2)")], "differs"),
    Entry("decay_after_update", delta_steps, [
        ("        S = S * g[:, t, :, None, None].float().exp()\n", ""),
        ("        outs.append(", "        S = S * g[:, t, :, None, None].float().exp()\n        outs.append(")], "differs"),
    Entry("normalized_values", delta_rule, [("v = v.transpose(1, 2).float()", "v = F.normalize(v.transpose(1, 2).float(), dim=-1)")], "linalg_vector_norm"),
    Entry("normalized_output", delta_rule, [("    return o, S", "    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)\n    return o, S")], "1e-06"),
    Entry("perturbed_scale", delta_rule, [("* K ** -0.5", "* (K ** -0.5 * 1.0001)")], "constant"),
    Entry("epsilon_output", delta_rule, [("    return o, S", "    return o + 1e-6, S")], "constant"),
    Entry("skipped_first_decay", delta_steps, [("        S = S * g[:, t, :, None, None].float().exp()", "        if t > 0:\n            S = S * g[:, t, :, None, None].float().exp()")], "differs"),
    Entry("global_scale", delta_rule, [("beta = beta.transpose(1, 2).float()", "beta = beta.transpose(1, 2).float() * SCALE[:, None]")], "constant tensor"),
    # side effects a replacement would not reproduce
    Entry("mutates_state", delta_steps, [("    S = state.float()", "    state.mul_(1.0)\n    S = state.float()")], "in place"),
    Entry("logs_to_global", delta_rule, [("    return o, S", "    LOG.append(T)\n    return o, S")], "side effects"),
    Entry("counts_in_attribute", delta_rule, [("    return o, S", "    STATS.calls += 1\n    return o, S")], "side effects"),
    Entry("rebinds_global", delta_rule, [("    B, T, H, K = q.shape", "    global CALLS\n    CALLS += 1\n    B, T, H, K = q.shape")], "global"),
    Entry("returns_intermediate", delta_rule, [("    return o, S", "    return o, S, A")], "does not return (output, state)"),
    Entry("options_in_dict", delta_rule, [("state=None):", "state=None, options=None):")], "is a dict", signature="dict"),
    Entry("appends_to_argument", delta_rule, [("state=None):", "state=None, outputs=None):"), ("    return o, S", "    outputs.append(o)\n    return o, S")], "is a list", signature="list"),
    # the rule itself, and changes equal to it on the whole domain: fused
    Entry("canonical", delta_rule, [], ""),
    Entry("finfo_min_mask", delta_rule, [('masked_fill(~causal, float("-inf"))', "masked_fill(~causal, torch.finfo(torch.float32).min)")], ""),
    Entry("times_one", delta_rule, [("kb = k * beta[..., None]", "kb = k * beta[..., None] * 1")], ""),
    Entry("explicit_float_casts", delta_steps, [("        outs.append(", "        S = S.float()\n        outs.append(")], ""),
]


class ZooMixer(nn.Module):
    """One layer: projections to q, k, v, g, beta and a call of ``delta`` (prefill) or ``step``
    (decode, with a cache), the module globals this layer's forward sees."""

    def __init__(self, width: int, heads: int = 1, value_heads: int = 2, head: int = 8, signature: str = ""):
        super().__init__()
        self.h, self.hv, self.d = heads, value_heads, head
        self.qk = nn.Linear(width, 2 * heads * head, bias=False)
        self.vp = nn.Linear(width, value_heads * head, bias=False)
        self.gb = nn.Linear(width, 2 * value_heads)
        self.out = nn.Linear(value_heads * head, width, bias=False)
        self.signature = signature

    def forward(self, x, cache=None, index=0):
        b, t, _ = x.shape
        q, k = self.qk(x).reshape(b, t, 2, self.h, self.d).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = self.vp(x).reshape(b, t, self.hv, self.d)
        a, z = self.gb(x).chunk(2, dim=-1)
        g, beta = -F.softplus(a) * 0.3, torch.sigmoid(z) * 2
        state = None if cache is None else cache.get(index)
        if state is not None and t == 1:
            got = step(q, k, v, g, beta, state)
        elif self.signature == "dict":
            got = delta(q, k, v, g, beta, state, options={"chunk": 16})
        elif self.signature == "list":
            got = delta(q, k, v, g, beta, state, outputs=[])
        else:
            got = delta(q, k, v, g, beta, state)
        o, state = got[0], got[1]
        if cache is not None:
            cache[index] = state
        return self.out(o.reshape(b, t, -1))


def layer_class(base: type, name: str, **functions) -> type:
    """A subclass of ``base`` whose forward sees ``functions`` among its globals (as a layer of a
    user's model sees the functions of its module)."""
    scope = dict(base.forward.__globals__)
    scope.update(functions)
    forward = types.FunctionType(base.forward.__code__, scope, "forward", base.forward.__defaults__)
    return type(name, (base,), {"forward": forward})


class LayersLM(nn.Module):
    """An embedding, the given mixers on a residual stream, a head; ``forward(ids, cache=None)``
    with ``cache`` a dict of each mixer's state."""

    def __init__(self, mixers: list[nn.Module], vocab: int = 64, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mixers = nn.ModuleList(mixers)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids, cache=None):
        h = self.embed(ids)
        for i, mixer in enumerate(self.mixers):
            h = h + mixer(h, cache, i)
        return self.head(h)


def ZooLM(entries: list[Entry], width: int = 16) -> LayersLM:  # noqa: N802 - builds a model
    """Every entry's function in a layer of its own, as ``delta`` or ``step``."""
    mixers = []
    for e in entries:
        fn = variant(e.base, e.name, e.edits)
        cls = layer_class(ZooMixer, f"Zoo_{e.name}", delta=fn if e.base is delta_rule else delta_rule,
                          step=fn if e.base is delta_steps else delta_steps)
        mixers.append(cls(width, signature=e.signature))
    return LayersLM(mixers, width=width)


def probe(model: LayersLM) -> None:
    """Prefill without a cache, prefill into a cache and continue it, one decode step."""
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    model(ids)
    cache = {}
    model(ids, cache)
    model(ids[:, :7], cache)
    model(ids[:, :1], cache)
