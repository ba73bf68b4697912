"""The chunked gated delta rule in Triton: the CUDA implementation of
``graphdelta.ops.chunk_gated_delta_rule`` (and, under ``TRITON_INTERPRET=1``, a CPU one for
tests). Same contract and notation as ``torch_chunk.py``; one stage per file:

1. ``triton_cumsum``: G, the chunk-local cumsum of the log-decay g;
2. ``triton_kkt_solve``: ``A = beta K K^T`` decayed, then ``(I + A)^-1`` per chunk;
3. ``triton_wy``: ``w = (I + A)^-1 (beta k exp(G))``, ``u = (I + A)^-1 (beta v)``;
4. ``triton_state_scan``: the scan over chunks: states at chunk starts, corrected values U,
   final state;
5. ``triton_output``: ``o = (q exp(G)) S + P U``.

Every kernel is specialized (constexpr) on the gate kind (scalar GDN / per-channel KDA), the
GVA ratio HV // H (value head h reads key head ``h // (HV // H)`` by indexing), the chunk size
(16, 32, 64), packed sequences, the presence of an initial state, the state layout and
in-kernel q/k l2-normalization.

Every exponent is a "later minus earlier" difference of the cumulative gate inside one chunk,
masked to -inf before the exp wherever it would not be, so no exp sees a positive argument
however strong the decay. Each g is raised to -80 before the cumulative sum, so g = -inf (a full
reset) and g = -1e38 stay finite (tests/test_domain.py). Arithmetic is fp32; products of
16-bit inputs may use tf32 (``dot_precision``), the triangular solve never does.
"""
from __future__ import annotations

import torch

from .contract import state_shape
from .triton_chunk_utils import ChunkPlan, dot_precision
from .triton_cumsum import chunk_cumsum
from .triton_kkt_solve import chunk_kkt, solve_tril
from .triton_output import chunk_output
from .triton_state_scan import chunk_state_scan
from .triton_wy import recompute_w_u

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule on validated inputs (shapes as in ``graphdelta.ops``).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV]`` (GDN) or
            ``[B, T, HV, K]`` (KDA); beta: ``[B, T, HV]``; fp32, bf16 or fp16.
        initial_state: ``[N, HV, K, V]`` (kv) or ``[N, HV, V, K]`` (vk), or None.
        cu_seqlens: ``[N + 1]`` offsets of N sequences packed in a ``B == 1`` batch, or None.
        chunk_size: 16, 32 or 64.

    Returns:
        ``o`` ``[B, T, HV, V]`` in v's dtype and the final state ``[N, HV, K, V]`` (kv) or
        ``[N, HV, V, K]`` (vk) in fp32, both contiguous.
    """
    named = (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta))
    for name, x in (*named, ("initial_state", initial_state)):
        if x is not None and x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the Triton chunked gated delta rule supports {SUPPORTED_DTYPES}, got {name} in "
                f"{x.dtype} (use the torch backend for float64)"
            )
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    plan = ChunkPlan.for_call(batch=B, total=T, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    if T == 0:
        final = torch.zeros(state_shape(plan.num_seqs, HV, K, V, state_layout), dtype=torch.float32,
                            device=v.device)
        if initial_state is not None:
            final.copy_(initial_state)
        return v.new_empty(B, T, HV, V), final
    l2norm, precision = use_qk_l2norm_in_kernel, dot_precision(q, k, v)

    gc = chunk_cumsum(g=g, plan=plan)
    A = chunk_kkt(k=k, gc=gc, beta=beta, plan=plan, use_qk_l2norm_in_kernel=l2norm,
                  dot_precision=precision)
    Ai = solve_tril(A=A, plan=plan)
    w, u = recompute_w_u(k=k, v=v, beta=beta, gc=gc, Ai=Ai, plan=plan,
                         use_qk_l2norm_in_kernel=l2norm, dot_precision=precision)
    h, v_new, final_state = chunk_state_scan(k=k, w=w, u=u, gc=gc, initial_state=initial_state,
                                             plan=plan, state_layout=state_layout,
                                             use_qk_l2norm_in_kernel=l2norm,
                                             dot_precision=precision)
    o = chunk_output(q=q, k=k, v_new=v_new, h=h, gc=gc, scale=scale, plan=plan,
                     out_dtype=v.dtype, use_qk_l2norm_in_kernel=l2norm, dot_precision=precision)
    return o, final_state
