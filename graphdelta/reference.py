"""Reference math: the gated delta rule, token by token, in whatever dtype it is given.

Every kernel and op in graphdelta is checked against these functions (in float64 in the
tests). They favour clarity over speed: one Python loop over tokens, one code path for the
scalar (GDN) and the per-key-channel (KDA) gate, the scalar gate being a broadcast of the
per-channel one.

Recurrence, for each sequence and value head h (key head ``h // (HV // H)``)::

    S_t = diag(exp(g_t)) S_{t-1}
    S_t = S_t + k_t (beta_t (v_t - k_t^T S_t))^T
    o_t = (scale q_t)^T S_t

with S_t of shape [K, V] (``state_layout="kv"``); the ``"vk"`` layout stores its transpose.
"""
from __future__ import annotations

import torch

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dimension (the fla / transformers convention)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def to_kv(state: torch.Tensor, state_layout: str) -> torch.Tensor:
    """View a state ``[..., K, V]`` (kv) or ``[..., V, K]`` (vk) as ``[..., K, V]``."""
    return state if state_layout == "kv" else state.transpose(-1, -2)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    state_layout: str = "kv",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule, one token at a time, computed in the dtype of ``v``.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]`` with ``HV % H == 0``; value head h reads key head ``h // (HV // H)``.
        g: log-decay, ``[B, T, HV]`` (GDN) or ``[B, T, HV, K]`` (KDA).
        beta: ``[B, T, HV]``.
        scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (kv) or ``[N, HV, V, K]`` (vk); zeros when None.
        cu_seqlens: ``[N + 1]`` offsets of N sequences packed in a ``B == 1`` batch.
        use_qk_l2norm_in_kernel: l2-normalize q and k (eps 1e-6) before scaling.
        state_layout: ``"kv"`` or ``"vk"``.

    Returns:
        ``o`` ``[B, T, HV, V]`` in the dtype of ``v``, and the final state ``[N, HV, K, V]`` /
        ``[N, HV, V, K]`` (or None unless ``output_final_state``).
    """
    B, T, H, K = k.shape
    HV, V = v.shape[-2:]
    dtype = v.dtype
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    group = HV // H
    q = q.repeat_interleave(group, dim=2) * scale
    k = k.repeat_interleave(group, dim=2)
    if g.dim() == 3:
        g = g.unsqueeze(-1).expand(B, T, HV, K)

    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]

    o = torch.zeros(B, T, HV, V, dtype=dtype, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            S = torch.zeros(HV, K, V, dtype=dtype, device=v.device)
        else:
            S = to_kv(initial_state[n], state_layout).to(dtype).clone()
        for t in range(start, end):
            S = S * g[b, t].exp().unsqueeze(-1)
            k_t = k[b, t]
            residual = v[b, t] - torch.einsum("hk,hkv->hv", k_t, S)
            S = S + torch.einsum("hk,hv->hkv", k_t, beta[b, t].unsqueeze(-1) * residual)
            o[b, t] = torch.einsum("hk,hkv->hv", q[b, t], S)
        finals.append(S)
    if not output_final_state:
        return o, None
    final = torch.stack(finals)
    return o, (final if state_layout == "kv" else final.transpose(-1, -2).contiguous())


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d, one token at a time, in the dtype of ``x``.

    Args:
        x: ``[B, T, D]``.
        weight: ``[D, W]``; output t reads inputs t-W+1 .. t.
        bias: ``[D]`` or None.
        initial_state: ``[N, D, S]`` with ``S >= W - 1``: the last S inputs before the
            sequence, oldest first; zeros when None.
        cu_seqlens: ``[N + 1]`` offsets of sequences packed in a ``B == 1`` batch.
        activation: ``"silu"`` or None.

    Returns:
        ``y`` ``[B, T, D]`` and the final state ``[N, D, S]`` (S = W - 1 without an initial state).
    """
    B, T, D = x.shape
    W = weight.shape[1]
    dtype = x.dtype
    S_len = W - 1 if initial_state is None else initial_state.shape[-1]
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]
    y = torch.zeros_like(x)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            window = torch.zeros(D, S_len, dtype=dtype, device=x.device)
        else:
            window = initial_state[n].to(dtype)
        for t in range(start, end):
            window = torch.cat([window, x[b, t].unsqueeze(-1)], dim=-1)
            out = (window[:, -W:] * weight.to(dtype)).sum(-1)
            if bias is not None:
                out = out + bias.to(dtype)
            y[b, t] = torch.nn.functional.silu(out) if activation == "silu" else out
            window = window[:, 1:]
        finals.append(window)
    return y, torch.stack(finals)


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    activation: str = "silu",
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """The gated RMSNorm at the output of a linear-attention layer, in the dtype of ``x``.

    ``x`` and ``gate`` ``[..., D]``, ``weight`` ``[D]``; ``act`` is SiLU (``"silu"``/``"swish"``,
    GDN) or a sigmoid (``"sigmoid"``, KDA)::

        norm_before_gate:  rmsnorm(x) * weight * act(gate)
        otherwise:         rmsnorm(x * act(gate)) * weight

    with ``rmsnorm(h) = h / sqrt(mean(h^2) + eps)`` over the last dimension.
    """
    gate = gate.to(x.dtype)
    act = torch.sigmoid(gate) if activation == "sigmoid" else gate * torch.sigmoid(gate)
    h = x if norm_before_gate else x * act
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    return y * act if norm_before_gate else y
