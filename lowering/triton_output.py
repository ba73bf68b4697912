"""Stage 5 of the chunked gated delta rule: the output, every chunk at once,

    o = (scale q exp(G)) h[chunk] + P U
    P[i, j] = sum_c (scale q_ic) k_jc exp(G_ic - G_jc)      (j <= i, else 0)

the first term reading the state at the chunk start (stage 4), the second the chunk's own
corrected values U. P is built one 16-row block at a time, left of and inside the diagonal
block (see ``decayed_gram_left`` / ``decayed_gram_diag``).
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


def shared_memory(config: triton.Config, args: dict) -> int:
    """Shared memory of a config in bytes: the fp32 operands of the products, ``h [BK, BV]``,
    ``U [C, BV]``, ``k [C, BK]`` and the 16-row blocks of q, k and U. Exactly what sm_90 gave
    for GDN at K = V = 128 (Triton 3.9; KDA 8 KB less); no loop is pipelined."""
    C, BK, BC, BV = args["C"], args["BK"], args["BC"], config.kwargs["BV"]
    return 4 * (BK * BV + C * BV + C * BK) + 4 * BC * (3 * BK + BV)


@triton.heuristics(constexpr_flags("IS_VARLEN"))
@autotune(configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                   for bv in (64, 32) for nw in (4, 8) for ns in (2, 3)],
          key=["H", "HV", "K", "V", "C", "PER_CHANNEL"], shared_memory=shared_memory)
@triton.jit
def chunk_output_kernel(
    q, k, v_new, h, gc, o, scale, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BKD: tl.constexpr, BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, eos, t0, i_s = chunk_span(i_t, i_b, cu_seqlens, chunk_indices, T, NT, C, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    m_t = o_t < eos
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = (o_v < V)[None, :]
    p_h = h + (i_s * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
    m_h = (o_k < K) & (t0 + 0 * o_k < eos)  # an empty chunk (spare slot) has no state
    b_h = tl.load(p_h, mask=m_h[:, None] & m_v, other=0.0)  # [BK, BV]
    b_U = tl.load(v_new + (o_t[:, None] * HV + i_hv) * V + o_v[None, :],
                  mask=m_t[:, None] & m_v, other=0.0)  # [C, BV]
    b_k, _ = load_qk(k, o_t, eos, i_h, H, K, C, BK, L2NORM)  # [C, BK]
    b_g = load_gate(gc, o_t, bos, eos, i_hv, HV, K, BK, PER_CHANNEL)
    o_d = tl.arange(0, BC)
    for i_r in tl.static_range(C // BC):
        o_i = t0 + i_r * BC + o_d
        m_i = o_i < eos
        b_qi, b_fq = load_qk(q, o_i, eos, i_h, H, K, BC, BK, L2NORM)  # [BC, BK]
        b_qi = b_qi * scale
        b_ki, b_fk = load_qk(k, o_i, eos, i_h, H, K, BC, BK, L2NORM)
        b_gi = load_gate(gc, o_i, bos, eos, i_hv, HV, K, BK, PER_CHANNEL)
        o_g, m_g = gate_rows(o_i, bos, eos, i_hv, HV, K)
        b_Ui = tl.load(v_new + (o_i[:, None] * HV + i_hv) * V + o_v[None, :],
                       mask=m_i[:, None] & m_v, other=0.0)  # [BC, BV]
        if PER_CHANNEL:
            b_qg = b_qi * tl.exp(b_gi)
        else:
            b_qg = b_qi * tl.exp(b_gi)[:, None]
        b_left = decayed_gram_left(b_qi, b_gi, b_k, b_g, i_r, C, BC, PER_CHANNEL, DOT_PRECISION)
        o_qk = (o_i * H + i_h) * K
        b_diag = decayed_gram_diag(b_qi, b_ki, b_gi, q + o_qk, k + o_qk, b_fq * scale, b_fk, m_i,
                                   gc + o_g, m_g, K, BC, BKD, False, PER_CHANNEL, DOT_PRECISION)
        b_o = tl.dot(b_qg, b_h, input_precision=DOT_PRECISION)
        b_o += tl.dot(b_left, b_U, input_precision=DOT_PRECISION)
        b_o += tl.dot(b_diag, b_Ui, input_precision=DOT_PRECISION)
        p_o = o + (o_i[:, None] * HV + i_hv) * V + o_v[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_i[:, None] & m_v)


def chunk_output(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, h: torch.Tensor,
                 gc: torch.Tensor, scale: float, plan: ChunkPlan, out_dtype: torch.dtype,
                 use_qk_l2norm_in_kernel: bool, dot_precision: str) -> torch.Tensor:
    """q, k ``[B, T, H, K]``, v_new (U) ``[B, T, HV, V]``, h ``[num_slots, HV, K, V]``,
    gc ``[B, T, HV(, K)]`` -> o ``[B, T, HV, V]`` in ``out_dtype``."""
    B, T, H, K = q.shape
    HV, V = v_new.shape[2:]
    o = torch.empty(B, T, HV, V, dtype=out_dtype, device=q.device)

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), *plan.chunk_grid(B, HV))

    chunk_output_kernel[grid](
        q=q, k=k, v_new=v_new, h=h, gc=gc, o=o, scale=scale, cu_seqlens=plan.cu_seqlens,
        chunk_indices=plan.chunk_indices, T=T, NT=plan.chunks_per_row, H=H, HV=HV, K=K, V=V,
        C=plan.chunk_size, BC=SUBCHUNK, BK=max(16, triton.next_power_of_2(K)), BKD=32,
        PER_CHANNEL=gc.dim() == 4, L2NORM=use_qk_l2norm_in_kernel,
        DOT_PRECISION=dot_precision,
    )
    return o
