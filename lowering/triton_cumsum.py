"""Stage 1 of the chunked gated delta rule: the chunk-local cumulative log-decay.

``G[t] = sum of g over the chunk's tokens up to and including t``, restarting at every chunk
(chunks are counted from the start of each sequence). Every later exponent is a difference of
two G of one chunk, so G never needs to leave the chunk.

Each g is first raised to ``GATE_FLOOR`` (as ``torch_chunk.gate_floor`` does on CPU): g = -inf,
a legal full reset, would make those differences -inf - (-inf) = NaN, and g = -1e38 would absorb
every later gate of the chunk; exp(-80) is as good as 0 next to any O(1) term.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_autotune import autotune
from .triton_chunk_utils import ChunkPlan, chunk_span, constexpr_flags

GATE_FLOOR = tl.constexpr(-80.0)


@triton.heuristics(constexpr_flags("IS_VARLEN"))
@autotune(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
          key=["C", "BK", "PER_CHANNEL"])
@triton.jit
def chunk_cumsum_kernel(
    g, gc, cu_seqlens, chunk_indices, T, NT,
    HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    PER_CHANNEL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    bos, eos, t0, i_s = chunk_span(i_t, i_b, cu_seqlens, chunk_indices, T, NT, C, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    m_t = o_t < eos
    if PER_CHANNEL:
        o_k = tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        o_x = (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
        b_g = tl.maximum(tl.load(g + o_x, mask=m, other=0.0).to(tl.float32), GATE_FLOOR)
        tl.store(gc + o_x, tl.cumsum(b_g, axis=0), mask=m)
    else:
        o_x = o_t * HV + i_hv
        b_g = tl.maximum(tl.load(g + o_x, mask=m_t, other=0.0).to(tl.float32), GATE_FLOOR)
        tl.store(gc + o_x, tl.cumsum(b_g, axis=0), mask=m_t)


def chunk_cumsum(g: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """g ``[B, T, HV]`` or ``[B, T, HV, K]`` -> the chunk-local cumsum, same shape, fp32."""
    B, T, HV = g.shape[:3]
    per_channel = g.dim() == 4
    K = g.shape[3] if per_channel else 1
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    chunk_cumsum_kernel[plan.chunk_grid(B, HV)](
        g=g, gc=gc, cu_seqlens=plan.cu_seqlens, chunk_indices=plan.chunk_indices, T=T,
        NT=plan.chunks_per_row, HV=HV, K=K, C=plan.chunk_size,
        BK=max(16, triton.next_power_of_2(K)), PER_CHANNEL=per_channel,
    )
    return gc
