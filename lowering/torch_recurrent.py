"""The gated delta rule token by token in PyTorch (vectorized over sequences and heads): the
CPU implementation of ``recurrent_gated_delta_rule`` and of the in-place decode step over a
state pool.
"""
from __future__ import annotations

import torch

from .contract import compute_dtype, l2norm, to_kv
from .varlen import Packing, write_rows


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    """Compute-dtype, grouped views: q, k ``[N, T, H, 1, K]``; v ``[N, T, H, G, V]``;
    g ``[N, T, H, G, 1 or K, 1]``; beta ``[N, T, H, G, 1]``."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    cdt = compute_dtype(v.dtype)
    q, k, v, g, beta = (x.to(cdt) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    G = HV // H
    g = g.reshape(B, T, H, G, -1, 1)
    return q.unsqueeze(3), k.unsqueeze(3), v.reshape(B, T, H, G, V), g, beta.reshape(B, T, H, G, 1)


def _step(S, q_t, k_t, v_t, g_t, beta_t):
    """One token for a state ``S`` ``[N, H, G, K, V]``; returns (new state, output ``[N, H, G, V]``)."""
    S = S * g_t.exp()
    residual = v_t - (k_t.unsqueeze(-2) @ S).squeeze(-2)
    S = S + k_t.unsqueeze(-1) * (beta_t * residual).unsqueeze(-2)
    return S, (q_t.unsqueeze(-2) @ S).squeeze(-2)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    state_layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule on validated inputs; same contract as the chunked one."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    out_dtype = v.dtype
    packing = None
    if cu_seqlens is not None:
        packing = Packing.from_cu_seqlens(cu_seqlens)
        q, k, v, g, beta = (packing.pad(x) for x in (q, k, v, g, beta))
    N, L = q.shape[:2]
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    S = q.new_zeros(N, H, HV // H, K, V)
    if initial_state is not None:
        S = to_kv(initial_state, state_layout).to(S.dtype).reshape(S.shape)
    outs = []
    for t in range(L):
        S, o_t = _step(S, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append(o_t)
    o = torch.stack(outs, dim=1).reshape(N, L, HV, V) if outs else v.new_zeros(N, 0, HV, V)
    if packing is not None:
        o = packing.unpad(o, T)
    final = S.reshape(N, HV, K, V)
    return o.to(out_dtype), to_kv(final, state_layout).contiguous()


def decode_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    scale: float,
    use_qk_l2norm_in_kernel: bool,
    state_layout: str,
    output_intermediate_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T tokens for each of B sequences from their gathered ``states`` ``[B, HV, K, V]`` (kv) /
    ``[B, HV, V, K]`` (vk); no pool, no padded rows, nothing data-dependent, so that inductor
    can trace and fuse a whole decode step through it.

    Returns ``o`` ``[B, T, HV, V]``, the states after every token ``[B, T, HV, ...]`` (if asked,
    else ``[0]``) and the final states ``[B, HV, ...]``, both in ``states``' dtype and layout.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    qs, ks, vs, gs, bs = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    S = to_kv(states, state_layout).to(qs.dtype).reshape(B, H, HV // H, K, V)
    outs, inter = [], []
    for t in range(T):
        S, o_t = _step(S, qs[:, t], ks[:, t], vs[:, t], gs[:, t], bs[:, t])
        outs.append(o_t.reshape(B, HV, V))
        if output_intermediate_states:
            inter.append(to_kv(S.reshape(B, HV, K, V), state_layout))
    o = torch.stack(outs, dim=1).to(v.dtype)
    kept = torch.stack(inter, dim=1).to(states.dtype) if inter else states.new_zeros(0)
    return o, kept, to_kv(S.reshape(B, HV, K, V), state_layout).to(states.dtype)


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float,
    use_qk_l2norm_in_kernel: bool,
    state_layout: str,
    output_intermediate_states: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T tokens for each of B sequences whose states live in ``state_pool[state_indices]``.

    Updates the pool in place; rows with index -1 read and write nothing and get a zero
    output. Returns ``o`` ``[B, T, HV, V]`` and, if asked, the state after every token
    ``[B, T, HV, K, V]`` (kv) / ``[B, T, HV, V, K]`` (vk) in the pool's dtype (else ``[0]``).
    """
    B = q.shape[0]
    # Every row computes (a padded row on slot 0's state, harmlessly); only real rows are
    # written back. Whole-batch index_select / index_copy_ keep a one-token step to a few ops.
    valid = state_indices >= 0
    slots = state_indices.long().clamp_min(0)
    o, inter, new = decode_rows(q, k, v, g, beta, state_pool.index_select(0, slots), scale,
                                use_qk_l2norm_in_kernel, state_layout, output_intermediate_states)
    keep = valid.view(B, 1, 1, 1)
    o = torch.where(keep, o, 0)
    if output_intermediate_states:
        inter = torch.where(keep.unsqueeze(-1), inter, 0)
    write_rows(state_pool, slots, valid, new)
    return o, inter
