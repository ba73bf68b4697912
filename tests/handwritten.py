"""A gated-delta model written from scratch, unlike transformers on purpose, to check that
``graphdelta.compile`` recognizes the computation and not the names:

- heads-last ``einsum`` everywhere instead of ``@``;
- a per-key-channel gate (KDA style) and GVA ratio 2 (2 key heads, 4 value heads);
- chunks of 32, padded with ``torch.cat`` instead of ``F.pad``;
- the triangular system solved by an explicit forward substitution over rows;
- q/k normalized by the caller (``F.normalize``), so the function has no l2norm flag;
- the state carried in a plain dict, decode by a separate per-token function;
- the short convolution as ``F.conv1d`` on a left-padded input, SiLU applied by the caller;
- the output norm gated by a sigmoid *before* normalizing, with ``** -0.5`` instead of rsqrt.

``dispatched_chunks`` and ``dispatched_tap_mix`` hide the same functions behind opaque kernel
calls, as transformers does when fla and causal-conv1d are installed. And a look-alike that
must *not* be replaced: the ``loose_norm`` mixer adds its norm's eps after the root instead of
before it (``tests/lookalikes.py`` holds the gated-delta look-alikes).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32


def tap_mix(seq: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Causal depthwise mix of ``seq`` [B, C, T] with ``taps`` [C, W]."""
    width = taps.shape[1]
    padded = torch.cat([seq.new_zeros(seq.shape[0], seq.shape[1], width - 1), seq], dim=2)
    return F.conv1d(padded, taps[:, None, :], groups=seq.shape[1])


def _solve_rows(low: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (I + low) X = rhs, low strictly lower triangular over the last two dims of size n."""
    n = low.shape[-1]
    rows = [rhs[..., 0, :]]
    for i in range(1, n):
        acc = torch.einsum("...j,...jd->...d", low[..., i, :i], torch.stack(rows, dim=-2))
        rows.append(rhs[..., i, :] - acc)
    return torch.stack(rows, dim=-2)


def _chunk_terms(r, w, u, log_a, lr):
    """Padded, chunked, heads-first tensors and the intra-chunk solve shared by the variants."""
    b, t, hk, dk = r.shape
    hv = u.shape[2]
    rep = hv // hk
    r, w = (x.repeat_interleave(rep, dim=2) for x in (r, w))
    pad = -t % BLOCK
    if pad:
        r, w, u, log_a, lr = (torch.cat([x, x.new_zeros(b, pad, *x.shape[2:])], dim=1) for x in (r, w, u, log_a, lr))
    n = (t + pad) // BLOCK

    def blocks(x):  # [b, T, h, ...] -> [b, h, n, BLOCK, ...]
        return x.reshape(b, n, BLOCK, hv, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    r, w, u, log_a, lr = (blocks(x.float()) for x in (r, w, u, log_a, lr))
    r = r * dk**-0.5
    acc = torch.cumsum(log_a, dim=3)  # [b, h, n, C, dk]
    causal = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=r.device).tril()
    gap = acc[..., :, None, :] - acc[..., None, :, :]  # [b, h, n, C, C, dk]
    decay = torch.exp(gap.masked_fill(~causal[:, :, None], float("-inf")))
    strict = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", w * lr[..., None], w, decay).tril(-1)
    inner = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", r, w, decay)
    system = _solve_rows(strict, torch.cat([u * lr[..., None], w * lr[..., None] * acc.exp()], dim=-1))
    return r, w, acc, inner, system, t, n


def _scan(r, w, acc, inner, system, carry, dv, n):
    fresh, reach = system[..., :dv], system[..., dv:]
    state = carry.float() if carry is not None else r.new_zeros(*r.shape[:2], r.shape[-1], dv)
    outs = []
    for c in range(n):
        corrected = fresh[:, :, c] - torch.einsum("bhik,bhkv->bhiv", reach[:, :, c], state)
        seen = torch.einsum("bhik,bhkv->bhiv", r[:, :, c] * acc[:, :, c].exp(), state)
        outs.append(seen + torch.einsum("bhij,bhjv->bhiv", inner[:, :, c], corrected))
        last = acc[:, :, c, -1]  # [b, h, dk]
        fade = torch.exp(last[:, :, None, :] - acc[:, :, c])
        state = state * last.exp()[..., None] + torch.einsum("bhik,bhiv->bhkv", w[:, :, c] * fade, corrected)
    return torch.stack(outs, dim=2), state


def delta_chunks(r, w, u, log_a, lr, carry=None):
    """Gated delta rule by chunks. r, w: [b, t, hk, dk]; u: [b, t, hv, dv]; log_a: [b, t, hv, dk];
    lr: [b, t, hv]; carry: [b, hv, dk, dv] or None. Returns (out [b, t, hv, dv], state)."""
    r, w, acc, inner, system, t, n = _chunk_terms(r, w, u, log_a, lr)
    out, state = _scan(r, w, acc, inner, system, carry, u.shape[-1], n)
    b, hv = out.shape[:2]
    return out.reshape(b, hv, -1, u.shape[-1]).transpose(1, 2)[:, :t].to(u.dtype), state


def kernel_dispatch(reference_fn):
    """Like transformers' hub-kernel wrapper when fla is installed: the call goes to an opaque
    kernel (here the graphdelta op, a single node in a trace) and the plain PyTorch path is
    only reachable as ``__wrapped__``."""

    @functools.wraps(reference_fn)
    def dispatch(r, w, u, log_a, lr, carry=None):
        o, state = torch.ops.graphdelta.chunk_gated_delta_rule(
            r, w, u, log_a, lr, r.shape[-1] ** -0.5, carry, None, False, "kv")
        return o, state

    return dispatch


dispatched_chunks = kernel_dispatch(delta_chunks)


def conv_dispatch(reference_fn):
    """The same for the short convolution (transformers' ``causal_conv1d_fn`` wrapper)."""

    @functools.wraps(reference_fn)
    def dispatch(seq, taps):
        y, _ = torch.ops.graphdelta.causal_conv1d(seq.transpose(1, 2), taps, None, None, None, None)
        return y.transpose(1, 2)

    return dispatch


dispatched_tap_mix = conv_dispatch(tap_mix)


def delta_tokens(r, w, u, log_a, lr, carry):
    """The same rule one token at a time (decode)."""
    rep = u.shape[2] // r.shape[2]
    r, w = (x.repeat_interleave(rep, dim=2).float() for x in (r, w))
    r = r * r.shape[-1] ** -0.5
    state, outs = carry.float(), []
    for i in range(r.shape[1]):
        state = state * log_a[:, i].float().exp()[..., None]
        guess = torch.einsum("bhk,bhkv->bhv", w[:, i], state)
        state = state + torch.einsum("bhk,bhv->bhkv", w[:, i], lr[:, i, :, None] * (u[:, i].float() - guess))
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, i], state))
    return torch.stack(outs, dim=1).to(u.dtype), state


class HeadNorm(nn.Module):
    """Per-head output norm gated before normalizing, with a sigmoid (not SiLU) and a power
    of -1/2 (not rsqrt); ``eps_after_root`` makes a look-alike the compiler must keep."""

    def __init__(self, head: int, eps_after_root: bool = False):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(head))
        self.eps_after_root = eps_after_root

    def forward(self, values: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = values * torch.sigmoid(gate)
        if self.eps_after_root:
            return h / (h.square().mean(-1, keepdim=True).sqrt() + 1e-5) * self.scale
        return h * (h.square().mean(-1, keepdim=True) + 1e-5) ** -0.5 * self.scale


class Mixer(nn.Module):
    """One gated-delta token mixer; ``kernel`` picks the chunk function (for the look-alikes)."""

    def __init__(self, width: int, key_heads: int = 2, value_heads: int = 4, head: int = 16, kernel: str = "delta"):
        super().__init__()
        self.hk, self.hv, self.d = key_heads, value_heads, head
        inner = 2 * key_heads * head + value_heads * head
        self.proj_in = nn.Linear(width, inner, bias=False)
        self.taps = nn.Parameter(torch.randn(inner, 4) * 0.3)
        self.gate_proj = nn.Linear(width, value_heads * head)
        self.rate_proj = nn.Linear(width, value_heads)
        self.out_gate = nn.Linear(width, value_heads * head, bias=False)
        self.out_norm = HeadNorm(head, eps_after_root=kernel == "loose_norm")
        self.proj_out = nn.Linear(value_heads * head, width, bias=False)
        self.kernel = kernel

    def forward(self, x: torch.Tensor, memory: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        mixed = self.proj_in(x).transpose(1, 2)
        window = memory.get("window") if memory is not None else None
        if window is not None:
            mixed = torch.cat([window, mixed], dim=2)
        if memory is not None:
            memory["window"] = mixed[:, :, -3:]
        mix = dispatched_tap_mix if self.kernel == "dispatched" else tap_mix
        mixed = F.silu(mix(mixed, self.taps))[:, :, -t:].transpose(1, 2)
        r, w, u = mixed.split([self.hk * self.d, self.hk * self.d, self.hv * self.d], dim=-1)
        r = F.normalize(r.reshape(b, t, self.hk, self.d), dim=-1)
        w = F.normalize(w.reshape(b, t, self.hk, self.d), dim=-1)
        u = u.reshape(b, t, self.hv, self.d)
        log_a = -F.softplus(self.gate_proj(x)).reshape(b, t, self.hv, self.d) * 0.3
        lr = torch.sigmoid(self.rate_proj(x))
        carry = memory.get("state") if memory is not None else None
        if carry is not None and t == 1:
            out, state = delta_tokens(r, w, u, log_a, lr, carry)
        elif self.kernel == "dispatched":
            out, state = dispatched_chunks(r, w, u, log_a, lr, carry)
        else:
            out, state = delta_chunks(r, w, u, log_a, lr, carry)
        if memory is not None:
            memory["state"] = state
        out = self.out_norm(out, self.out_gate(x).reshape(b, t, self.hv, self.d))
        return self.proj_out(out.reshape(b, t, -1))


class TinyDeltaLM(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 64, layers: int = 2, kernel: str = "delta"):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mixers = nn.ModuleList(
            Mixer(width, kernel=kernel if i == layers - 1 else "delta") for i in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor, memory: list[dict] | None = None) -> torch.Tensor:
        h = self.embed(ids)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            h = h + mixer(norm(h), None if memory is None else memory[i])
        return self.head(h)


def build(kernel: str = "delta", seed: int = 0) -> TinyDeltaLM:
    torch.manual_seed(seed)
    return TinyDeltaLM(kernel=kernel).eval()


def probe(model: TinyDeltaLM) -> None:
    """Prefill without and with memory, continue the memory, one decode step."""
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    model(ids)
    memory = [{} for _ in model.mixers]
    model(ids, memory)
    model(ids[:, :5], memory)
    model(ids[:, :1], memory)
