"""Stage 3 of the chunked gated delta rule: the WY representation of a chunk's updates,

    w = (I + A)^-1 (beta k exp(G))      u = (I + A)^-1 (beta v)

so that, with S the state at the chunk start, the delta-rule corrected values of the chunk
are ``U = u - w S`` (stage 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_autotune import autotune
from .triton_chunk_utils import (
    ChunkPlan, chunk_span, constexpr_flags, load_gate, load_qk,
)


def shared_memory(config: triton.Config, args: dict) -> int:
    """Shared memory in bytes: the fp32 operands ``(I + A)^-1 [C, C]``, ``k [C, BK]`` and a
    value tile ``[C, BV]``. sm_90, Triton 3.9, K = V = 128: 48 KB."""
    C = args["C"]
    return 4 * C * (C + args["BK"] + args["BV"])


@triton.heuristics(constexpr_flags("IS_VARLEN"))
@autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
          key=["H", "HV", "K", "V", "C", "PER_CHANNEL"], shared_memory=shared_memory)
@triton.jit
def recompute_w_u_kernel(
    k, v, beta, gc, Ai, w, u, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, eos, t0, i_s = chunk_span(i_t, i_b, cu_seqlens, chunk_indices, T, NT, C, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    m_t = o_t < eos
    o_c = tl.arange(0, C)
    b_Ai = tl.load(Ai + (o_t[:, None] * HV + i_hv) * C + o_c[None, :], mask=m_t[:, None], other=0.0)
    b_beta = tl.load(beta + o_t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)

    b_k, _ = load_qk(k, o_t, eos, i_h, H, K, C, BK, L2NORM)
    b_g = load_gate(gc, o_t, bos, eos, i_hv, HV, K, BK, PER_CHANNEL)
    if PER_CHANNEL:
        b_kb = b_k * tl.exp(b_g) * b_beta[:, None]
    else:
        b_kb = b_k * (tl.exp(b_g) * b_beta)[:, None]
    b_w = tl.dot(b_Ai, b_kb, input_precision=DOT_PRECISION)
    o_k = tl.arange(0, BK)
    p_w = w + (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
    tl.store(p_w, b_w, mask=m_t[:, None] & (o_k < K)[None, :])

    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        o_x = (o_t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v + o_x, mask=m, other=0.0).to(tl.float32)
        b_u = tl.dot(b_Ai, b_v * b_beta[:, None], input_precision=DOT_PRECISION)
        tl.store(u + o_x, b_u, mask=m)


def recompute_w_u(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor,
                  Ai: torch.Tensor, plan: ChunkPlan, use_qk_l2norm_in_kernel: bool,
                  dot_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """k ``[B, T, H, K]``, v ``[B, T, HV, V]``, beta ``[B, T, HV]``, gc ``[B, T, HV(, K)]``,
    Ai ``[B, T, HV, C]`` -> w ``[B, T, HV, K]`` and u ``[B, T, HV, V]``, fp32."""
    B, T, H, K = k.shape
    HV, V = v.shape[2:]
    w = torch.empty(B, T, HV, K, dtype=torch.float32, device=k.device)
    u = torch.empty(B, T, HV, V, dtype=torch.float32, device=k.device)
    recompute_w_u_kernel[plan.chunk_grid(B, HV)](
        k=k, v=v, beta=beta, gc=gc, Ai=Ai, w=w, u=u, cu_seqlens=plan.cu_seqlens,
        chunk_indices=plan.chunk_indices, T=T, NT=plan.chunks_per_row, H=H, HV=HV, K=K, V=V,
        C=plan.chunk_size, BK=max(16, triton.next_power_of_2(K)),
        BV=min(64, max(16, triton.next_power_of_2(V))), PER_CHANNEL=gc.dim() == 4,
        L2NORM=use_qk_l2norm_in_kernel, DOT_PRECISION=dot_precision,
    )
    return w, u
