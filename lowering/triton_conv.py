"""Causal depthwise conv1d in Triton (the short convolution before q, k, v of the linear-attention
layers), SiLU fused: prefill over packed or padded prompts, and the in-place update of a pool of
conv states during decode.

A conv state ``[N, D, S]`` (``S >= W - 1``) holds the last S inputs of a sequence, oldest first;
output t reads the W inputs ``t - W + 1 .. t``, those before the sequence start coming from the
state. Every kernel accumulates in float32 and reads each input ``x[t]`` through masked loads
(one per tap), so no window is ever shifted in registers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_autotune import autotune

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tile sizes. On CUDA the prefill kernel is autotuned; the interpreter gets one wide tile, since
# each program costs ~2.5 ms there.
INTERPRET_BLOCK_T = 32
INTERPRET_BLOCK_D = 64
UPDATE_BLOCK_D = 128  # decode: B * D / 128 programs, each a few hundred bytes of state


def _check_dtypes(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the Triton conv1d kernels support float32, bfloat16 and float16; {name} has "
                f"dtype {t.dtype} (use the torch backend for float64)"
            )


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def conv_final_state_kernel(
    x,  # [B, T, D], channel stride 1
    h0,  # [N, D, S]
    ht,  # [N, D, S]
    cu_seqlens,  # [N + 1]
    stride_x_b,
    stride_x_t,
    T,
    D: tl.constexpr,
    S: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The last S inputs of sequence n for BD channels; grid ``(cdiv(D, BD), N)``."""
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        p_x = x
    else:
        bos, eos = 0, T
        p_x = x + i_n.to(tl.int64) * stride_x_b
    o_d = i_d * BD + tl.arange(0, BD)
    o_s = tl.arange(0, BS)
    m_d = o_d < D
    m_s = o_s < S
    # entry s of the new state is the input at eos - S + s: in x, or in the old state
    o_src = eos - S + o_s
    m_x = m_s & (o_src >= bos)
    p_src = p_x + o_src.to(tl.int64)[None, :] * stride_x_t + o_d[:, None]
    b_h = tl.load(p_src, mask=m_d[:, None] & m_x[None, :], other=0).to(tl.float32)
    if USE_INITIAL_STATE:
        m_h = m_s & (o_src < bos)
        p_h = h0 + i_n.to(tl.int64) * D * S + o_d[:, None] * S + (S + o_src - bos)[None, :]
        b_h += tl.load(p_h, mask=m_d[:, None] & m_h[None, :], other=0).to(tl.float32)
    p_ht = ht + i_n.to(tl.int64) * D * S + o_d[:, None] * S + o_s[None, :]
    tl.store(p_ht, b_h.to(ht.dtype.element_ty), mask=m_d[:, None] & m_s[None, :])


def conv_final_state(
    x: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    N: int,
    S: int,
) -> torch.Tensor:
    """The conv state after each of N prompts: ``[N, D, S]`` in the initial state's dtype
    (float32 without one). ``x`` ``[B, T, D]`` has unit channel stride."""
    B, T, D = x.shape
    final_dtype = torch.float32 if initial_state is None else initial_state.dtype
    final = torch.empty(N, D, S, dtype=final_dtype, device=x.device)
    if N == 0 or S == 0 or D == 0:
        return final
    BD = min(triton.next_power_of_2(D), 64 if x.is_cuda else INTERPRET_BLOCK_D)
    conv_final_state_kernel[(triton.cdiv(D, BD), N)](
        x=x, h0=final if initial_state is None else initial_state, ht=final,
        cu_seqlens=final if cu_seqlens is None else cu_seqlens,
        stride_x_b=x.stride(0), stride_x_t=x.stride(1), T=T, D=D, S=S, BD=BD,
        BS=triton.next_power_of_2(S), USE_INITIAL_STATE=initial_state is not None,
        IS_VARLEN=cu_seqlens is not None,
    )
    return final


@triton.jit
def causal_conv1d_kernel(
    x,  # [B, T, D], channel stride 1
    weight,  # [D, W]
    bias,  # [D]
    h0,  # [N, D, S]
    y,  # [B, T, D]
    cu_seqlens,  # [N + 1]
    stride_x_b,
    stride_x_t,
    T,
    N,
    D: tl.constexpr,
    W: tl.constexpr,
    S: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    LOG2_N: tl.constexpr,  # steps of the search for a token's sequence: one compile per 2^i of N
    HAS_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_SILU: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Outputs of a [BT tokens, BD channels] tile; grid ``(cdiv(D, BD), cdiv(T, BT), B)``."""
    i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BD + tl.arange(0, BD)
    o_t = i_t * BT + tl.arange(0, BT)
    m_d = o_d < D
    m_t = o_t < T
    if IS_VARLEN:
        # Sequence of each token: the first n with cu_seqlens[n + 1] > t (empty ones skipped).
        o_lo = tl.zeros([BT], dtype=tl.int32)
        o_hi = tl.zeros([BT], dtype=tl.int32) + N
        for _ in tl.static_range(LOG2_N):
            o_mid = (o_lo + o_hi) // 2
            m_search = o_lo < o_hi
            b_end = tl.load(cu_seqlens + o_mid + 1, mask=m_search, other=0)
            m_right = m_search & (b_end <= o_t)
            o_lo = tl.where(m_right, o_mid + 1, o_lo)
            o_hi = tl.where(m_search & (b_end > o_t), o_mid, o_hi)
        o_n = tl.minimum(o_lo, N - 1)
        o_bos = tl.load(cu_seqlens + o_n, mask=m_t, other=0).to(tl.int32)
    else:
        o_n = tl.zeros([BT], dtype=tl.int32) + i_b
        o_bos = tl.zeros([BT], dtype=tl.int32)
    p_x = x + i_b.to(tl.int64) * stride_x_b

    b_y = tl.zeros([BT, BD], dtype=tl.float32)
    for i_w in tl.static_range(W):
        # input at t - (W - 1) + i_w: from x inside the sequence, from the state before it
        o_src = o_t - (W - 1) + i_w
        m_x = m_t & (o_src >= o_bos)
        p_src = p_x + o_src.to(tl.int64)[:, None] * stride_x_t + o_d[None, :]
        b_x = tl.load(p_src, mask=m_x[:, None] & m_d[None, :], other=0).to(tl.float32)
        if USE_INITIAL_STATE:
            m_h = m_t & (o_src < o_bos)
            o_s = S + o_src - o_bos
            p_h = h0 + (o_n.to(tl.int64) * D * S + o_s)[:, None] + o_d[None, :] * S
            b_x += tl.load(p_h, mask=m_h[:, None] & m_d[None, :], other=0).to(tl.float32)
        b_w = tl.load(weight + o_d * W + i_w, mask=m_d, other=0).to(tl.float32)
        b_y += b_x * b_w[None, :]
    if HAS_BIAS:
        b_y += tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)[None, :]
    if USE_SILU:
        b_y = _silu(b_y)
    p_y = y + (i_b.to(tl.int64) * T + o_t)[:, None] * D + o_d[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


def _conv_configs():
    return [
        triton.Config({"BT": bt, "BD": bd}, num_warps=w)
        for bt in (16, 32, 64)
        for bd in (64, 128)
        for w in (2, 4)
    ]


causal_conv1d_kernel_tuned = autotune(
    configs=_conv_configs(), key=["D", "W", "HAS_BIAS", "IS_VARLEN", "USE_INITIAL_STATE"]
)(causal_conv1d_kernel)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d over prompts.

    Args:
        x: ``[B, T, D]`` (any batch / token strides, unit channel stride preferred).
        weight: ``[D, W]``; bias: ``[D]`` or None.
        initial_state: ``[N, D, S]``, ``S >= W - 1``, or None (zeros, ``S = W - 1``).
        cu_seqlens: ``[N + 1]`` offsets of sequences packed in a ``B == 1`` batch, or None.
        activation: ``"silu"`` / ``"swish"`` or None.

    Returns:
        ``y`` ``[B, T, D]`` in x's dtype and the final state ``[N, D, S]`` in the initial
        state's dtype (float32 without one).
    """
    _check_dtypes(x=x, weight=weight, bias=bias, initial_state=initial_state)
    B, T, D = x.shape
    W = weight.shape[1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    S = W - 1 if initial_state is None else initial_state.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    if B * T > 0 and D > 0:
        kwargs = dict(
            x=x, weight=weight, bias=y if bias is None else bias.contiguous(),
            h0=y if initial_state is None else initial_state, y=y,
            cu_seqlens=y if cu_seqlens is None else cu_seqlens,
            stride_x_b=x.stride(0), stride_x_t=x.stride(1), T=T, N=N, D=D, W=W, S=S,
            LOG2_N=max(1, math.ceil(math.log2(N + 1))), HAS_BIAS=bias is not None,
            USE_INITIAL_STATE=initial_state is not None, USE_SILU=activation in ("silu", "swish"),
            IS_VARLEN=cu_seqlens is not None,
        )  # (y stands in for absent pointers: never dereferenced, its flag is off)
        if x.is_cuda:
            def grid(meta):
                return (triton.cdiv(D, meta["BD"]), triton.cdiv(T, meta["BT"]), B)

            causal_conv1d_kernel_tuned[grid](**kwargs)
        else:
            BT = min(triton.next_power_of_2(T), INTERPRET_BLOCK_T)
            BD = min(triton.next_power_of_2(D), INTERPRET_BLOCK_D)
            grid = (triton.cdiv(D, BD), triton.cdiv(T, BT), B)
            causal_conv1d_kernel[grid](**kwargs, BT=BT, BD=BD)
    final = conv_final_state(x, initial_state, cu_seqlens, N, S)
    return y, final


@triton.jit
def causal_conv1d_update_kernel(
    x,  # [B, T, D], channel stride 1
    conv_state,  # [S_pool, D, S], any strides
    weight,  # [D, W]
    bias,  # [D]
    y,  # [B, T, D]
    state_indices,  # [B]
    stride_x_b,
    stride_x_t,
    stride_s_n,
    stride_s_d,
    stride_s_s,
    T,
    D: tl.constexpr,
    W: tl.constexpr,
    S: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_SILU: tl.constexpr,
    USE_STATE_INDICES: tl.constexpr,
):
    """T new tokens of row b for BD channels, state updated in place; grid ``(cdiv(D, BD), B)``."""
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    if USE_STATE_INDICES:
        i_slot = tl.load(state_indices + i_b).to(tl.int64)
    else:
        i_slot = i_b.to(tl.int64)
    # A padded row (slot -1) reads nothing and stores only zero outputs. (The row is folded
    # into the channel bound: the interpreter rejects a scalar & block mask.)
    m_row = i_slot >= 0
    i_slot = tl.maximum(i_slot, 0)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    m_d_row = o_d < tl.where(m_row, D, 0)
    p_x = x + i_b.to(tl.int64) * stride_x_b
    p_state = conv_state + i_slot * stride_s_n + o_d * stride_s_d

    # New state, read in full before anything is written back: entry s is the input at
    # T - S + s counting new tokens from 0, so the old entry s + T or the new token s + T - S.
    o_s = tl.arange(0, BS)
    m_s = o_s < S
    o_old = o_s + T
    m_old = m_s & (o_old < S)
    m_new = m_s & (o_old >= S)
    p_old = p_state[:, None] + o_old[None, :] * stride_s_s
    b_h = tl.load(p_old, mask=m_d_row[:, None] & m_old[None, :], other=0)
    p_new = p_x + ((o_old - S).to(tl.int64) * stride_x_t)[None, :] + o_d[:, None]
    b_h += tl.load(p_new, mask=m_d_row[:, None] & m_new[None, :], other=0).to(b_h.dtype)

    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)
    for i_t in range(0, T):
        b_y = tl.zeros([BD], dtype=tl.float32)
        for i_w in tl.static_range(W):
            # input at token i_t - (W - 1) + i_w: old state entry S + that, or new token
            i_src = i_t - (W - 1) + i_w
            b_w = tl.load(weight + o_d * W + i_w, mask=m_d, other=0).to(tl.float32)
            # (state and x may differ in dtype: each branch converts its own load)
            if i_src < 0:
                p_h = p_state + (S + i_src) * stride_s_s
                b_x = tl.load(p_h, mask=m_d_row, other=0).to(tl.float32)
            else:
                b_x = tl.load(p_x + i_src * stride_x_t + o_d, mask=m_d_row, other=0).to(tl.float32)
            b_y += b_x * b_w
        if HAS_BIAS:
            b_y += b_bias
        if USE_SILU:
            b_y = _silu(b_y)
        b_y = tl.where(m_d_row, b_y, 0.0)
        tl.store(y + (i_b.to(tl.int64) * T + i_t) * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)

    # Every program owns its (slot, channels): only its own threads read what it overwrites.
    tl.debug_barrier()
    p_ht = p_state[:, None] + o_s[None, :] * stride_s_s
    tl.store(p_ht, b_h.to(conv_state.dtype.element_ty), mask=m_d_row[:, None] & m_s[None, :])


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """T new tokens per row for the conv states ``conv_state[state_indices]``, in place.

    Args:
        x: ``[B, T, D]``.
        conv_state: ``[S_pool, D, S]`` (``S >= W - 1``, any strides), updated in place.
        weight: ``[D, W]``; bias: ``[D]`` or None.
        state_indices: ``[B]`` slot per row (-1: untouched, zero output), or None (row b uses
            slot b).

    Returns:
        ``y`` ``[B, T, D]`` in x's dtype. No host sync, shape-only allocation: graph capturable.
    """
    _check_dtypes(x=x, conv_state=conv_state, weight=weight, bias=bias)
    B, T, D = x.shape
    W = weight.shape[1]
    S = conv_state.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    if B == 0 or D == 0:
        return y
    BD = min(triton.next_power_of_2(D), UPDATE_BLOCK_D if x.is_cuda else INTERPRET_BLOCK_D)
    causal_conv1d_update_kernel[(triton.cdiv(D, BD), B)](
        x=x, conv_state=conv_state, weight=weight.contiguous(),
        bias=y if bias is None else bias.contiguous(), y=y,
        state_indices=y if state_indices is None else state_indices.contiguous(),
        stride_x_b=x.stride(0), stride_x_t=x.stride(1),
        stride_s_n=conv_state.stride(0), stride_s_d=conv_state.stride(1),
        stride_s_s=conv_state.stride(2),
        T=T, D=D, W=W, S=S, BD=BD, BS=triton.next_power_of_2(max(S, 1)),
        HAS_BIAS=bias is not None, USE_SILU=activation in ("silu", "swish"),
        USE_STATE_INDICES=state_indices is not None,
    )
    return y
