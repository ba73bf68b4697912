"""What the stages of the Triton chunked gated delta rule (``triton_chunk.py``) share.

- ``ChunkPlan``: chunk size, sequence bounds and, for packed sequences, the chunk table that
  maps a program to its (sequence, chunk), built on the device without a host sync, once per
  ``cu_seqlens`` tensor (``ChunkPlan.for_call``);
- ``chunk_span``: the token range of one chunk, inside a kernel;
- ``load_qk`` / ``load_gate``: a block of q or k rows (optionally l2-normalized) and of the
  cumulative gate, read so that rows past the end of a sequence can never make an exponent
  positive;
- ``decayed_gram_left`` / ``decayed_gram_diag``: ``sum_c a_ic b_jc exp(G_ic - G_jc)`` for one
  16-row block of a chunk, left of and inside its diagonal block, for the scalar (GDN) and the
  per-channel (KDA) gate;

Token tensors are addressed flat: token ``t`` of batch row ``b`` is ``b * T + t``; packed
sequences live in a ``B == 1`` batch, so their tokens are already flat.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import contract

SUBCHUNK = 16  # rows of the diagonal blocks (tl.dot needs >= 16 under the interpreter)
CHUNK_SIZES = (16, 32, 64)
L2NORM_EPS = tl.constexpr(contract.L2NORM_EPS)


# Optional inputs become constexpr flags (triton.heuristics) of the kernels that take them.
_FLAGS = {
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    "HAS_INITIAL_STATE": lambda args: args["initial_state"] is not None,
}


def constexpr_flags(*names: str) -> dict:
    """The ``triton.heuristics`` that derive the constexpr flags ``names`` from the arguments."""
    return {name: _FLAGS[name] for name in names}


def dot_precision(*tensors: torch.Tensor) -> str:
    """``tl.dot`` precision of the stages' products: full fp32 when every input is fp32; tf32
    when one is 16-bit, whose own rounding (2^-8 / 2^-11) is already at the tf32 level. The
    triangular solve always uses full fp32. (Not measured on a GPU yet.)"""
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"


@dataclass
class ChunkPlan:
    """How the tokens of a call split into chunks of ``chunk_size``.

    Without ``cu_seqlens`` each of the B batch rows is a sequence of T tokens in
    ``cdiv(T, C)`` chunks, and chunk slot ``b * NT + i`` holds chunk i of row b. With packed
    sequences the slots are numbered sequence after sequence; ``num_slots = T // C + N`` bounds
    ``sum_n cdiv(len_n, C)`` without reading the lengths on the host, and the spare slots at
    the end map past the last token, so their programs read and write nothing.
    """

    chunk_size: int
    num_seqs: int  # N
    num_slots: int  # number of per-chunk state slots
    chunks_per_row: int  # NT: per-chunk grid size along a batch row (num_slots when packed)
    cu_seqlens: torch.Tensor | None  # [N + 1] int
    chunk_indices: torch.Tensor | None  # [num_slots, 2] int32: (sequence, chunk in sequence)
    chunk_offsets: torch.Tensor | None  # [N + 1] int32: first slot of each sequence

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None

    @staticmethod
    def build(batch: int, total: int, cu_seqlens: torch.Tensor | None,
              chunk_size: int) -> "ChunkPlan":
        if chunk_size not in CHUNK_SIZES:
            raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
        C = chunk_size
        if cu_seqlens is None:
            NT = triton.cdiv(total, C)
            return ChunkPlan(C, batch, batch * NT, NT, None, None, None)
        N = cu_seqlens.shape[0] - 1
        offsets = cu_seqlens.to(torch.int64)
        counts = (offsets[1:] - offsets[:-1] + C - 1) // C
        chunk_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        num_slots = total // C + N
        slots = torch.arange(num_slots, device=offsets.device)
        # sequence of a slot = number of sequences that end at or before it
        seq = torch.searchsorted(chunk_offsets[1:], slots, right=True).clamp_(max=N - 1)
        table = torch.stack([seq, slots - chunk_offsets[seq]], dim=1).to(torch.int32)
        return ChunkPlan(C, N, num_slots, num_slots, cu_seqlens, table.contiguous(),
                         chunk_offsets.to(torch.int32))

    @staticmethod
    def for_call(batch: int, total: int, cu_seqlens: torch.Tensor | None,
                 chunk_size: int) -> "ChunkPlan":
        """``build``, reusing the last packed plan while the same ``cu_seqlens`` tensor comes
        back unchanged: every linear layer of a forward passes the one its runner built, and a
        plan costs about 8 small kernels (fla's ``tensor_cache`` does the same)."""
        global _last_plan
        # Built afresh: without cu_seqlens; for an inference tensor, which has no version
        # counter to tell a refill; and while a CUDA graph is captured, whose replays must run
        # the plan's kernels on the buffer's values of the day (a cached plan would be frozen
        # into the graph, and freed under it once another call replaced it).
        if (cu_seqlens is None or cu_seqlens.is_inference()
                or (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing())):
            return ChunkPlan.build(batch, total, cu_seqlens, chunk_size)
        key = (cu_seqlens._version, batch, total, chunk_size)
        last = _last_plan
        if last is not None and last[0]() is cu_seqlens and last[1] == key:
            return last[2]
        plan = ChunkPlan.build(batch, total, cu_seqlens, chunk_size)
        _last_plan = (weakref.ref(cu_seqlens), key, plan)
        return plan

    def chunk_grid(self, batch: int, heads: int) -> tuple[int, int]:
        """Grid of the per-chunk stages: (chunk of a batch row, batch row * head)."""
        return (self.chunks_per_row, batch * heads)


_last_plan: tuple | None = None  # (weak reference to cu_seqlens, key, plan) of the last packed call


@triton.jit
def chunk_span(i_t, i_b, cu_seqlens, chunk_indices, T, NT, C: tl.constexpr,
               IS_VARLEN: tl.constexpr):
    """Program ``i_t`` of the per-chunk grid (batch row ``i_b``) -> ``(bos, eos, t0, i_s)``: the
    flat first token and end of its sequence, the flat first token of its chunk, and its slot."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_s = i_t.to(tl.int64)
    else:
        bos = i_b.to(tl.int64) * T
        eos = bos + T
        i_c = i_t.to(tl.int64)
        i_s = i_b.to(tl.int64) * NT + i_t
    return bos, eos, bos + i_c * C, i_s


@triton.jit
def load_qk(x, o_t, eos, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
            L2NORM: tl.constexpr):
    """Rows ``o_t`` ``[BT]`` of head ``i_h`` of q or k ``[*, H, K]``, fp32 and zero past ``eos``
    and past K -> ``(b_x [BT, BK], b_f [BT])``: the rows l2-normalized (``x * rsqrt(sum x^2 +
    eps)``) if ``L2NORM``, and the per-row factor that was applied (ones otherwise)."""
    o_k = tl.arange(0, BK)
    m = (o_t < eos)[:, None] & (o_k < K)[None, :]
    b_x = tl.load(x + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    if L2NORM:
        b_f = tl.rsqrt(tl.sum(b_x * b_x, axis=1) + L2NORM_EPS)
        b_x = b_x * b_f[:, None]
    else:
        b_f = tl.full([BT], 1.0, dtype=tl.float32)
    return b_x, b_f


@triton.jit
def gate_rows(o_t, bos, eos, i_hv, HV: tl.constexpr, K: tl.constexpr):
    """Offsets of the first gate channel of rows ``o_t`` in the cumulative gate ``[*, HV(, K)]``
    (K = 1 for a scalar gate) and their mask. Rows past ``eos`` read the last row of the
    sequence, as if their gate were 0, so that every difference "later row minus earlier row"
    stays <= 0 and no exponent can overflow."""
    o_tc = tl.minimum(o_t, eos - 1)
    return (o_tc * HV + i_hv) * K, o_tc >= bos  # the mask is false only in an empty sequence


@triton.jit
def load_gate(gc, o_t, bos, eos, i_hv, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
              PER_CHANNEL: tl.constexpr):
    """The chunk-local cumulative gate at rows ``o_t``: ``[BT]`` (scalar) or ``[BT, BK]``
    (per-channel), fp32 (see ``gate_rows`` for rows past the end)."""
    if PER_CHANNEL:
        o_g, m_g = gate_rows(o_t, bos, eos, i_hv, HV, K)
        o_k = tl.arange(0, BK)
        b_g = tl.load(gc + o_g[:, None] + o_k[None, :], mask=m_g[:, None] & (o_k < K)[None, :],
                      other=0.0)
    else:
        o_g, m_g = gate_rows(o_t, bos, eos, i_hv, HV, 1)
        b_g = tl.load(gc + o_g, mask=m_g, other=0.0)
    return b_g


@triton.jit
def decayed_gram_left(b_a, b_ga, b_b, b_gb, i_r, C: tl.constexpr, BC: tl.constexpr,
                      PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``M[i, j] = sum_c a_ic b_jc exp(G_ic - G_jc)`` for the ``BC`` rows ``i = i_r * BC + ...``
    of a chunk and the columns j left of their diagonal block (``j < i_r * BC``); ``[BC, C]``
    fp32, zero from column ``i_r * BC`` on.

    b_a ``[BC, BK]``, b_ga ``[BC]`` / ``[BC, BK]``: a and G at the rows; b_b ``[C, BK]``,
    b_gb ``[C]`` / ``[C, BK]``: b and G at every row of the chunk.
    """
    o_j = tl.arange(0, C)
    m_left = o_j < i_r * BC
    if PER_CHANNEL:
        # A per-channel decay does not factor out of the sum; go through the block's first row
        # r: exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), two factors <= 1 for j < r <= i.
        b_gr = tl.sum(tl.where((tl.arange(0, BC) == 0)[:, None], b_ga, 0.0), axis=0)  # [BK]
        b_ar = b_a * tl.exp(b_ga - b_gr[None, :])
        b_br = b_b * tl.exp(tl.where(m_left[:, None], b_gr[None, :] - b_gb, float("-inf")))
        b_m = tl.dot(b_ar, tl.trans(b_br), input_precision=DOT_PRECISION)
    else:
        b_m = tl.dot(b_a, tl.trans(b_b), input_precision=DOT_PRECISION)
        b_m = b_m * tl.exp(tl.where(m_left[None, :], b_ga[:, None] - b_gb[None, :], float("-inf")))
    return b_m


@triton.jit
def decayed_gram_diag(b_a, b_b, b_g, p_a, p_b, f_a, f_b, m_r, p_g, m_g,
                      K: tl.constexpr, BC: tl.constexpr, BKD: tl.constexpr, STRICT: tl.constexpr,
                      PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``M[i, j] = sum_c a_ic b_jc exp(G_ic - G_jc)`` inside one diagonal ``BC x BC`` block,
    zero where ``j > i`` (``j >= i`` if ``STRICT``); ``[BC, BC]`` fp32.

    Scalar gate: from the register tiles b_a, b_b ``[BC, BK]`` and b_g ``[BC]``. Per-channel
    gate: the ``[BC, BC, K]`` product is too large for registers, so a, b and G are read again
    ``BKD`` channels at a time: p_a, p_b ``[BC]`` row pointers of a and b (rows masked by m_r,
    scaled by f_a, f_b ``[BC]``), p_g ``[BC]`` row pointers of G (masked by m_g).
    """
    o_d = tl.arange(0, BC)
    if STRICT:
        m_ij = o_d[:, None] > o_d[None, :]
    else:
        m_ij = o_d[:, None] >= o_d[None, :]
    if PER_CHANNEL:
        b_m = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BKD)):
            o_k = i_k * BKD + tl.arange(0, BKD)
            m_k = (o_k < K)[None, :]
            m_rk = m_r[:, None] & m_k
            b_ak = tl.load(p_a[:, None] + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
            b_bk = tl.load(p_b[:, None] + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
            b_gk = tl.load(p_g[:, None] + o_k[None, :], mask=m_g[:, None] & m_k, other=0.0)
            b_dec = tl.where(m_ij[:, :, None], b_gk[:, None, :] - b_gk[None, :, :], float("-inf"))
            b_m += tl.sum(b_ak[:, None, :] * b_bk[None, :, :] * tl.exp(b_dec), axis=2)
        b_m = b_m * f_a[:, None] * f_b[None, :]
    else:
        b_m = tl.dot(b_a, tl.trans(b_b), input_precision=DOT_PRECISION)
        b_m = b_m * tl.exp(tl.where(m_ij, b_g[:, None] - b_g[None, :], float("-inf")))
    return b_m
