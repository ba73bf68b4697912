"""Causal depthwise conv1d in PyTorch: the CPU implementation of the short convolution of
the linear-attention layers, for prefill (from and into a conv state) and for in-place
updates of a pool of conv states during decode.

A conv state ``[N, D, S]`` (``S >= W - 1``) holds the last S inputs of a sequence, oldest
first; the window of the next output is its last ``W - 1`` entries plus the new input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import compute_dtype
from .varlen import Packing, write_rows


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, T, D]`` -> ``y`` ``[B, T, D]`` and the final state ``[N, D, S]``."""
    B, T, D = x.shape
    W = weight.shape[1]
    cdt = compute_dtype(x.dtype)
    S_len = W - 1 if initial_state is None else initial_state.shape[-1]
    packing = None
    xs = x.to(cdt)
    if cu_seqlens is not None:
        packing = Packing.from_cu_seqlens(cu_seqlens)
        xs = packing.pad(xs)
        lengths = packing.lengths
    else:
        lengths = torch.full((B,), T, device=x.device)
    N, L = xs.shape[:2]
    state = xs.new_zeros(N, D, S_len) if initial_state is None else initial_state.to(cdt)
    full = torch.cat([state, xs.transpose(1, 2)], dim=-1)  # [N, D, S + L]
    y = F.conv1d(full[..., S_len - (W - 1):], weight.to(cdt).unsqueeze(1), None if bias is None else bias.to(cdt), groups=D)
    y = _activate(y, activation).transpose(1, 2)  # [N, L, D]
    # The final state ends at each sequence's last real token, not at the padded end.
    window = lengths.to(torch.int64)[:, None] + torch.arange(S_len, device=x.device)[None, :]
    final = torch.gather(full, 2, window[:, None, :].expand(N, D, S_len))
    if packing is not None:
        y = packing.unpad(y, T)
    out_state_dtype = initial_state.dtype if initial_state is not None else cdt
    return y.to(x.dtype), final.to(out_state_dtype)


def causal_conv1d_dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_conv1d`` without packing, in traceable form (inductor's CPU decomposition):
    ``x`` ``[B, T, D]`` -> ``y`` ``[B, T, D]`` and the final state ``[B, D, S]``. A prompt
    is the update of its initial state (zeros when None) by T tokens."""
    if initial_state is None:
        B, _, D = x.shape
        initial_state = x.new_zeros(B, D, weight.shape[1] - 1, dtype=compute_dtype(x.dtype))
    return conv_update_rows(x, initial_state, weight, bias, activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """New tokens ``x`` ``[B, T, D]`` for the states ``conv_state[state_indices]`` (updated in place).

    ``state_indices`` ``[B]`` (None: row b uses state b); rows with -1 change nothing and get zeros.
    """
    B = x.shape[0]
    if state_indices is None:
        state_indices = torch.arange(B, device=x.device)
    # Padded rows compute on slot 0 and are dropped.
    valid, slots = state_indices >= 0, state_indices.long().clamp_min(0)
    y, new = conv_update_rows(x, conv_state.index_select(0, slots), weight, bias, activation)
    write_rows(conv_state, slots, valid, new)
    return torch.where(valid.view(B, 1, 1), y, 0)


def conv_update_rows(
    x: torch.Tensor,
    states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens ``x`` ``[B, T, D]`` after the gathered conv ``states`` ``[B, D, S]``: returns
    ``y`` ``[B, T, D]`` and the new states (no pool, nothing data-dependent: inductor fuses it)."""
    B, T, D = x.shape
    W = weight.shape[1]
    S_len = states.shape[-1]
    cdt = compute_dtype(x.dtype)
    # A handful of new tokens: a windowed multiply-sum is ~100x cheaper here than conv1d's
    # general kernel (benchmarks/decode.py).
    full = torch.cat([states.to(cdt), x.to(cdt).transpose(1, 2)], dim=-1)
    windows = full[..., S_len - (W - 1):].unfold(-1, W, 1)  # [B, D, T, W]
    y = (windows * weight.to(cdt)[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    y = _activate(y, activation).transpose(1, 2)
    return y.to(x.dtype), full[..., -S_len:].to(states.dtype)
