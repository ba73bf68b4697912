"""Stage 2 of the chunked gated delta rule: ``(I + A)^-1`` per chunk, where

    A[i, j] = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)      (j < i, else 0)

is the strictly lower-triangular, decayed and beta-scaled K K^T of the chunk. Two kernels:
``chunk_kkt`` writes A; ``solve_tril`` inverts the unit lower-triangular ``I + A``, first its
16x16 diagonal blocks by forward substitution, then merging pairs of inverted blocks into
blocks twice as large (16 -> 32 -> 64), computing lower blocks only.

A scalar gate (GDN) factors out of the sum: ``A = (K K^T) * exp(G_i - G_j)``, one
``[C, K] x [K, C]`` product and a mask. A per-channel gate (KDA) does not, and A is built
16 rows at a time through ``decayed_gram_left`` / ``decayed_gram_diag``. (The GDN kernel once
took the blocked path too: its ``[C, BK]`` fp32 tile, live across the 16-row loop, needed 255
registers and spilled in every config on sm_90a.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_autotune import autotune
from .triton_chunk_utils import (
    SUBCHUNK, ChunkPlan, chunk_span, constexpr_flags, decayed_gram_diag,
    decayed_gram_left, gate_rows, load_gate, load_qk,
)


def kkt_shared_memory(config: triton.Config, args: dict) -> int:
    """Shared memory in bytes: the two fp32 ``[C, BK]`` operands of ``K K^T`` (GDN; KDA's
    blocked form needs less). sm_90, Triton 3.9, K = 128: 64 KB (GDN), 40 KB (KDA)."""
    return 2 * 4 * args["C"] * args["BK"]


@triton.heuristics(constexpr_flags("IS_VARLEN"))
@autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
          key=["H", "HV", "K", "C", "PER_CHANNEL"], shared_memory=kkt_shared_memory)
@triton.jit
def chunk_kkt_kernel(
    k, gc, beta, A, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BKD: tl.constexpr, PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, eos, t0, i_s = chunk_span(i_t, i_b, cu_seqlens, chunk_indices, T, NT, C, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    b_k, _ = load_qk(k, o_t, eos, i_h, H, K, C, BK, L2NORM)  # [C, BK]
    b_g = load_gate(gc, o_t, bos, eos, i_hv, HV, K, BK, PER_CHANNEL)
    o_c = tl.arange(0, C)
    if not PER_CHANNEL:  # the gate factors out: one product, then the decay mask
        m_t = o_t < eos
        b_beta = tl.load(beta + o_t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
        b_A = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)  # [C, C]
        m_ij = o_c[:, None] > o_c[None, :]
        b_A *= tl.exp(tl.where(m_ij, b_g[:, None] - b_g[None, :], float("-inf")))
        p_A = A + (o_t[:, None] * HV + i_hv) * C + o_c[None, :]
        tl.store(p_A, b_A * b_beta[:, None], mask=m_t[:, None])
    else:
        o_d = tl.arange(0, BC)
        for i_r in tl.static_range(C // BC):
            o_i = t0 + i_r * BC + o_d
            m_i = o_i < eos
            b_ki, b_fi = load_qk(k, o_i, eos, i_h, H, K, BC, BK, L2NORM)  # [BC, BK]
            b_gi = load_gate(gc, o_i, bos, eos, i_hv, HV, K, BK, PER_CHANNEL)
            b_beta = tl.load(beta + o_i * HV + i_hv, mask=m_i, other=0.0).to(tl.float32)
            o_g, m_g = gate_rows(o_i, bos, eos, i_hv, HV, K)
            p_k = k + (o_i * H + i_h) * K
            b_left = decayed_gram_left(b_ki, b_gi, b_k, b_g, i_r, C, BC, PER_CHANNEL, DOT_PRECISION)
            b_diag = decayed_gram_diag(b_ki, b_ki, b_gi, p_k, p_k, b_fi, b_fi, m_i, gc + o_g, m_g,
                                       K, BC, BKD, True, PER_CHANNEL, DOT_PRECISION)
            o_row = (o_i[:, None] * HV + i_hv) * C
            m_left = m_i[:, None] & (o_c < i_r * BC)[None, :]
            tl.store(A + o_row + o_c[None, :], b_left * b_beta[:, None], mask=m_left)
            tl.store(A + o_row + i_r * BC + o_d[None, :], b_diag * b_beta[:, None], mask=m_i[:, None])


def chunk_kkt(k: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor, plan: ChunkPlan,
              use_qk_l2norm_in_kernel: bool, dot_precision: str) -> torch.Tensor:
    """k ``[B, T, H, K]``, gc (cumulative gate) ``[B, T, HV(, K)]``, beta ``[B, T, HV]`` ->
    A ``[B, T, HV, C]`` fp32: row t holds A[t, :] of t's chunk, strictly lower. GDN writes the
    whole row (zeros from the diagonal on); KDA writes up to the row's 16-wide diagonal block
    and leaves the columns right of it unwritten (``solve_tril`` never reads them)."""
    B, T, H, K = k.shape
    HV = beta.shape[2]
    C = plan.chunk_size
    A = torch.empty(B, T, HV, C, dtype=torch.float32, device=k.device)
    chunk_kkt_kernel[plan.chunk_grid(B, HV)](
        k=k, gc=gc, beta=beta, A=A, cu_seqlens=plan.cu_seqlens, chunk_indices=plan.chunk_indices,
        T=T, NT=plan.chunks_per_row, H=H, HV=HV, K=K, C=C, BC=SUBCHUNK,
        BK=max(16, triton.next_power_of_2(K)), BKD=32, PER_CHANNEL=gc.dim() == 4,
        L2NORM=use_qk_l2norm_in_kernel, DOT_PRECISION=dot_precision,
    )
    return A


@triton.jit
def merge_inverse_blocks(A, Ai, t0, eos, i_hv, r, HV: tl.constexpr, C: tl.constexpr,
                         BS: tl.constexpr):
    """Inverse of the unit lower-triangular ``[[L11, 0], [A21, L22]]`` (``BS x BS`` blocks from
    row and column ``r`` of the chunk at token ``t0``), given X11 = L11^-1 and X22 = L22^-1 in
    Ai: writes ``X21 = -X22 A21 X11``."""
    o_b = tl.arange(0, BS)
    o_1 = t0 + r + o_b  # rows of X11
    o_2 = o_1 + BS  # rows of A21, X21, X22
    m_1 = (o_1 < eos)[:, None]
    m_2 = (o_2 < eos)[:, None]
    c_1 = r + o_b[None, :]  # columns of X11, A21, X21
    c_2 = c_1 + BS  # columns of X22
    b_X11 = tl.load(Ai + (o_1[:, None] * HV + i_hv) * C + c_1, mask=m_1, other=0.0)
    b_X22 = tl.load(Ai + (o_2[:, None] * HV + i_hv) * C + c_2, mask=m_2, other=0.0)
    b_A21 = tl.load(A + (o_2[:, None] * HV + i_hv) * C + c_1, mask=m_2, other=0.0)
    b_X21 = tl.dot(b_X22, b_A21, input_precision="ieee")
    b_X21 = -tl.dot(b_X21, b_X11, input_precision="ieee")
    tl.store(Ai + (o_2[:, None] * HV + i_hv) * C + c_1, b_X21, mask=m_2)


@triton.heuristics(constexpr_flags("IS_VARLEN"))
@autotune(configs=[triton.Config({}, num_warps=w) for w in (1, 2, 4)], key=["HV", "C"])
@triton.jit
def solve_tril_kernel(
    A, Ai, cu_seqlens, chunk_indices, T, NT,
    HV: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    bos, eos, t0, i_s = chunk_span(i_t, i_b, cu_seqlens, chunk_indices, T, NT, C, IS_VARLEN)
    # 1. The NB diagonal blocks L = I + A_dd at once ([NB, BC, BC]), by forward substitution on
    #    Y = L^-1 - I: Y_i = -A_i + sum_{j<i} (-A_ij) Y_j, row after row.
    o_b = tl.arange(0, NB)[:, None, None]
    o_d = tl.arange(0, BC)
    o_i = t0 + o_b * BC + o_d[None, :, None]  # [NB, BC, 1] rows
    m_i = o_i < eos
    o_x = (o_i * HV + i_hv) * C + o_b * BC + o_d[None, None, :]
    b_nA = -tl.load(A + o_x, mask=m_i, other=0.0)
    b_Y = b_nA
    for i in range(1, BC):
        m_row = (o_d == i)[None, :, None]
        b_a = tl.sum(tl.where(m_row, b_nA, 0.0), axis=1)  # [NB, BC]
        b_a = b_a + tl.sum(b_a[:, :, None] * b_Y, axis=1)
        b_Y = tl.where(m_row, b_a[:, None, :], b_Y)
    b_X = b_Y + tl.where(o_d[:, None] == o_d[None, :], 1.0, 0.0)[None, :, :]
    tl.store(Ai + o_x, b_X, mask=m_i)
    tl.debug_barrier()
    # 2. Merge: [[X11, 0], [X21, X22]] inverts [[L11, 0], [A21, L22]] with
    #    X21 = -X22 A21 X11, for blocks of 16, then 32 rows (the blocks just written are read
    #    back after a barrier).
    for i_l in tl.static_range(LOG2_NB):
        for i_p in tl.static_range(C // (2 * BC << i_l)):
            merge_inverse_blocks(A, Ai, t0, eos, i_hv, i_p * (2 * BC << i_l), HV, C, BC << i_l)
        tl.debug_barrier()


def solve_tril(A: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """A ``[B, T, HV, C]`` (strictly lower per chunk) -> ``(I + A)^-1`` ``[B, T, HV, C]`` fp32,
    zero above the diagonal."""
    B, T, HV, C = A.shape
    Ai = torch.zeros_like(A)  # the blocks above the diagonal are never written
    solve_tril_kernel[plan.chunk_grid(B, HV)](
        A=A, Ai=Ai, cu_seqlens=plan.cu_seqlens, chunk_indices=plan.chunk_indices, T=T,
        NT=plan.chunks_per_row, HV=HV, C=C, BC=SUBCHUNK, NB=C // SUBCHUNK,
        LOG2_NB=(C // SUBCHUNK).bit_length() - 1,
    )
    return Ai
