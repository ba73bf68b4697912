"""Stage 4 of the chunked gated delta rule: the scan over chunks, the only sequential stage.

One program per (value tile, head, sequence) walks the chunks of its sequence in order,
holding the state tile ``S [K, BV]`` in registers. Per chunk, with G_last the cumulative gate
at the chunk's last token::

    h[chunk] = S                                           (the state at the chunk start)
    U = u - w S                                            (delta-rule corrected values)
    S = exp(G_last) S + (k exp(G_last - G))^T U

It reads the initial state and writes the final state in the caller's layout (``kv``:
``[N, HV, K, V]``; ``vk``: ``[N, HV, V, K]``); the per-chunk states ``h`` are always [K, V].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contract import state_shape
from .triton_autotune import autotune
from .triton_chunk_utils import ChunkPlan, constexpr_flags, load_gate, load_qk


def shared_memory(config: triton.Config, args: dict) -> int:
    """Shared memory of a config in bytes, fitted on sm_90 compiles (Triton 3.9; bf16 and fp32,
    K = 128 and 256, GDN and KDA; tests/test_autotune.py holds them) so that it is never below
    the compiler's number and falls on the same side of the limit. Unpipelined (1 stage): the
    fp32 operands w ``[C, BK]``, U ``[C, BV]`` and S ``[BK, BV]``. Pipelined: each stage buffers
    w and u fp32, k and the gate; 16-bit k adds its fp32 conversion. KDA's per-channel gate
    makes 3-stage configs too large at K = 128 (241 to 295 KB), and at K = 256 only unpipelined
    configs fit (86 to 147 KB)."""
    C, BK, BV, stages = args["C"], args["BK"], config.kwargs["BV"], config.num_stages
    if stages == 1:
        return 4 * (C * BK + C * BV + BK * BV)
    gate = BK if args["PER_CHANNEL"] else 1
    el = args["k"].element_size()
    stage = 4 * C * (BK + BV + gate) + el * C * BK + 1024
    base = 8 * C * (BK * BK // 128 + BV) if el < 4 else 4 * C * BK * BK // 128 + BK * BV
    return (stages - 1) * stage + base


@triton.heuristics(constexpr_flags("IS_VARLEN", "HAS_INITIAL_STATE"))
@autotune(configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                   for bv in (64, 32, 16) for nw in (4, 8) for ns in (2, 3)]
          + [triton.Config({"BV": bv}, num_warps=4, num_stages=1) for bv in (32, 16)],
          key=["H", "HV", "K", "V", "C", "PER_CHANNEL"], shared_memory=shared_memory)
@triton.jit
def chunk_state_scan_kernel(
    k, w, u, gc, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STATE_VK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        s0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        s0 = i_n.to(tl.int64) * NT
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    # offsets of S[k, v] in a state [K, V] (kv) or [V, K] (vk) of one (sequence, head)
    if STATE_VK:
        o_s = o_v[None, :] * K + o_k[:, None]
    else:
        o_s = o_k[:, None] * V + o_v[None, :]
    o_sh = i_nh.to(tl.int64) * K * V
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL_STATE:
        b_S += tl.load(initial_state + o_sh + o_s, mask=m_kv, other=0.0).to(tl.float32)

    for i_c in range(tl.cdiv(eos - bos, C)):
        o_t = bos + i_c * C + o_c
        m_t = o_t < eos
        p_h = h + ((s0 + i_c) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_h, b_S, mask=m_kv)

        b_w = tl.load(w + (o_t[:, None] * HV + i_hv) * K + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        o_x = (o_t[:, None] * HV + i_hv) * V + o_v[None, :]
        m_x = m_t[:, None] & (o_v < V)[None, :]
        b_u = tl.load(u + o_x, mask=m_x, other=0.0)
        b_U = b_u - tl.dot(b_w, b_S, input_precision=DOT_PRECISION)  # [C, BV]
        tl.store(v_new + o_x, b_U, mask=m_x)

        b_k, _ = load_qk(k, o_t, eos, i_h, H, K, C, BK, L2NORM)
        b_g = load_gate(gc, o_t, bos, eos, i_hv, HV, K, BK, PER_CHANNEL)
        # rows past eos repeat the last one, so row C-1 holds G_last
        if PER_CHANNEL:
            b_glast = tl.sum(tl.where((o_c == C - 1)[:, None], b_g, 0.0), axis=0)  # [BK]
            b_kd = b_k * tl.exp(b_glast[None, :] - b_g)
            b_S = b_S * tl.exp(b_glast)[:, None]
        else:
            b_glast = tl.sum(tl.where(o_c == C - 1, b_g, 0.0), axis=0)
            b_kd = b_k * tl.exp(b_glast - b_g)[:, None]
            b_S = b_S * tl.exp(b_glast)
        b_S += tl.dot(tl.trans(b_kd), b_U, input_precision=DOT_PRECISION)

    tl.store(final_state + o_sh + o_s, b_S, mask=m_kv)


def chunk_state_scan(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gc: torch.Tensor,
                     initial_state: torch.Tensor | None, plan: ChunkPlan, state_layout: str,
                     use_qk_l2norm_in_kernel: bool, dot_precision: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k ``[B, T, H, K]``, w ``[B, T, HV, K]``, u ``[B, T, HV, V]``, gc ``[B, T, HV(, K)]``,
    initial_state ``[N, HV, K, V]`` (kv) / ``[N, HV, V, K]`` (vk) or None ->
    h ``[num_slots, HV, K, V]`` (state at each chunk start), v_new ``[B, T, HV, V]`` (the
    corrected values U) and the final state (fp32, ``initial_state``'s layout)."""
    B, T, H, K = k.shape
    HV, V = u.shape[2:]
    N = plan.num_seqs
    h = torch.empty(plan.num_slots, HV, K, V, dtype=torch.float32, device=k.device)
    v_new = torch.empty_like(u)
    final_state = torch.empty(state_shape(N, HV, K, V, state_layout), dtype=torch.float32, device=k.device)

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), N * HV)

    chunk_state_scan_kernel[grid](
        k=k, w=w, u=u, gc=gc, h=h, v_new=v_new, initial_state=initial_state,
        final_state=final_state, cu_seqlens=plan.cu_seqlens, chunk_offsets=plan.chunk_offsets,
        T=T, NT=plan.chunks_per_row, H=H, HV=HV, K=K, V=V, C=plan.chunk_size,
        BK=max(16, triton.next_power_of_2(K)), PER_CHANNEL=gc.dim() == 4,
        L2NORM=use_qk_l2norm_in_kernel, STATE_VK=state_layout == "vk",
        DOT_PRECISION=dot_precision,
    )
    return h, v_new, final_state
