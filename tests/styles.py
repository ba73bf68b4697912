"""Seventeen ways to write the gated delta rule, none of them transformers' or ``handwritten.py``'s,
each of which graphdelta must fuse (``tests/test_compile_styles.py``).

Chunked (prefill) styles, each ``fn(q, k, v, g, beta, state=None) -> (o, state)``:

1. ``factored_inverse``: chunks of 16, the decay as factored exponentials exp(G_i)·exp(-G_j),
   the inverse by ``torch.linalg.inv``;
2. ``doubling_inverse``: chunks of 32, the inverse as a product of (I + N^(2^k)) terms, the decay
   as a difference masked by ``torch.where``;
3. ``right_solve``: chunks of 64, ``solve_triangular(..., left=False)`` on the transposed system;
4. ``general_solve``: chunks of 32, ``torch.linalg.solve``;
5. ``row_substitution``: chunks of 16, forward substitution row by row with broadcast sums;
6. ``stored_states``: chunks of 64, the scan keeps each chunk's starting state and the outputs
   are computed from the stacked states afterwards;
7. ``kda_heads_last``: KDA (a gate per key channel), heads-last ``einsum`` everywhere, the full
   ``[C, C, H, K]`` decay, chunks of 64;
8. ``kda_factored``: KDA by chunks of 16, the decay factored as exp(G) and exp(-G) around the
   key products;
9. ``vk_chunks``: chunks of 32 with the state kept as ``[B, HV, V, K]`` in the user's code;
10. ``heads_first``: arguments ``[B, H, T, K]`` (heads first), chunks of 64;
11. ``expand_gva``: value heads reach their key head through ``expand``, chunks of 128;
12. ``indexed_gva``: through indexing with ``arange(HV) // group``, chunks of 256.

Token recurrences (decode), ``fn(q, k, v, g, beta, state) -> (o, state)``:

13. ``predecayed_steps``: every exp(g) computed before the loop, the prediction a matmul;
14. ``summed_steps``: the prediction as a broadcast sum;
15. ``kda_steps``: KDA with ``einsum``;
16. ``vk_steps``: the state ``[B, HV, V, K]``, matmuls;
17. ``heads_first_steps``: arguments heads first.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lookalikes import LayersLM, layer_class, probe  # noqa: F401 - the same probe

NEG_INF = float("-inf")


def _heads_first(q, k, v, g, beta):
    """GVA by repeat_interleave; [B, T, h, d] -> [B, HV, T, d] in float32."""
    rep = v.shape[2] // q.shape[2]
    q, k = (x.repeat_interleave(rep, dim=2) for x in (q, k))
    q, k, v = (x.permute(0, 2, 1, 3).float() for x in (q, k, v))
    return q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float()


def _pad_chunks(C, *xs):
    """Zero-pad dim 2 (time) of heads-first tensors to a multiple of C and split it into chunks."""
    T = xs[0].shape[2]
    n = -(-T // C)
    out = []
    for x in xs:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], n * C - T, *x.shape[3:])], dim=2)
        out.append(x.reshape(*x.shape[:2], n, C, *x.shape[3:]))
    return n, out


def _scan(q, k, u, w, G, P, S):
    """The chunk scan shared by several styles: [B, HV, n, C, .] blocks, S [B, HV, K, V]."""
    outs = []
    for i in range(q.shape[2]):
        c = u[:, :, i] - w[:, :, i] @ S
        outs.append((q[:, :, i] * G[:, :, i, :, None].exp()) @ S + P[:, :, i] @ c)
        last = G[:, :, i, -1]
        S = last[..., None, None].exp() * S + (k[:, :, i] * (last[..., None] - G[:, :, i]).exp()[..., None]).transpose(-1, -2) @ c
    return torch.cat(outs, dim=2), S


def factored_inverse(q, k, v, g, beta, state=None):
    C = 16
    B, T, _, K = q.shape
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    n, (q, k, v, g, beta) = _pad_chunks(C, q, k, v, g, beta)
    q = q / K**0.5
    G = torch.cumsum(g, dim=-1)
    up, down = G.exp(), (-G).exp()
    lower = torch.tril(torch.ones(C, C, device=q.device))
    strict = lower - torch.eye(C, device=q.device)
    decay = up[..., :, None] * down[..., None, :]
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * decay * strict
    inv = torch.linalg.inv(torch.eye(C, device=q.device) + A)
    u = inv @ (beta[..., None] * v)
    w = inv @ (beta[..., None] * k * up[..., None])
    P = (q @ k.transpose(-1, -2)) * decay * lower
    S = torch.zeros(B, q.shape[1], K, v.shape[-1], device=q.device) if state is None else state.float()
    outs = []
    for i in range(n):
        c = u[:, :, i] - w[:, :, i] @ S
        outs.append((q[:, :, i] * up[:, :, i, :, None]) @ S + P[:, :, i] @ c)
        tail = up[:, :, i, -1]
        S = tail[..., None, None] * S + (k[:, :, i] * (tail[..., None] * down[:, :, i])[..., None]).transpose(-1, -2) @ c
    o = torch.cat(outs, dim=2)[:, :, :T]
    return o.permute(0, 2, 1, 3), S


def _masked_decay(G, C):
    causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    return torch.where(causal, G[..., :, None] - G[..., None, :], NEG_INF).exp()


def doubling_inverse(q, k, v, g, beta, state=None):
    C = 32
    B, T, _, K = q.shape
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    n, (q, k, v, g, beta) = _pad_chunks(C, q, k, v, g, beta)
    q = q * K**-0.5
    G = g.cumsum(-1)
    D = _masked_decay(G, C)
    N = -((beta[..., None] * k) @ k.transpose(-1, -2) * D).tril(-1)
    eye = torch.eye(C, device=q.device)
    inv, power = eye + N, N
    for _ in range(int(math.log2(C)) - 1):  # (I + A)^-1 = (I - A)(I + A^2)(I + A^4)...
        power = power @ power
        inv = inv @ (eye + power)
    u = inv @ (beta[..., None] * v)
    w = inv @ (beta[..., None] * k * G.exp()[..., None])
    o, S = _scan(q, k, u, w, G, (q @ k.transpose(-1, -2)) * D,
                 torch.zeros(B, q.shape[1], K, v.shape[-1], device=q.device) if state is None else state.float())
    return o[:, :, :T].transpose(1, 2), S


def _system(q, k, v, g, beta, C):
    """Heads-first chunks, the decay, and the unsolved system (I + A) with its right-hand sides."""
    K = q.shape[-1]
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    n, (q, k, v, g, beta) = _pad_chunks(C, q, k, v, g, beta)
    q = q * K**-0.5
    G = g.cumsum(-1)
    D = _masked_decay(G, C)
    kb = k * beta[..., None]
    M = torch.eye(C, device=q.device) + (kb @ k.transpose(-1, -2) * D).tril(-1)
    return q, k, G, D, M, beta[..., None] * v, kb * G.exp()[..., None]


def right_solve(q, k, v, g, beta, state=None):
    B, T, _, K = q.shape
    q, k, G, D, M, rv, rk = _system(q, k, v, g, beta, 64)
    u, w = (torch.linalg.solve_triangular(M.transpose(-1, -2), r.transpose(-1, -2), upper=True, left=False,
                                          unitriangular=True).transpose(-1, -2) for r in (rv, rk))
    S = q.new_zeros(B, q.shape[1], K, v.shape[-1]) if state is None else state.float()
    o, S = _scan(q, k, u, w, G, (q @ k.transpose(-1, -2)) * D, S)
    return o[:, :, :T].transpose(1, 2), S


def general_solve(q, k, v, g, beta, state=None):
    B, T, _, K = q.shape
    q, k, G, D, M, rv, rk = _system(q, k, v, g, beta, 32)
    u, w = torch.linalg.solve(M, rv), torch.linalg.solve(M, rk)
    S = q.new_zeros(B, q.shape[1], K, v.shape[-1]) if state is None else state.float()
    o, S = _scan(q, k, u, w, G, (q @ k.transpose(-1, -2)) * D, S)
    return o[:, :, :T].transpose(1, 2), S


def row_substitution(q, k, v, g, beta, state=None):
    C = 16
    B, T, _, K = q.shape
    q, k, G, D, M, rv, rk = _system(q, k, v, g, beta, C)
    R = torch.cat([rv, rk], dim=-1)
    rows = []
    for i in range(C):
        row = R[..., i, :]
        if i:
            row = row - (M[..., i, :i, None] * torch.stack(rows, dim=-2)).sum(-2)
        rows.append(row)
    X = torch.stack(rows, dim=-2)
    V = rv.shape[-1]
    S = q.new_zeros(B, q.shape[1], K, V) if state is None else state.float()
    o, S = _scan(q, k, X[..., :V], X[..., V:], G, (q @ k.transpose(-1, -2)) * D, S)
    return o[:, :, :T].transpose(1, 2), S


def stored_states(q, k, v, g, beta, state=None):
    B, T, _, K = q.shape
    q, k, G, D, M, rv, rk = _system(q, k, v, g, beta, 64)
    u = torch.linalg.solve_triangular(M, rv, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(M, rk, upper=False, unitriangular=True)
    S = q.new_zeros(B, q.shape[1], K, v.shape[-1]) if state is None else state.float()
    starts = []
    for i in range(q.shape[2]):  # the scan keeps only states
        starts.append(S)
        c = u[:, :, i] - w[:, :, i] @ S
        last = G[:, :, i, -1]
        S = last[..., None, None].exp() * S + (k[:, :, i] * (last[..., None] - G[:, :, i]).exp()[..., None]).transpose(-1, -2) @ c
    Ss = torch.stack(starts, dim=2)  # [B, HV, n, K, V]
    c = u - w @ Ss
    o = (q * G.exp()[..., None]) @ Ss + ((q @ k.transpose(-1, -2)) * D) @ c
    return o.flatten(2, 3)[:, :, :T].transpose(1, 2), S


def kda_heads_last(q, k, v, g, beta, state=None):
    """g: [B, T, H, K]; H == HV."""
    C = 64
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = -T % C
    q, k, v, g = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta.float(), (0, 0, 0, pad))
    n = (T + pad) // C
    q, k, v, g = (x.reshape(B, n, C, H, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.reshape(B, n, C, H)
    q = q * K**-0.5
    G = g.cumsum(dim=2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    D = (G[:, :, :, None] - G[:, :, None, :]).masked_fill(~causal[:, :, None, None], NEG_INF).exp()
    kb = k * beta[..., None]
    A = torch.einsum("bnihk,bnjhk,bnijhk->bnhij", kb, k, D).tril(-1)
    Pm = torch.einsum("bnihk,bnjhk,bnijhk->bnhij", q, k, D)
    M = A + torch.eye(C, device=q.device)
    u = torch.linalg.solve_triangular(M, torch.einsum("bnchv->bnhcv", v * beta[..., None]), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(M, torch.einsum("bnchk->bnhck", kb * G.exp()), upper=False, unitriangular=True)
    S = q.new_zeros(B, H, K, V) if state is None else state.float()
    outs = []
    for i in range(n):
        c = u[:, i] - torch.einsum("bhck,bhkv->bhcv", w[:, i], S)
        read = torch.einsum("bchk,bhkv->bhcv", q[:, i] * G[:, i].exp(), S)
        outs.append(read + torch.einsum("bhij,bhjv->bhiv", Pm[:, i], c))
        last = G[:, i, -1]  # [B, H, K]
        S = last.exp()[..., None] * S + torch.einsum("bchk,bhcv->bhkv", k[:, i] * (last[:, None] - G[:, i]).exp(), c)
    o = torch.stack(outs, dim=1)  # [B, n, H, C, V]
    return torch.einsum("bnhcv->bnchv", o).reshape(B, n * C, H, V)[:, :T], S


def kda_factored(q, k, v, g, beta, state=None):
    """KDA (g: [B, T, H, K]) by chunks of 16, the per-channel decay factored into exp(G) and
    exp(-G) around the key products, heads first, matmuls."""
    C = 16
    B, T, H, K = q.shape
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    n, (q, k, v, g, beta) = _pad_chunks(C, q, k, v, g, beta)
    q = q * K**-0.5
    G = g.cumsum(dim=3)  # [B, H, n, C, K]
    kb = k * beta[..., None]
    lower = torch.ones(C, C, device=q.device).tril()
    A = ((kb * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)) * (lower - torch.eye(C, device=q.device))
    Pm = ((q * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)) * lower
    M = torch.eye(C, device=q.device) + A
    u = torch.linalg.solve_triangular(M, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(M, kb * G.exp(), upper=False, unitriangular=True)
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float()
    outs = []
    for i in range(n):
        c = u[:, :, i] - w[:, :, i] @ S
        outs.append((q[:, :, i] * G[:, :, i].exp()) @ S + Pm[:, :, i] @ c)
        last = G[:, :, i, -1:]  # [B, H, 1, K]
        S = last.transpose(-1, -2).exp() * S + (k[:, :, i] * (last - G[:, :, i]).exp()).transpose(-1, -2) @ c
    return torch.cat(outs, dim=2)[:, :, :T].transpose(1, 2), S


def vk_chunks(q, k, v, g, beta, state=None):
    """state: [B, HV, V, K]."""
    B, T, _, K = q.shape
    q, k, G, D, M, rv, rk = _system(q, k, v, g, beta, 32)
    u = torch.linalg.solve_triangular(M, rv, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(M, rk, upper=False, unitriangular=True)
    S = q.new_zeros(B, q.shape[1], v.shape[-1], K) if state is None else state.float()  # [.., V, K]
    P = (q @ k.transpose(-1, -2)) * D
    outs = []
    for i in range(q.shape[2]):
        c = u[:, :, i] - w[:, :, i] @ S.transpose(-1, -2)
        outs.append((q[:, :, i] * G[:, :, i, :, None].exp()) @ S.transpose(-1, -2) + P[:, :, i] @ c)
        last = G[:, :, i, -1]
        S = last[..., None, None].exp() * S + c.transpose(-1, -2) @ (k[:, :, i] * (last[..., None] - G[:, :, i]).exp()[..., None])
    return torch.cat(outs, dim=2)[:, :, :T].transpose(1, 2), S


def heads_first(q, k, v, g, beta, state=None):
    """q, k: [B, H, T, K]; v: [B, HV, T, V]; g, beta: [B, HV, T]; returns o [B, HV, T, V]."""
    B, H, T, K = q.shape
    rep = v.shape[1] // H
    q, k = (x.repeat_interleave(rep, dim=1).float() for x in (q, k))
    n, (q, k, v, g, beta) = _pad_chunks(64, q, k, v.float(), g.float(), beta.float())
    q = q * K**-0.5
    G = g.cumsum(-1)
    D = _masked_decay(G, 64)
    kb = k * beta[..., None]
    M = torch.eye(64, device=q.device) + (kb @ k.transpose(-1, -2) * D).tril(-1)
    u = torch.linalg.solve_triangular(M, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(M, kb * G.exp()[..., None], upper=False, unitriangular=True)
    S = q.new_zeros(B, q.shape[1], K, v.shape[-1]) if state is None else state.float()
    o, S = _scan(q, k, u, w, G, (q @ k.transpose(-1, -2)) * D, S)
    return o[:, :, :T], S


def _gva_chunks(q, k, v, g, beta, state, C):
    """The chunked rule once q and k have a head per value head ([B, T, HV, K])."""
    B, T, HV, K = q.shape
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    n, (q, k, v, g, beta) = _pad_chunks(C, q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float())
    q = q * K**-0.5
    G = g.cumsum(-1)
    D = _masked_decay(G, C)
    kb = k * beta[..., None]
    M = torch.eye(C, device=q.device) + (kb @ k.transpose(-1, -2) * D).tril(-1)
    u = torch.linalg.solve_triangular(M, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(M, kb * G.exp()[..., None], upper=False, unitriangular=True)
    S = q.new_zeros(B, HV, K, v.shape[-1]) if state is None else state.float()
    o, S = _scan(q, k, u, w, G, (q @ k.transpose(-1, -2)) * D, S)
    return o[:, :, :T].transpose(1, 2), S


def expand_gva(q, k, v, g, beta, state=None):
    B, T, H, K = q.shape
    HV = v.shape[2]
    q, k = (x[:, :, :, None].expand(B, T, H, HV // H, K).reshape(B, T, HV, K) for x in (q, k))
    return _gva_chunks(q, k, v, g, beta, state, 128)


def indexed_gva(q, k, v, g, beta, state=None):
    heads = torch.arange(v.shape[2], device=q.device) // (v.shape[2] // q.shape[2])
    return _gva_chunks(q[:, :, heads], k[:, :, heads], v, g, beta, state, 256)


# ----------------------------------------------------------------------------- token loops


def predecayed_steps(q, k, v, g, beta, state):
    rep = v.shape[2] // q.shape[2]
    q = q.repeat_interleave(rep, dim=2).float() * q.shape[-1] ** -0.5
    k = k.repeat_interleave(rep, dim=2).float()
    decay = g.float().exp()  # every step's decay, before the loop
    S, outs = state.float(), []
    for t in range(q.shape[1]):
        S = S * decay[:, t, :, None, None]
        pred = (k[:, t, :, None, :] @ S)[:, :, 0]  # [B, HV, V]
        S = S + k[:, t, :, :, None] @ (beta[:, t, :, None].float() * (v[:, t].float() - pred))[:, :, None, :]
        outs.append((q[:, t, :, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=1), S


def summed_steps(q, k, v, g, beta, state):
    rep = v.shape[2] // q.shape[2]
    q, k = (x.repeat_interleave(rep, dim=2).float() for x in (q, k))
    S, outs = state.float(), []
    for t in range(q.shape[1]):
        S = g[:, t, :, None, None].float().exp() * S
        pred = (S * k[:, t, :, :, None]).sum(dim=2)
        S = S + k[:, t, :, :, None] * ((v[:, t].float() - pred) * beta[:, t, :, None].float())[:, :, None, :]
        outs.append((S * q[:, t, :, :, None]).sum(dim=2) / q.shape[-1] ** 0.5)
    return torch.stack(outs, dim=1), S


def kda_steps(q, k, v, g, beta, state):
    """g: [B, T, H, K]."""
    q, k = q.float() * q.shape[-1] ** -0.5, k.float()
    S, outs = state.float(), []
    for t in range(q.shape[1]):
        S = S * g[:, t].float().exp()[..., None]
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None].float() * (v[:, t].float() - pred))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


def vk_steps(q, k, v, g, beta, state):
    """state: [B, HV, V, K]."""
    rep = v.shape[2] // q.shape[2]
    q = q.repeat_interleave(rep, dim=2).float() * q.shape[-1] ** -0.5
    k = k.repeat_interleave(rep, dim=2).float()
    S, outs = state.float(), []
    for t in range(q.shape[1]):
        S = S * g[:, t, :, None, None].float().exp()
        pred = (S @ k[:, t, :, :, None])[..., 0]  # [B, HV, V]
        S = S + (beta[:, t, :, None].float() * (v[:, t].float() - pred))[..., None] @ k[:, t, :, None, :]
        outs.append((S @ q[:, t, :, :, None])[..., 0])
    return torch.stack(outs, dim=1), S


def heads_first_steps(q, k, v, g, beta, state):
    """q, k: [B, H, T, K]; v: [B, HV, T, V]; g, beta: [B, HV, T]."""
    rep = v.shape[1] // q.shape[1]
    q = q.repeat_interleave(rep, dim=1).float() * q.shape[-1] ** -0.5
    k = k.repeat_interleave(rep, dim=1).float()
    S, outs = state.float(), []
    for t in range(q.shape[2]):
        S = S * g[:, :, t, None, None].float().exp()
        pred = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], beta[:, :, t, None].float() * (v[:, :, t].float() - pred))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Style:
    chunks: object
    steps: object
    heads: int = 1
    value_heads: int = 2
    key_dim: int = 8
    value_dim: int = 8
    per_channel: bool = False  # KDA
    heads_first: bool = False  # arguments [B, H, T, .]
    state_vk: bool = False  # the state is [B, HV, V, K]


STYLES = [
    Style(factored_inverse, predecayed_steps),
    Style(doubling_inverse, summed_steps, value_dim=16),
    Style(right_solve, predecayed_steps, heads=2, value_heads=2),
    Style(general_solve, summed_steps),
    Style(row_substitution, predecayed_steps, value_heads=4),
    Style(stored_states, summed_steps),
    Style(kda_heads_last, kda_steps, heads=2, value_heads=2, per_channel=True),
    Style(kda_factored, kda_steps, heads=2, value_heads=2, per_channel=True),
    Style(vk_chunks, vk_steps, value_dim=16, state_vk=True),
    Style(heads_first, heads_first_steps, heads_first=True),
    Style(expand_gva, predecayed_steps),
    Style(indexed_gva, summed_steps),
]


class StyleMixer(nn.Module):
    """Projections to q, k, v, g, beta in the style's argument layout, then ``delta`` (prefill) or
    ``step`` (a cached decode step): this layer's forward sees the style's functions under
    those names."""

    def __init__(self, style: Style, width: int):
        super().__init__()
        self.style = style
        s = style
        self.qk = nn.Linear(width, 2 * s.heads * s.key_dim, bias=False)
        self.vp = nn.Linear(width, s.value_heads * s.value_dim, bias=False)
        self.gp = nn.Linear(width, s.value_heads * (s.key_dim if s.per_channel else 1))
        self.bp = nn.Linear(width, s.value_heads)
        self.out = nn.Linear(s.value_heads * s.value_dim, width, bias=False)

    def forward(self, x, cache=None, index=0):
        s = self.style
        b, t, _ = x.shape
        q, k = self.qk(x).reshape(b, t, 2, s.heads, s.key_dim).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = self.vp(x).reshape(b, t, s.value_heads, s.value_dim)
        g = -F.softplus(self.gp(x)).reshape(b, t, s.value_heads, -1) * 0.5
        g = g if s.per_channel else g[..., 0]
        beta = torch.sigmoid(self.bp(x))
        if s.heads_first:
            q, k, v, g, beta = (y.transpose(1, 2) for y in (q, k, v, g, beta))
        state = None if cache is None else cache.get(index)
        if state is not None and t == 1:
            o, state = step(q, k, v, g, beta, state)
        else:
            o, state = delta(q, k, v, g, beta, state)
        if s.heads_first:
            o = o.transpose(1, 2)
        if cache is not None:
            cache[index] = state
        return self.out(o.reshape(b, t, -1))


def StyleLM(styles: list[Style] = STYLES, width: int = 32) -> LayersLM:  # noqa: N802 - builds a model
    """Every style in a layer of its own, its functions as ``delta`` and ``step``."""
    return LayersLM([layer_class(StyleMixer, f"Style_{s.chunks.__name__}", delta=s.chunks, step=s.steps)(s, width)
                     for s in styles], width=width)
