"""fla 0.6.0's calls, unchanged, on graphdelta's ops (forward only): the gated delta rule, KDA,
the short convolution and the gated RMSNorms.

``from graphdelta import fla`` in place of ``from fla.ops.gated_delta_rule import ...``: the
functions here take flash-linear-attention 0.6.0's parameters (names, order, defaults, its
``**kwargs`` options), return what it returns (``o`` in q's dtype for the chunked form and v's for
the recurrent one, a float32 final state or None), and refuse what it refuses with its exception
types. The in-kernel gate (``use_gate_in_kernel`` with ``A_log``/``dt_bias``), the in-kernel beta
sigmoid and ``allow_neg_eigval`` are computed here in float32, as fla computes them, and the
rule runs as one ``torch.ops.graphdelta`` op. ``state_v_first=True`` is graphdelta's ``vk``
layout. An empty sequence in ``cu_seqlens`` passes its initial state (or zeros) through.

KDA's ``chunk_kda`` and ``fused_recurrent_kda`` are here too, with fla's in-kernel gates
(-exp(A_log)·softplus(g + dt_bias), or ``lower_bound``·sigmoid(exp(A_log)·(g + dt_bias))).

``causal_conv1d`` and ``causal_conv1d_update`` keep fla's ``[N, D, W]`` states (the last W
inputs) and its residual; ``rms_norm_gated`` (fla.modules.fused_norm_gate) and ``rmsnorm_fn``
(fla.modules.layernorm_gated) keep their bias, residual, prenorm and group options.

Not covered: a per-value gate ``gv`` or beta and context parallelism (``cp_context``) raise
``NotImplementedError`` naming the argument. KDA's ``return_intermediate_states`` runs the op
chunk by chunk (one call per chunk). graphdelta's ops have no backward: a
call that would need one raises before any work (fla's ``fused_recurrent`` has none either).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from graphdelta import ops
from graphdelta.lowering.contract import state_shape


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's chunked gated delta rule. q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g, beta
    ``[B, T, HV]`` (g raw when ``use_gate_in_kernel``, beta logits when
    ``use_beta_sigmoid_in_kernel``); initial_state ``[N, HV, K, V]`` (``[N, HV, V, K]`` when
    ``state_v_first``). Returns ``o`` ``[B, T, HV, V]`` in q's dtype and the final state (float32)
    or None. ``cu_seqlens_cpu``, ``chunk_indices`` and ``chunk_size`` only tune fla's kernels:
    they are checked, and the answer does not depend on them."""
    state_v_first = _state_layout_argument(state_v_first, kwargs)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, but got q.shape[2]={q.shape[2]} "
                         f"and k.shape[2]={k.shape[2]}")
    H, HV = q.shape[2], v.shape[2]
    if HV % H != 0:
        raise ValueError(f"For GVA, num_v_heads (HV={HV}) must be evenly divisible by num_heads (H={H}), "
                         f"but got HV % H = {HV % H}")
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", 64)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32, or 64 for Gated Delta Rule, got {chunk_size}.")
    if cp_context is not None:
        raise NotImplementedError("cp_context: graphdelta does not run context parallelism")
    if kwargs.get("use_gate_in_kernel", False):
        assert kwargs.get("A_log") is not None, "A_log must be provided when use_gate_in_kernel=True."
    g, beta = _gate_and_beta(g, beta, kwargs.get("use_gate_in_kernel", False), kwargs.get("A_log"),
                             kwargs.get("dt_bias"), use_beta_sigmoid_in_kernel, allow_neg_eigval)
    o, final = _run(ops.chunk_gated_delta_rule, q, k, v, g, beta, scale, initial_state, output_final_state,
                    cu_seqlens, use_qk_l2norm_in_kernel, state_v_first)
    return o.to(q.dtype), final


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float = None,
    initial_state: Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's token-by-token gated delta rule. As ``chunk_gated_delta_rule``, plus ``gk``
    ``[B, T, HV, K]`` (a per-key-channel log-decay, applied with g's); g and beta default to no
    decay and 1. Note fla's order: ``gk`` and ``gv`` come before ``beta``. Returns ``o`` in v's
    dtype and the final state (float32) or None."""
    state_v_first = _state_layout_argument(state_v_first, kwargs)
    if gv is not None:
        raise NotImplementedError("gv: a per-value-channel decay is not one of graphdelta's ops")
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
        if g is None:
            raise ValueError("`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`.")
    B, T, HV = v.shape[:3]
    if beta is None:  # (fla takes ones shaped like q's heads, which indexes wrong when HV > H)
        beta = v.new_ones(B, T, HV)
    elif beta.dim() == v.dim():
        raise NotImplementedError("beta [B, T, HV, V]: a per-value-channel beta is not one of graphdelta's ops")
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                             allow_neg_eigval)
    if gk is not None:  # exp(g) on the whole state, then exp(gk) along K: one per-channel decay
        g = gk.float() + (g.float()[..., None] if g is not None else 0.0)
    elif g is None:
        g = torch.zeros(B, T, HV, dtype=torch.float32, device=v.device)
    o, final = _run(ops.recurrent_gated_delta_rule, q, k, v, g, beta, scale, initial_state, output_final_state,
                    cu_seqlens, use_qk_l2norm_in_kernel, state_v_first)
    return o.to(v.dtype), final


def chunk_kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    cp_context: Any = None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's chunked Kimi Delta Attention: ``chunk_gated_delta_rule`` with a gate per key channel,
    g ``[B, T, HV, K]`` (raw when ``use_gate_in_kernel``: ``A_log`` (HV values) and ``dt_bias``
    ``[HV * K]`` come as keyword arguments; ``lower_bound`` selects the bounded sigmoid gate).
    initial_state must be float32, as in fla. Returns ``o`` in q's dtype and the final state
    (float32) or None. ``safe_gate``, ``disable_recompute``, ``use_graph`` and ``chunk_size``
    only tune fla's kernels: they are checked, and the answer does not depend on them."""
    state_v_first = _state_layout_argument(state_v_first, kwargs)
    if cp_context is not None:
        raise NotImplementedError("cp_context: graphdelta does not run context parallelism")
    if initial_state is not None:
        assert initial_state.dtype == torch.float32, "initial_state must be in float32."
    A_log, dt_bias = (kwargs.get("A_log"), kwargs.get("dt_bias")) if use_gate_in_kernel else (None, None)
    if use_gate_in_kernel and A_log is None and lower_bound is None:
        raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True` and `lower_bound` is not set.")
    chunk_size = kwargs.pop("chunk_size", 64)
    if chunk_size not in (32, 64):
        raise ValueError(f"`chunk_size` must be either 32 or 64 for KDA, got {chunk_size}.")
    if safe_gate and use_gate_in_kernel:
        if lower_bound is None:
            raise ValueError("`lower_bound` must be specified when `safe_gate=True` and `use_gate_in_kernel=True`.")
        if not -5 <= lower_bound < 0:
            raise ValueError(f"`lower_bound` must be in the safe range [-5, 0), got {lower_bound}.")
    beta = _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    B, T, H, K = q.shape
    HV = v.shape[2]
    assert q.shape == k.shape, f"q and k must have the same shape, got q={tuple(q.shape)} vs k={tuple(k.shape)}"
    assert K <= 256, f"Currently we only support key headdim <=256 for KDA, got {K}."
    assert HV % H == 0, (f"For GVA, num_v_heads (HV={HV}) must be evenly divisible by num_qk_heads (H={H}), "
                         f"but got HV % H = {HV % H}")
    assert tuple(g.shape) == (B, T, HV, K), f"g must have shape [B, T, HV, K]={[B, T, HV, K]}, got {list(g.shape)}"
    assert tuple(beta.shape) == (B, T, HV), f"beta must have shape [B, T, HV]={[B, T, HV]}, got {list(beta.shape)}"
    if use_gate_in_kernel:
        g = _kda_gate(g, A_log, dt_bias, lower_bound)
    o, final = _run(ops.chunk_kda, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                    use_qk_l2norm_in_kernel, state_v_first)
    if not return_intermediate_states:
        return o.to(q.dtype), final
    assert torch.is_inference_mode_enabled(), "return_intermediate_states is only allowed in inference mode"
    assert not disable_recompute, "return_intermediate_states must be used with disable_recompute=False"
    h = _chunk_start_states(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel,
                            "vk" if state_v_first else "kv", chunk_size)
    return o.to(q.dtype), final, h.to(k.dtype)


def _chunk_start_states(q, k, v, g, beta, scale, initial_state, cu_seqlens, l2norm, layout, C) -> Tensor:
    """The state at the start of every chunk of C tokens, ``[B, NT, HV, K, V]`` (``[.., V, K]``
    for vk; varlen: B = 1 and NT the chunks of all sequences), as fla's
    ``return_intermediate_states`` gives it: the op run chunk by chunk from the initial state."""
    B, T, HV, V = v.shape
    shape = state_shape(B if cu_seqlens is None else 1, HV, q.shape[-1], V, layout)
    if cu_seqlens is None:  # (rows of the batch, time span, their initial states)
        rows = [(slice(None), 0, T, slice(None))]
    else:
        bounds = cu_seqlens.tolist()
        rows = [(slice(0, 1), lo, hi, slice(n, n + 1)) for n, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    per_row = []
    for batch, lo, hi, seq in rows:
        state = initial_state[seq].float() if initial_state is not None else torch.zeros(shape, device=v.device)
        starts = []
        for start in range(lo, hi, C):
            starts.append(state)
            part = [t[batch, start:min(start + C, hi)] for t in (q, k, v, g, beta)]
            _, state = ops.chunk_kda(*part, scale, state, True, None, l2norm, layout)
        per_row.append(torch.stack(starts, 1) if starts else v.new_zeros(shape[0], 0, *shape[1:]))
    return torch.cat(per_row, 1)


def fused_recurrent_kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's token-by-token Kimi Delta Attention (``chunk_kda``'s arguments; note fla's order:
    ``A_log`` and ``dt_bias`` before ``scale``). As in fla, the gate in the kernel with neither
    ``A_log`` nor ``lower_bound`` takes A = 1. Returns ``o`` in v's dtype and the final state
    (float32) or None."""
    state_v_first = _state_layout_argument(state_v_first, kwargs)
    if beta.dim() == v.dim():
        raise NotImplementedError("beta [B, T, HV, V]: a per-value-channel beta is not one of graphdelta's ops")
    beta = _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    if use_gate_in_kernel:
        g = _kda_gate(g, A_log, dt_bias, lower_bound)
    o, final = _run(ops.recurrent_gated_delta_rule, q, k, v, g, beta, scale,
                    initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, state_v_first)
    return o.to(v.dtype), final


def causal_conv1d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool | None = False,
    activation: str | None = None,
    backend: str | None = "triton",
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's short convolution. x ``[B, T, D]`` (trailing dims flattened into D when they do
    not match weight), weight ``[D, W]``; ``activation`` "swish"/"silu" is SiLU and any other
    value none; ``residual`` is added after it. initial_state and the final state are
    ``[N, D, W]``, the last W inputs oldest first (the first column of an initial state is not
    read), the final state in x's dtype; an empty sequence in ``cu_seqlens`` keeps its state."""
    if backend not in ("triton", "cuda", "mix", None):
        raise ValueError(f"Unsupported backend: {backend}")
    if cp_context is not None:
        raise NotImplementedError("cp_context: graphdelta does not run context parallelism")
    if weight is None:
        raise ValueError("weight: graphdelta.fla.causal_conv1d needs the depthwise weight [D, W]")
    shape = x.shape
    if x.shape[-1] != weight.shape[0]:
        x = x.flatten(2)
    if initial_state is None:  # our state holds the S inputs before the prompt: zeros, W of them
        N = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        initial_state = x.new_zeros(N, x.shape[-1], weight.shape[1])
    _no_grad_needed((x, weight, bias, residual, initial_state))
    keep, cu_kept = _nonempty(cu_seqlens)
    if keep is not None and not keep:  # no tokens at all: every state passes through
        y, final = x.new_zeros(x.shape), initial_state
    else:
        h0 = initial_state if keep is None else initial_state[keep]
        y, final = ops.causal_conv1d(x, weight, bias, h0, True, cu_kept, _silu_or_none(activation))
        if keep is not None:  # an empty sequence keeps its state, as in fla
            final = _put_back(initial_state.to(final.dtype), keep, final)
    if residual is not None:
        y = y + residual.reshape(y.shape)
    return y.reshape(shape), (final.to(x.dtype) if output_final_state else None)


def causal_conv1d_update(
    x: Tensor,
    cache: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """fla's one-token convolution step: x ``[N, D]``, ``[N, 1, D]`` or ``[1, N, D]`` (one token of
    each of N sequences), cache ``[N, D, W]`` (``causal_conv1d``'s final state) shifted in place
    to take the token. Returns ``(y, cache)``, y shaped like x (fla's annotation says a tensor;
    it returns both)."""
    if not (x.dim() == 2 or (x.dim() == 3 and 1 in x.shape[:2])):
        raise ValueError(f"Unsupported input shape: {tuple(x.shape)}")
    if weight is None:
        raise ValueError("weight: graphdelta.fla.causal_conv1d_update needs the depthwise weight [D, W]")
    _no_grad_needed((x, cache, residual, weight, bias))
    rows = x.reshape(-1, x.shape[-1])
    y = ops.causal_conv1d_update(rows, cache, weight, bias, None, _silu_or_none(activation))
    if residual is not None:
        y = y + residual.reshape(y.shape)
    return y.view(x.shape), cache


def rms_norm_gated(
    x: Tensor,
    g: Tensor,
    weight: Tensor,
    bias: Tensor,
    activation: str = "swish",
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    eps: float = 1e-6,
):
    """fla's fused gated RMSNorm (``fla.modules.fused_norm_gate``): ``x + residual`` normalized
    over the last dim, times weight, plus bias, times act(g): "swish"/"silu" or "sigmoid", any
    other value no gate. weight and bias may be None. Returns y in x's dtype, and with
    ``prenorm`` also ``x + residual`` (in residual's dtype; x, in float32 if
    ``residual_in_fp32``, without one)."""
    _no_grad_needed((x, g, weight, bias, residual))
    h = x.float() + residual.float() if residual is not None else x
    act = {"swish": "silu", "silu": "silu", "sigmoid": "sigmoid"}.get(activation)
    y = _norm(h, None if act is None else g, weight, bias, eps, act, True).to(x.dtype)
    if not prenorm:
        return y
    if residual is not None:
        return y, (x + residual).to(residual.dtype)
    return y, (x.float() if residual_in_fp32 else x)


def rmsnorm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    z: Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """fla's gated RMSNorm (``fla.modules.layernorm_gated``): SiLU(z) gate, before or after the
    norm, the norm over groups of ``group_size`` channels (None: the last dim), then weight and
    bias. Returns y in x's dtype."""
    D = x.shape[-1]
    G = D if group_size is None else group_size
    assert D % G == 0
    _no_grad_needed((x, weight, bias, z))
    groups = (*x.shape[:-1], D // G, G)
    y = _norm(x.reshape(groups), None if z is None else z.reshape(groups), weight.reshape(D // G, G),
              None if bias is None else bias.reshape(D // G, G), eps, "silu", norm_before_gate)
    return y.reshape(x.shape).to(x.dtype)


def _norm(x: Tensor, gate: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
          activation: str | None, norm_before_gate: bool) -> Tensor:
    """rmsnorm(x) * weight + bias, gated by act(gate) after the affine part (norm before gate) or
    before the norm, in float32. The gated norm is graphdelta's op with a unit weight, so that
    weight and bias (per group, or absent) apply outside it."""
    xf = x.float()
    if gate is None:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = ops.gated_rms_norm(xf, gate.float(), xf.new_ones(x.shape[-1]), eps, activation, norm_before_gate)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        act = None if gate is None or not norm_before_gate else (
            gate.float().sigmoid() if activation == "sigmoid" else F.silu(gate.float()))
        y = y + (bias.float() * act if act is not None else bias.float())
    return y


def _silu_or_none(activation: str | None) -> str | None:
    return "silu" if activation in ("swish", "silu") else None  # (fla: any other value is no activation)


def _no_grad_needed(tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError("graphdelta.fla is inference-only (graphdelta's ops have no backward), and an "
                           "input requires grad: call it under torch.no_grad() or torch.inference_mode()")


def _state_layout_argument(state_v_first: bool, kwargs: dict) -> bool:
    """fla's deprecated ``transpose_state_layout``, handled as fla handles it."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
        warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
                      DeprecationWarning, stacklevel=3)
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    return bool(state_v_first)


def _gate_and_beta(g: Tensor | None, beta: Tensor, gate_in_kernel: bool, A_log: Tensor | None,
                   dt_bias: Tensor | None, beta_sigmoid: bool, neg_eigval: bool) -> tuple[Tensor | None, Tensor]:
    """fla's GDN in-kernel prologue, in float32: g = -exp(A_log) * softplus(g + dt_bias)
    (``A_log``, ``dt_bias`` ``[HV]``), and ``_beta``."""
    beta = _beta(beta, beta_sigmoid, neg_eigval)
    if gate_in_kernel:
        raw = g.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        g = -A_log.float().exp() * F.softplus(raw)
    return g, beta


def _beta(beta: Tensor, sigmoid: bool, neg_eigval: bool) -> Tensor:
    """beta = sigmoid(beta) in float32, times 2 with ``allow_neg_eigval`` (which needs the sigmoid)."""
    if neg_eigval and not sigmoid:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    return beta.float().sigmoid() * (2.0 if neg_eigval else 1.0) if sigmoid else beta


def _kda_gate(g: Tensor, A_log: Tensor | None, dt_bias: Tensor | None, lower_bound: float | None) -> Tensor:
    """fla's KDA in-kernel gate ``[B, T, HV, K]``, in float32, with A = exp(A_log) (HV values; 1
    without A_log) and dt_bias ``[HV * K]``: -A * softplus(g + dt_bias), or with ``lower_bound``
    lower_bound * sigmoid(A * (g + dt_bias))."""
    HV, K = g.shape[-2:]
    raw = g.float() + (dt_bias.float().reshape(HV, K) if dt_bias is not None else 0.0)
    A = A_log.float().reshape(HV, 1).exp() if A_log is not None else 1.0
    if lower_bound is not None:
        return lower_bound * torch.sigmoid(A * raw)
    return -A * F.softplus(raw)


def _nonempty(cu_seqlens: Tensor | None) -> tuple[list[int] | None, Tensor | None]:
    """The indices of the sequences in ``cu_seqlens`` that hold tokens, and ``cu_seqlens``
    without the empty ones; ``(None, cu_seqlens)`` when none is empty."""
    if cu_seqlens is None or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return None, cu_seqlens
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    empty = (lengths == 0).tolist()
    if not any(empty):
        return None, cu_seqlens
    keep = [i for i, e in enumerate(empty) if not e]
    return keep, torch.cat([cu_seqlens[:1], cu_seqlens[1:][lengths != 0]])


def _run(op, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, l2norm, state_v_first):
    """``op`` with sequences of length 0 in ``cu_seqlens`` taken out (their state passes
    through, as in fla); the final state in float32."""
    _no_grad_needed((q, k, v, g, beta, initial_state))
    layout = "vk" if state_v_first else "kv"
    n = None if cu_seqlens is None else cu_seqlens.numel() - 1
    keep, cu_seqlens = _nonempty(cu_seqlens)
    if keep is not None and not keep:  # nothing to run: no tokens
        return _all_empty(q, v, initial_state, output_final_state, n, layout)
    h0 = initial_state[keep] if keep is not None and initial_state is not None else initial_state
    o, final = op(q, k, v, g, beta, scale, h0, output_final_state, cu_seqlens, l2norm, layout)
    if not output_final_state:
        return o, None
    final = final.float()
    if keep is not None:
        states = initial_state.float() if initial_state is not None else final.new_zeros(n, *final.shape[1:])
        final = _put_back(states, keep, final)
    return o, final


def _put_back(states: Tensor, keep: list[int], computed: Tensor) -> Tensor:
    """``states`` (one per sequence, not modified) with rows ``keep`` replaced by ``computed``:
    the sequences ``_nonempty`` left out keep their states."""
    return states.index_copy(0, torch.tensor(keep, device=states.device), computed)


def _all_empty(q, v, initial_state, output_final_state, n, layout):
    B, T, HV, V = v.shape
    o = v.new_empty(B, T, HV, V)
    if not output_final_state:
        return o, None
    if initial_state is not None:
        return o, initial_state.float().clone()
    shape = (n, HV, q.shape[-1], V) if layout == "kv" else (n, HV, V, q.shape[-1])
    return o, torch.zeros(shape, dtype=torch.float32, device=v.device)
