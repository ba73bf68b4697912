"""The gated delta rule token by token in Triton: the in-place decode step over a state pool
(T = 1, or k + 1 tokens to verify k draft tokens) and the short recurrent prefill.

Both launch one kernel, ``fused_recurrent_kernel``. A program owns one (sequence, value head,
V tile): it keeps the state tile ``[K, BV]`` in registers in float32 and walks the sequence's
tokens, so the state is read once and written once however many tokens there are::

    S = S * exp(g_t)                       # g_t scalar (GDN) or per key channel (KDA)
    S = S + k_t (beta_t (v_t - k_t^T S))^T
    o_t = (scale q_t)^T S

The recurrence only ever multiplies by ``exp(g_t)`` with ``g_t <= 0``, so nothing overflows.

Where the state comes from and goes to is the only difference between the two callers:

- decode: from ``state_pool[state_indices[b]]`` and back to the same place (in place); rows
  whose index is -1 load nothing, store nothing and get a zero output;
- prefill: from ``initial_state[n]`` (or zeros) into a fresh float32 ``final_state[n]``, the
  sequences being the rows of the batch or the ``cu_seqlens`` segments of a packed one (read
  inside the kernel: no host sync).

Layout is a constexpr: the ``"vk"`` state stores ``[V, K]``, so that a V tile is a run of whole
contiguous K rows. Value head h reads key head ``h // (HV // H)`` by indexing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contract import L2NORM_EPS, state_shape
from . import triton_autotune

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = tl.constexpr(L2NORM_EPS)  # of the in-kernel l2norm

# The decode step runs with one fixed (BV, num_warps) per state layout rather than an autotuned
# one: autotuning would apply the in-place update several times (or clone a pool that may fill
# the GPU), and a first call inside CUDA-graph capture must not benchmark. Chosen from the tile
# sweep on an H200 (BENCHMARKS.md, 2026-12-04; bf16 inputs, fp32 pool, HV=32, K=V=128, replayed
# from a CUDA graph): kv at BV=32 with 2 warps was the fastest or within 4% at batch 1, 64 and
# 256 (fla's BV=8 with one warp took 1.25x and 1.31x as long at 64 and 256); vk at BV=8 with one
# warp was the fastest at all three. Measured for GDN's one-token step only; KDA and several-token
# calls use the same tiles. The GPU tests and sanitizer of that lease ran kv at (8, 1): (32, 2)
# is checked on a GPU by the kit's next run (the interpreter's tests run BV=32 already).
DECODE_TILE = {"kv": (32, 2), "vk": (8, 1)}
# Under the Triton interpreter each program costs ~2.5 ms, so fewer, wider programs.
INTERPRET_BLOCK_V = 32


def _check_dtypes(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the Triton recurrent kernel supports float32, bfloat16 and float16; "
                f"{name} has dtype {t.dtype} (use the torch backend for float64)"
            )


def _check_state_strides(name: str, state: torch.Tensor) -> None:
    """States may be strided along their first dim (a pool sliced out of a larger cache) only."""
    inner = state.shape[1] * state.shape[2] * state.shape[3]
    if state.stride()[1:] != (state.shape[2] * state.shape[3], state.shape[3], 1) and inner > 1:
        raise ValueError(
            f"{name} must be contiguous past its first dim, got shape {list(state.shape)} "
            f"strides {list(state.stride())}"
        )


@triton.jit
def fused_recurrent_kernel(
    q,  # [B*T, H, K]
    k,  # [B*T, H, K]
    v,  # [B*T, HV, V]
    g,  # [B*T, HV] or [B*T, HV, K]
    beta,  # [B*T, HV]
    o,  # [B*T, HV, V]
    h0,  # state source: [S, HV, K, V] (kv) / [S, HV, V, K] (vk)
    ht,  # state destination, same layout (h0 itself for decode)
    inter,  # [B*T, HV, K, V] / [B*T, HV, V, K]
    state_indices,  # [N] slot of each row, -1 for padding
    cu_seqlens,  # [N + 1]
    scale,
    stride_h0,  # elements between two states of h0
    stride_ht,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    STATE_VK: tl.constexpr,
    PER_CHANNEL_GATE: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_INTERMEDIATE: tl.constexpr,
    USE_STATE_INDICES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Grid ``(cdiv(V, BV), N * HV)``: one program per (sequence or row, value head, V tile),
    holding the full K for its V slice."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)  # GVA: the key head this value head reads
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    if USE_STATE_INDICES:
        i_slot = tl.load(state_indices + i_n).to(tl.int64)
    else:
        i_slot = i_n.to(tl.int64)
    # A padded row (slot -1) skips the state load and store and masks its token loads: its
    # state stays zero and it writes only its (zero) outputs. The state is guarded by a branch
    # rather than a mask so that its loads keep the K/V-bound mask only, which the compiler can
    # vectorize. (Token masks fold the row into the bound: the interpreter rejects a
    # scalar & block mask.)
    m_row = i_slot >= 0
    i_slot = tl.maximum(i_slot, 0)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_k_row = o_k < tl.where(m_row, K, 0)
    m_v_row = o_v < tl.where(m_row, V, 0)
    m_kv = m_k[:, None] & m_v[None, :]
    # Offsets of the [BK, BV] state tile inside one [K, V] / [V, K] state.
    if STATE_VK:
        o_h = o_k[:, None] + o_v[None, :] * K
    else:
        o_h = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        if m_row:
            p_h0 = h0 + i_slot * stride_h0 + i_hv * K * V + o_h
            b_h += tl.load(p_h0, mask=m_kv, other=0).to(tl.float32)

    for i_t in range(bos, eos):
        b_q = tl.load(q + (i_t * H + i_h) * K + o_k, mask=m_k_row, other=0).to(tl.float32)
        b_k = tl.load(k + (i_t * H + i_h) * K + o_k, mask=m_k_row, other=0).to(tl.float32)
        b_v = tl.load(v + (i_t * HV + i_hv) * V + o_v, mask=m_v_row, other=0).to(tl.float32)
        b_beta = tl.load(beta + i_t * HV + i_hv, mask=m_row, other=0).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + EPS)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + EPS)
        b_q = b_q * scale
        if PER_CHANNEL_GATE:
            b_g = tl.load(g + (i_t * HV + i_hv) * K + o_k, mask=m_k_row, other=0).to(tl.float32)
            b_h *= tl.exp(b_g)[:, None]
        else:
            b_g = tl.load(g + i_t * HV + i_hv, mask=m_row, other=0).to(tl.float32)
            b_h *= tl.exp(b_g)
        # delta rule: correct the state's prediction of v for key k
        b_v = (b_v - tl.sum(b_h * b_k[:, None], axis=0)) * b_beta
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + (i_t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_INTERMEDIATE:
            p_inter = inter + (i_t * HV + i_hv) * K * V + o_h
            tl.store(p_inter, b_h.to(inter.dtype.element_ty), mask=m_kv)

    if STORE_FINAL_STATE:
        if m_row:
            p_ht = ht + i_slot * stride_ht + i_hv * K * V + o_h
            tl.store(p_ht, b_h.to(ht.dtype.element_ty), mask=m_kv)


def _no_wider_than_v(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    """Drop V tiles wider than V itself (they only add masked lanes)."""
    widest = triton.next_power_of_2(args["V"])
    return [c for c in configs if c.kwargs["BV"] <= widest] or configs[:1]


# Prefill on CUDA only: no pool is updated in place, so the candidates can simply be timed. The
# state tile lives in registers: no config needs shared memory beyond its reductions.
fused_recurrent_kernel_tuned = triton_autotune.autotune(
    configs=[
        triton.Config({"BV": bv}, num_warps=w, num_stages=s)
        for bv in (8, 16, 32)
        for w in (1, 2, 4)
        for s in (2, 3)
    ],
    key=["H", "HV", "K", "V", "STATE_VK", "PER_CHANNEL_GATE", "STORE_INTERMEDIATE"],
    prune=_no_wider_than_v,
)(fused_recurrent_kernel)


def fused_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    h0: torch.Tensor | None,
    ht: torch.Tensor | None,
    inter: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    state_layout: str,
    autotune: bool,
) -> torch.Tensor:
    """Launch ``fused_recurrent_kernel``; returns ``o`` ``[B, T, HV, V]`` in v's dtype.

    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g ``[B, T, HV]`` / ``[B, T, HV, K]``; beta
    ``[B, T, HV]``, all contiguous. ``h0`` / ``ht``: states read / written, one per sequence
    (or per slot of ``state_indices``); ``inter``: ``[B, T, HV, ...]`` or None.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty_like(v)
    if N == 0:
        return o
    BK = triton.next_power_of_2(K)
    dummy = o  # stands in for absent pointers; never dereferenced (its flag is off)
    kwargs = dict(
        q=q, k=k, v=v, g=g, beta=beta, o=o,
        h0=dummy if h0 is None else h0,
        ht=dummy if ht is None else ht,
        inter=dummy if inter is None else inter,
        state_indices=dummy if state_indices is None else state_indices,
        cu_seqlens=dummy if cu_seqlens is None else cu_seqlens,
        scale=scale,
        stride_h0=0 if h0 is None else h0.stride(0),
        stride_ht=0 if ht is None else ht.stride(0),
        T=T, H=H, HV=HV, K=K, V=V, BK=BK,
        STATE_VK=state_layout == "vk",
        PER_CHANNEL_GATE=g.dim() == 4,
        USE_QK_L2NORM=use_qk_l2norm_in_kernel,
        USE_INITIAL_STATE=h0 is not None,
        STORE_FINAL_STATE=ht is not None,
        STORE_INTERMEDIATE=inter is not None,
        USE_STATE_INDICES=state_indices is not None,
        IS_VARLEN=cu_seqlens is not None,
    )
    if q.is_cuda and autotune:
        def grid(meta):
            return (triton.cdiv(V, meta["BV"]), N * HV)

        fused_recurrent_kernel_tuned[grid](**kwargs)
    else:
        block_v, num_warps = DECODE_TILE[state_layout] if q.is_cuda else (INTERPRET_BLOCK_V, 1)
        BV = min(triton.next_power_of_2(V), block_v)
        fused_recurrent_kernel[(triton.cdiv(V, BV), N * HV)](**kwargs, BV=BV, num_warps=num_warps)
    return o


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
    """T tokens for each of B rows whose states live in ``state_pool[state_indices]``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV]`` or ``[B, T, HV, K]``;
            beta: ``[B, T, HV]``.
        state_pool: ``[S, HV, K, V]`` (kv) / ``[S, HV, V, K]`` (vk) float32, updated in place.
        state_indices: ``[B]`` slot per row; -1 rows read and write nothing, output zero.

    Returns:
        ``o`` ``[B, T, HV, V]`` in v's dtype and the state after every token
        ``[B, T, HV, K, V]`` / ``[B, T, HV, V, K]`` in the pool's dtype (zeros for -1 rows), or
        an empty ``[0]`` tensor. Allocations depend on shapes only: CUDA-graph capturable.
    """
    _check_dtypes(q=q, k=k, v=v, g=g, beta=beta)
    if state_pool.dtype != torch.float32:
        raise TypeError(
            f"the Triton decode kernel needs a float32 state_pool, got {state_pool.dtype}"
        )
    _check_state_strides("state_pool", state_pool)
    B, T = q.shape[:2]
    if output_intermediate_states:
        # Every element is written, padded rows' with zeros (like their outputs).
        inter = torch.empty((B, T, *state_pool.shape[1:]), dtype=state_pool.dtype, device=q.device)
    else:
        inter = state_pool.new_empty(0)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = fused_recurrent(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale,
        h0=state_pool, ht=state_pool,
        inter=inter if output_intermediate_states else None,
        state_indices=state_indices.contiguous(), cu_seqlens=None,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, state_layout=state_layout,
        autotune=False,
    )
    return o, inter


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
    """Token-by-token gated delta rule on validated inputs.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV]`` or ``[B, T, HV, K]``;
            beta: ``[B, T, HV]``.
        initial_state: ``[N, HV, K, V]`` (kv) / ``[N, HV, V, K]`` (vk), any float dtype but
            float64, or None for zeros.
        cu_seqlens: ``[N + 1]`` offsets of sequences packed in a ``B == 1`` batch, or None.

    Returns:
        ``o`` ``[B, T, HV, V]`` in v's dtype and the float32 final state ``[N, HV, K, V]`` /
        ``[N, HV, V, K]``.
    """
    _check_dtypes(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = torch.empty(state_shape(N, HV, K, V, state_layout), dtype=torch.float32, device=q.device)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = fused_recurrent(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale,
        h0=initial_state, ht=final, inter=None, state_indices=None, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, state_layout=state_layout,
        autotune=True,
    )
    return o, final
