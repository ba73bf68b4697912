"""graphdelta's ops: the gated delta rule (GDN and KDA), its decode step over a state pool, the
causal depthwise conv1d and the gated RMSNorm of the linear-attention layers.

Each op is a ``torch.library.custom_op`` in the ``graphdelta`` namespace, so a compiled graph
holds one ``torch.ops.graphdelta.*`` node per call, with a fake implementation that gives the
real output shapes and strides. The public functions below validate their inputs (see
``graphdelta.checks``). Their signatures are close to fla's but not the same (a ``state_layout``
argument, ``cu_seqlens`` earlier); ``graphdelta.fla`` takes fla's own calls.

The implementation is chosen per device by ``graphdelta.lowering`` (Triton on CUDA, PyTorch
elsewhere; ``GRAPHDELTA_BACKEND`` forces one).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from graphdelta import checks
from graphdelta.lowering import implementation
from graphdelta.lowering.contract import compute_dtype, state_shape


def _gated_delta_fake(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, state_layout):
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = v.new_empty(B, T, HV, V)
    state = v.new_empty(state_shape(N, HV, K, V, state_layout), dtype=compute_dtype(v.dtype))
    return o, state


def on_device_of(t: Tensor):
    """The context an op body runs in: ``t``'s CUDA device made current. Triton launches on the
    current device and its current stream, so without it a tensor on ``cuda:1`` would be read
    by a kernel launched on ``cuda:0``. (A no-op on any other device.)"""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _empty(x: Tensor) -> bool:
    """No token at all (B == 0 or T == 0): every op's answer is then known without a kernel
    (zero outputs, states unchanged), and the kernels and the CPU path need not handle it."""
    return x.shape[0] == 0 or x.shape[1] == 0


def _gated_delta_empty(q, v, initial_state, cu_seqlens, state_layout) -> tuple[Tensor, Tensor]:
    B, T, _, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = v.new_zeros(state_shape(N, HV, K, V, state_layout), dtype=compute_dtype(v.dtype))
    if initial_state is not None:
        final.copy_(initial_state)
    return v.new_zeros(B, T, HV, V), final


@torch.library.custom_op("graphdelta::chunk_gated_delta_rule", mutates_args=())
def _chunk_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
    use_qk_l2norm_in_kernel: bool, state_layout: str,
) -> tuple[Tensor, Tensor]:
    if _empty(q):
        return _gated_delta_empty(q, v, initial_state, cu_seqlens, state_layout)
    fn = implementation("chunk_gated_delta_rule", q)
    with on_device_of(q):
        o, final = fn(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, state_layout)
        return o.contiguous(), final.contiguous()


@torch.library.custom_op("graphdelta::recurrent_gated_delta_rule", mutates_args=())
def _recurrent_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
    use_qk_l2norm_in_kernel: bool, state_layout: str,
) -> tuple[Tensor, Tensor]:
    if _empty(q):
        return _gated_delta_empty(q, v, initial_state, cu_seqlens, state_layout)
    fn = implementation("recurrent_gated_delta_rule", q)
    with on_device_of(q):
        o, final = fn(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, state_layout)
        return o.contiguous(), final.contiguous()


_chunk_op.register_fake(_gated_delta_fake)
_recurrent_op.register_fake(_gated_delta_fake)


@torch.library.custom_op("graphdelta::gated_delta_rule_decode", mutates_args=("state_pool",))
def _decode_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state_pool: Tensor,
    state_indices: Tensor, scale: float, use_qk_l2norm_in_kernel: bool, state_layout: str,
    output_intermediate_states: bool,
) -> tuple[Tensor, Tensor]:
    if _empty(q):  # the pool is left as it is
        B, T = q.shape[:2]
        inter_shape = (B, T, *state_pool.shape[1:]) if output_intermediate_states else (0,)
        return v.new_zeros(v.shape), state_pool.new_zeros(inter_shape)
    fn = implementation("gated_delta_rule_decode", q)
    with on_device_of(q):
        o, inter = fn(q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm_in_kernel,
                      state_layout, output_intermediate_states)
        return o.contiguous(), inter.contiguous()


@_decode_op.register_fake
def _(q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm_in_kernel, state_layout,
      output_intermediate_states):
    B, T = q.shape[:2]
    inter_shape = (B, T, *state_pool.shape[1:]) if output_intermediate_states else (0,)
    return v.new_empty(v.shape), state_pool.new_empty(inter_shape)


@torch.library.custom_op("graphdelta::causal_conv1d", mutates_args=())
def _conv_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], activation: Optional[str],
) -> tuple[Tensor, Tensor]:
    if _empty(x):  # no new input: the state is the initial one (zeros without one)
        N = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if initial_state is not None:
            return x.new_zeros(x.shape), initial_state.clone()
        return x.new_zeros(x.shape), x.new_zeros(N, x.shape[2], weight.shape[1] - 1, dtype=compute_dtype(x.dtype))
    with on_device_of(x):
        y, final = implementation("causal_conv1d", x)(x, weight, bias, initial_state, cu_seqlens, activation)
        return y.contiguous(), final.contiguous()


@_conv_op.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, activation):
    B, T, D = x.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        state = x.new_empty(N, D, weight.shape[1] - 1, dtype=compute_dtype(x.dtype))
    else:
        state = initial_state.new_empty(N, D, initial_state.shape[-1])
    return x.new_empty(B, T, D), state


@torch.library.custom_op("graphdelta::causal_conv1d_update", mutates_args=("conv_state",))
def _conv_update_op(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
    state_indices: Optional[Tensor], activation: Optional[str],
) -> Tensor:
    if _empty(x):  # the pool is left as it is
        return x.new_zeros(x.shape)
    with on_device_of(x):
        y = implementation("causal_conv1d_update", x)(x, conv_state, weight, bias, state_indices, activation)
        return y.contiguous()


@_conv_update_op.register_fake
def _(x, conv_state, weight, bias, state_indices, activation):
    return x.new_empty(x.shape)


@torch.library.custom_op("graphdelta::gated_rms_norm", mutates_args=())
def _norm_op(x: Tensor, gate: Tensor, weight: Tensor, eps: float, activation: str, norm_before_gate: bool) -> Tensor:
    with on_device_of(x):
        return implementation("gated_rms_norm", x)(x, gate, weight, eps, activation, norm_before_gate).contiguous()


@_norm_op.register_fake
def _(x, gate, weight, eps, activation, norm_before_gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def inductor_decompositions() -> dict:
    """graphdelta ops that inductor should see through rather than call. On CPU the gated
    RMSNorm is a few elementwise ops and a reduction, and the causal conv1d of a prompt (not
    packed) is W shifted multiply-adds and a SiLU: inductor fuses either with its neighbours
    better than an opaque call could (tiny Qwen3-Next, 2048 tokens: the conv op took 4.3 ms
    per layer; the fused kernel that holds it now, with the projection split and gate math,
    1.7-2.2 ms).
    On CUDA, and for packed prompts, the decompositions decline (NotImplemented) and the op
    stays, to run its kernel."""
    from graphdelta.lowering import backend_for, torch_conv, torch_norm

    def norm(x, gate, weight, eps, activation, norm_before_gate):
        if backend_for(x) != "torch":
            return NotImplemented
        return torch_norm.gated_rms_norm(x, gate, weight, eps, activation, norm_before_gate)

    def conv(x, weight, bias, initial_state, cu_seqlens, activation):
        if backend_for(x) != "torch" or cu_seqlens is not None:
            return NotImplemented
        return torch_conv.causal_conv1d_dense(x, weight, bias, initial_state, activation)

    return {torch.ops.graphdelta.gated_rms_norm.default: norm, torch.ops.graphdelta.causal_conv1d.default: conv}


# ----------------------------------------------------------------------------- public API


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    state_layout: str = "kv",
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule computed chunk by chunk (fla's ``chunk_gated_delta_rule`` signature).

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]``, ``HV % H == 0``; value head h reads key head ``h // (HV // H)``.
        g: log-decay (<= 0), ``[B, T, HV]`` (GDN, one per head) or ``[B, T, HV, K]`` (KDA, one
            per key channel).
        beta: ``[B, T, HV]``.
        scale: multiplies q; ``K ** -0.5`` when None.
        initial_state: ``[N, HV, K, V]`` (``state_layout="kv"``) or ``[N, HV, V, K]`` ("vk").
        output_final_state: return the final state (float32) as well.
        cu_seqlens: ``[N + 1]`` int offsets of N sequences packed in a ``B == 1`` batch.
        use_qk_l2norm_in_kernel: l2-normalize q and k (eps 1e-6) before scaling.
        state_layout: ``"kv"`` or ``"vk"``, for both initial and final state.

    Returns:
        ``o`` ``[B, T, HV, V]`` in v's dtype, and the final state (or None).
    """
    checks.check_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final = torch.ops.graphdelta.chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, state_layout
    )
    return o, (final if output_final_state else None)


def chunk_kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    state_layout: str = "kv",
) -> tuple[Tensor, Tensor | None]:
    """Kimi Delta Attention: ``chunk_gated_delta_rule`` with a per-key-channel gate g ``[B, T, HV, K]``."""
    if isinstance(g, Tensor) and g.dim() != 4:
        raise ValueError(f"chunk_kda needs a per-channel gate g [B, T, HV, K], got shape {list(g.shape)}")
    return chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
        use_qk_l2norm_in_kernel, state_layout,
    )


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    state_layout: str = "kv",
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule computed token by token; same contract as ``chunk_gated_delta_rule``.

    Cheaper than the chunked form for a handful of tokens (decode, speculative verification).
    """
    checks.check_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final = torch.ops.graphdelta.recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, state_layout
    )
    return o, (final if output_final_state else None)


fused_recurrent_gated_delta_rule = recurrent_gated_delta_rule  # fla's name (graphdelta.fla has fla's signature)


def gated_delta_rule_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state_pool: Tensor,
    state_indices: Tensor,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    state_layout: str = "kv",
    output_intermediate_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Advance B sequences by T tokens, their states living in a pool updated in place.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV]`` or ``[B, T, HV, K]``;
            beta: ``[B, T, HV]``. T is 1 for plain decode, k + 1 to verify k draft tokens.
        state_pool: ``[S, HV, K, V]`` (kv) or ``[S, HV, V, K]`` (vk), float32, updated in place.
        state_indices: ``[B]`` int32/int64 slot of each row; -1 marks a padded row that reads and
            writes nothing (its output is zero).
        output_intermediate_states: also return the state after each token,
            ``[B, T, HV, K, V]`` / ``[B, T, HV, V, K]``, to roll back to any accepted token.

    Returns:
        ``o`` ``[B, T, HV, V]`` and the intermediate states (or None).
    """
    checks.check_state_pool(q, k, v, g, beta, scale, state_pool, state_indices, state_layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, inter = torch.ops.graphdelta.gated_delta_rule_decode(
        q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm_in_kernel, state_layout,
        output_intermediate_states,
    )
    return o, (inter if output_intermediate_states else None)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor | None]:
    """Causal depthwise conv1d over a prompt, with SiLU fused.

    Args:
        x: ``[B, T, D]``; weight: ``[D, W]``; bias: ``[D]`` or None.
        initial_state: ``[N, D, S]``, ``S >= W - 1``: the S inputs before the prompt, oldest
            first (zeros when None).
        cu_seqlens: ``[N + 1]`` offsets of sequences packed in a ``B == 1`` batch.
        activation: ``"silu"`` (or its alias ``"swish"``) or None.

    Returns:
        ``y`` ``[B, T, D]`` and the final state ``[N, D, S]`` (S = W - 1 without an initial
        state), or None unless ``output_final_state``.
    """
    checks.check_conv(x, weight, bias, initial_state, activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {list(x.shape)}")
    N = x.shape[0] if cu_seqlens is None else checks.check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], x.device)
    if initial_state is not None and initial_state.shape[0] != N:
        raise ValueError(f"initial_state must hold N={N} states, got shape {list(initial_state.shape)}")
    y, final = torch.ops.graphdelta.causal_conv1d(x, weight, bias, initial_state, cu_seqlens, activation)
    return y, (final if output_final_state else None)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    state_indices: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """Feed new tokens to conv states held in a pool, in place.

    Args:
        x: ``[B, D]`` (one token) or ``[B, T, D]``.
        conv_state: ``[S_pool, D, S]``, ``S >= W - 1``, updated in place.
        weight: ``[D, W]``; bias: ``[D]`` or None.
        state_indices: ``[B]`` slot of each row (-1: padded row, untouched, zero output); None
            means row b uses slot b.

    Returns:
        ``y`` shaped like ``x``.
    """
    checks.check_conv(x, weight, bias, conv_state, activation, state_name="conv_state")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [B, D] or [B, T, D], got shape {list(x.shape)}")
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    if state_indices is not None:
        checks.check_state_indices(state_indices, x.shape[0], conv_state.shape[0], x.device)
    elif conv_state.shape[0] < x.shape[0]:
        raise ValueError(f"conv_state holds {conv_state.shape[0]} states for a batch of {x.shape[0]}")
    y = torch.ops.graphdelta.causal_conv1d_update(x3, conv_state, weight, bias, state_indices, activation)
    return y.squeeze(1) if x.dim() == 2 else y


def gated_rms_norm(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    activation: str = "silu",
    norm_before_gate: bool = True,
) -> Tensor:
    """The gated RMSNorm at the output of a GDN (SiLU gate) or KDA (sigmoid gate) layer.

    Args:
        x, gate: ``[..., D]``, the same shape (e.g. ``[B, T, HV, V]`` or ``[B * T * HV, V]``).
        weight: ``[D]``.
        eps: added to the mean square.
        activation: ``"silu"`` (alias ``"swish"``) or ``"sigmoid"``, applied to ``gate``.
        norm_before_gate: ``rmsnorm(x) * weight * act(gate)`` (Qwen3-Next, Qwen3.5, Kimi Linear)
            when True, else ``rmsnorm(x * act(gate)) * weight`` (Mamba2's other order).

    Returns:
        ``[..., D]`` in x's dtype, computed in float32.
    """
    checks.check_gated_norm(x, gate, weight, eps, activation)
    return torch.ops.graphdelta.gated_rms_norm(x, gate, weight, float(eps), activation, norm_before_gate)
