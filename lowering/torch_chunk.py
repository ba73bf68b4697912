"""The chunked gated delta rule, vectorized in PyTorch: the CPU implementation of
``graphdelta.ops.chunk_gated_delta_rule``.

Per chunk of C tokens, with G the chunk-local cumulative log-decay and S the state at the
chunk start (notation of the DeltaNet / Gated DeltaNet papers)::

    A[i, j] = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)      (j < i)
    (I + A) [u | w] = [beta v | beta k exp(G)]              (one triangular solve)
    U = u - w S                                            (the delta-rule corrections)
    o = (q exp(G)) S + P U,   P[i, j] = sum_c q_ic k_jc exp(G_ic - G_jc)  (j <= i)
    S' = exp(G_last) S + (k exp(G_last - G))^T U

Every quantity except the scan over chunks is computed for all chunks at once; every exponent
is a difference inside a chunk, with the non-causal entries masked before the exp.

The gate's whole domain is legal: g = -inf (a full reset) or -1e38 would make those differences
-inf - (-inf) = NaN, or absorb every later gate of the chunk into the huge one. Each token's g is
first raised to ``gate_floor`` (exp of it is ~0 in the compute dtype), so the cumulative sums
stay finite and exact enough.
"""
from __future__ import annotations

import torch

from .contract import compute_dtype, l2norm, to_kv
from .varlen import Packing, pad_to_multiple

SUBCHUNK = 16
SCAN_GROUP = 16  # chunks whose outputs are computed together after the scan (see the scan)
GRAM_BYTES = 256 << 20  # bound on a per-channel gram's largest temporary (_per_channel_grams)


def _causal_mask(n: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def gate_floor(dtype: torch.dtype) -> float:
    """The lowest log-decay of a single token the chunked op works with (-80 in float32, -700 in
    float64): g = -inf would make the chunk's differences of cumulative sums -inf - (-inf), and
    exp of it is 0 in ``decay`` anyway (below ``decay_cutoff``)."""
    return -700.0 if dtype == torch.float64 else -80.0


def decay_cutoff(dtype: torch.dtype) -> float:
    """The log-decay below which ``decay`` gives exactly 0: -30 in float32 (exp(-30) = 9.4e-14,
    seven orders of magnitude below float32's resolution next to the undecayed terms of every
    output), the gate floor in float64."""
    return gate_floor(dtype) if dtype == torch.float64 else -30.0


def decay(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(x)`` for log-decays ``x <= 0``: exactly 0 below ``decay_cutoff`` and, with ``mask``,
    where it is False.

    Why not a floored exp(-80) = 1.8e-35: x86 runs arithmetic on subnormal floats through a
    microcode assist, 10-100x slower, and the products of such a decay with the q, k, beta and
    state values of the chunk land in the subnormal range (below 1.2e-38). With steep gates
    (Qwen3-Next's A = exp(A_log) of ~7 gives g ~ -10 per token) most decays of a chunk did, and
    the op ran 14x slower at 1 thread (``benchmarks/ops_cpu.py --gate-scale 10``; BENCHMARKS.md).
    Above the cutoff a decay is >= 9.4e-14, and products of two of them with O(1e-6) values
    stay normal; below it, 0 makes every product exactly 0, at full speed. Cut entries go
    through exp(0) and are zeroed after: exp(-inf) is a slow path too.
    """
    keep = x >= decay_cutoff(x.dtype)
    if mask is not None:
        keep = keep & mask
    return torch.where(keep, x, 0.0).exp_().mul_(keep)


def _before_sub_chunk(C: int, bs: int, device) -> torch.Tensor:
    """``[C // bs, C]``: True where column j lies before the first row of sub-chunk r."""
    return torch.arange(C, device=device)[None, :] < (torch.arange(C // bs, device=device) * bs)[:, None]


def causal_decay(G: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = exp(G_i - G_j)`` for ``j <= i``, else 0; G ``[..., C]`` non-increasing along C.

    Computed per 16-row sub-chunk: the diagonal 16x16 blocks directly, the blocks left of them
    through the sub-chunk's first row r, ``exp(G_i - G_r) exp(G_r - G_j)``: two factors <= 1,
    so nothing overflows, and an outer product instead of an exp per entry (exp dominated the
    CPU op: 1.4 exps/ns on two cores against 6.5 multiplies/ns).
    """
    C = G.shape[-1]
    bs = min(SUBCHUNK, C)
    nb = C // bs
    Gb = G.unflatten(-1, (nb, bs))  # [..., nb, bs]
    Gref = Gb[..., :1]  # [..., nb, 1]
    before_ref = _before_sub_chunk(C, bs, G.device)  # [nb, C]
    cols = decay(Gref - G.unsqueeze(-2), before_ref)  # [..., nb, C]: exp(G_r - G_j), j < r
    D = decay(Gb - Gref).unsqueeze(-1) * cols.unsqueeze(-2)  # [..., nb, bs, C]
    diag = decay(Gb.unsqueeze(-1) - Gb.unsqueeze(-2), _causal_mask(bs, False, G.device))  # [..., nb, bs, bs]
    # The blocks of D on and right of the diagonal are zero (cols is masked there).
    D.unflatten(-1, (nb, bs)).diagonal(dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))
    return D.flatten(-3, -2)


def decayed_gram(a: torch.Tensor, b: torch.Tensor, G: torch.Tensor, strict: bool) -> torch.Tensor:
    """``M[i, j] = sum_c a_ic b_jc exp(G_ic - G_jc)`` for ``j < i`` (strict) or ``j <= i``, else 0,
    for a per-channel gate (a scalar gate factors out: ``causal_decay`` times ``a @ b^T``).

    a, b: ``[..., C, K]`` (broadcastable); G: ``[..., C, K]``, non-increasing along C.
    Returns ``[..., C, C]``.
    """
    mask = _causal_mask(a.shape[-2], strict, a.device)
    # A per-channel decay cannot be pulled out of the dot product, and the full [C, C, K]
    # tensor is too large. Blocks below the diagonal of 16x16 sub-chunks go through a
    # reference row r between j and i: exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), two
    # factors <= 1 that cannot overflow. Only the diagonal sub-blocks are computed directly.
    C, K = G.shape[-2:]
    bs = min(SUBCHUNK, C)
    nb = C // bs
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], G.shape[:-2])
    a, b, G = (x.expand(*lead, C, K) for x in (a, b, G))
    Gblk = G.unflatten(-2, (nb, bs))  # [..., nb, bs, K]
    Gref = Gblk[..., 0, :]  # [..., nb, K]: first row of each block
    a_scaled = a.unflatten(-2, (nb, bs)) * decay(Gblk - Gref.unsqueeze(-2))
    before_ref = _before_sub_chunk(C, bs, G.device)  # [nb, C]
    expo = Gref.unsqueeze(-2) - G.unsqueeze(-3)  # [..., nb, C, K]
    b_scaled = b.unsqueeze(-3) * decay(expo, before_ref[..., None])
    M = (a_scaled @ b_scaled.transpose(-1, -2)).flatten(-3, -2)  # [..., C, C]

    ablk, bblk = a.unflatten(-2, (nb, bs)), b.unflatten(-2, (nb, bs))
    diff = Gblk.unsqueeze(-2) - Gblk.unsqueeze(-3)  # [..., nb, bs, bs, K]
    diag = (ablk.unsqueeze(-2) * bblk.unsqueeze(-3) * decay(diff, mask[:bs, :bs, None])).sum(-1)  # [..., nb, bs, bs]
    M = M.unflatten(-2, (nb, bs)).unflatten(-1, (nb, bs)).clone()  # [..., nb, bs, nb, bs]
    torch.diagonal(M, dim1=-4, dim2=-2).add_(diag.movedim(-3, -1))
    return M.flatten(-4, -3).flatten(-2, -1)


def _per_channel_grams(qc: torch.Tensor, kc: torch.Tensor, G: torch.Tensor,
                       bc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA's ``A = beta * decayed_gram(k, k)`` (strict) and ``P = decayed_gram(q, k)``, chunk-major
    (dim 0: chunks), a group of chunks at a time: ``decayed_gram``'s temporaries hold K values
    per (row, column) pair of a 16-row sub-chunk, 16x more than its result, which at 8192
    tokens of 96 heads would be tens of GB at once."""
    per_chunk = G[:1].numel() * SUBCHUNK * G.element_size()  # the [.., nb, bs, bs, K] temporary
    step = max(1, GRAM_BYTES // max(per_chunk, 1))
    NC, C = G.shape[0], G.shape[-2]
    shape = (NC, *torch.broadcast_shapes(qc.shape[1:-1], G.shape[1:-1]), C)
    A, P = G.new_empty(shape), G.new_empty(shape)
    for s in range(0, NC, step):
        c = slice(s, s + step)
        torch.mul(decayed_gram(kc[c], kc[c], G[c], strict=True), bc[c].unsqueeze(-1), out=A[c])
        P[c] = decayed_gram(qc[c], kc[c], G[c], strict=False)
    return A, P


def unit_lower_inverse_(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)^-1`` for the strictly lower triangle of ``A`` ``[..., C, C]`` (C a multiple of
    16 or <= 16), written over ``A`` and returned; the diagonal and upper triangle of ``A`` are
    never read.

    The 16x16 diagonal blocks are inverted by a right-looking elimination vectorized over every
    block of every chunk (15 fused multiply-adds: a third of the time of row-by-row
    substitution on CPU), then the block rows are merged top-down:
    ``T_ij = -T_ii sum_{j <= l < i} A_il T_lj``. Block row i of A is read only to build block
    row i of T, so T overwrites A (one C x C buffer per chunk less at the op's peak). The
    caller multiplies by the full inverse: two wide batched matmuls run several times faster
    than a block substitution's 16-row ones.
    """
    C = A.shape[-1]
    bs = min(SUBCHUNK, C)
    nb = C // bs
    L = A.unflatten(-2, (nb, bs)).unflatten(-1, (nb, bs)).diagonal(dim1=-4, dim2=-2)
    L = L.movedim(-1, -3).contiguous()  # [..., nb, bs, bs]: the diagonal blocks
    inv = torch.eye(bs, dtype=A.dtype, device=A.device).expand(L.shape).clone()
    for j in range(bs - 1):
        # Column j of L is untouched by the eliminations before it, and row j of the inverse
        # is final and zero right of j.
        inv[..., j + 1:, : j + 1].addcmul_(L[..., j + 1:, j : j + 1], inv[..., j : j + 1, : j + 1], value=-1)
    if nb == 1:
        return A.copy_(inv.squeeze(-3))
    for i in range(nb):
        rows, done = slice(i * bs, (i + 1) * bs), slice(0, i * bs)
        if i:
            A[..., rows, done] = -inv[..., i, :, :] @ (A[..., rows, done] @ A[..., done, done])
        A[..., rows, rows] = inv[..., i, :, :]
        A[..., rows, (i + 1) * bs:] = 0
    return A


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

    Returns ``o`` ``[B, T, HV, V]`` in v's dtype and the final state ``[N, HV, K, V]`` (kv) or
    ``[N, HV, V, K]`` (vk) in float32 (float64 for float64 inputs).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    Gs = HV // H
    out_dtype, cdt = v.dtype, compute_dtype(v.dtype)
    per_channel = g.dim() == 4
    q, k, v, g, beta = (x.to(cdt) for x in (q, k, v, g, beta))
    g = g.clamp_min(gate_floor(cdt))  # -inf and -1e38 are legal gates (see the module doc)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale

    packing = None
    if cu_seqlens is not None:
        packing = Packing.from_cu_seqlens(cu_seqlens, SUBCHUNK)
        q, k, v, g, beta = (packing.pad(x) for x in (q, k, v, g, beta))
    N, L = q.shape[:2]
    # Short inputs get a smaller chunk (a multiple of the 16-token sub-chunk).
    C = min(chunk_size, -(-max(L, 1) // SUBCHUNK) * SUBCHUNK)
    q, k, v, g, beta = (pad_to_multiple(x, C) for x in (q, k, v, g, beta))
    NC = q.shape[1] // C

    # Chunk-major views: key tensors [NC, N, H, 1, C, K] broadcast over the Gs value heads that
    # read them; value-side tensors [NC, N, H, Gs, C, ...]. Chunk-major, so that each step of
    # the scan below reads contiguous slices and updates them in place: on CPU, fresh
    # megabyte-sized allocations per step cost more than the matmuls (page faults).
    def chunk_major(x: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
        x = x.reshape(N, NC, C, heads, groups, *x.shape[3:])
        return x.permute(1, 0, 3, 4, 2, *range(5, x.dim())).contiguous()

    qc, kc = chunk_major(q, H, 1), chunk_major(k, H, 1)
    vc, bc, gc = chunk_major(v, H, Gs), chunk_major(beta, H, Gs), chunk_major(g, H, Gs)
    G = gc.cumsum(dim=4)  # restarts at every chunk
    G_last = G[:, :, :, :, -1]  # [NC, N, H, Gs] or [NC, N, H, Gs, K]
    expG = decay(G if per_channel else G.unsqueeze(-1))

    if per_channel:
        A, P = _per_channel_grams(qc, kc, G, bc)
    else:  # one decay matrix for both; A's diagonal is never read (unit_lower_inverse_)
        D = causal_decay(G)
        A = (kc @ kc.transpose(-1, -2)).mul(D).mul_(bc.unsqueeze(-1))
        P = D.mul_(qc @ kc.transpose(-1, -2))
    # The inverse of I + A, then two batched matmuls: torch's batched triangular solve loops
    # over the 64x64 systems one at a time (it took over half of the op's time on CPU,
    # benchmarks/ops_cpu.py).
    A_inv = unit_lower_inverse_(A)
    b = bc.unsqueeze(-1)
    u = A_inv @ (vc * b)
    w = A_inv @ (kc * b * expG)
    qg = qc * expG
    tail = (G_last.unsqueeze(-2) - G) if per_channel else (G_last.unsqueeze(-1) - G).unsqueeze(-1)
    kd = kc * decay(tail)
    state_decay = decay(G_last).unsqueeze(-1) if per_channel else decay(G_last)[..., None, None]

    # The scan over chunks, on flat batches of N * H * Gs (sequence, head) pairs. Only the
    # state recurrence is sequential: per chunk, one batched matmul turns u into the delta-rule
    # corrections U = u - w S in place, one more gives the next state. The outputs
    # o = P U + (q exp(G)) S of a group of chunks then come from two wide batched matmuls over
    # the group's stored chunk-start states: on CPU every op costs ~10 us of dispatch, which at
    # short prompts outweighs its arithmetic. Groups bound the stored states' memory.
    Bf = N * H * Gs
    u, w, qg, kd, P = (x.reshape(NC, Bf, *x.shape[-2:]) for x in (u, w, qg, kd, P))
    state_decay = state_decay.reshape(NC, Bf, -1, 1)
    group = min(NC, SCAN_GROUP)
    states = q.new_empty(group + 1, Bf, K, V)  # states[i]: the state at the start of the group's chunk i
    if initial_state is None:
        states[0].zero_()
    else:
        states[0].copy_(to_kv(initial_state, state_layout).reshape(Bf, K, V))
    o = q.new_empty(NC, Bf, C, V)
    U_, w_, kdT_, decay_ = u.unbind(0), w.unbind(0), kd.transpose(-1, -2).unbind(0), state_decay.unbind(0)
    S_ = states.unbind(0)
    for start in range(0, NC, group):
        n = min(group, NC - start)
        for i, c in enumerate(range(start, start + n)):
            U_[c].baddbmm_(w_[c], S_[i], alpha=-1)
            torch.mul(S_[i], decay_[c], out=S_[i + 1]).baddbmm_(kdT_[c], U_[c])
        chunks = slice(start, start + n)
        out = o[chunks].flatten(0, 1)
        torch.bmm(P[chunks].flatten(0, 1), u[chunks].flatten(0, 1), out=out)
        out.baddbmm_(qg[chunks].flatten(0, 1), states[:n].flatten(0, 1))
        S_[0].copy_(S_[n])
    S = S_[0]
    o = o.view(NC, N, H, Gs, C, V).permute(1, 0, 4, 2, 3, 5).reshape(N, NC * C, HV, V)[:, :L]
    if packing is not None:
        o = packing.unpad(o, T)
    return o.to(out_dtype), to_kv(S.reshape(N, HV, K, V), state_layout).contiguous()
