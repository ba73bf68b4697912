"""Recognize the causal depthwise conv1d of a linear-attention layer (prompt form and in-place
state update) in a function the layer calls, and replace it with a graphdelta op.

Roles come from the shapes of a recorded call: ``x`` is the first ``[B, D, T]`` tensor, the
weight the ``[D, W]`` one, the bias a ``[D]`` one (if any), and the conv state the ``[B, D, S]``
tensor that the call wrote in place (the update form). The traced graph must hold a
convolution with ``groups == D``; then the function is run on random inputs and compared with
``graphdelta.reference.causal_conv1d`` (with SiLU and without), as in ``gated_delta``.

The replacement keeps the function's channels-first convention ``[B, D, T]`` and calls
``graphdelta::causal_conv1d`` / ``graphdelta::causal_conv1d_update``, which take ``[B, T, D]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from graphdelta import reference
from .discover import Binder, Call, Callee
from graphdelta.lowering.torch_chunk import compute_dtype
from .gated_delta import _close, as_kwargs, reads_var_keyword, trace, variant_key, wrapped_chain

aten = torch.ops.aten
CONFIRM_LENGTHS = {"conv": (1, 5, 40), "conv_update": (1, 2)}


@dataclasses.dataclass(frozen=True)
class ConvRoles:
    x: str
    weight: str
    bias: str | None
    state: str | None  # present: the in-place update form

    def tensors(self) -> tuple[str, ...]:
        return tuple(n for n in (self.x, self.weight, self.bias, self.state) if n is not None)


@dataclasses.dataclass
class RecognizedConv:
    name: str
    kind: str  # "conv" or "conv_update"
    roles: ConvRoles
    evidence: list[str]
    variants: dict[tuple, str | None]  # key -> activation

    @property
    def op(self) -> str:
        return "graphdelta::causal_conv1d" if self.kind == "conv" else "graphdelta::causal_conv1d_update"


def assign_roles(call: Call, order: list[str]) -> ConvRoles | None:
    tensors = [(n, call.bound[n]) for n in order if isinstance(call.bound.get(n), torch.Tensor)]
    weight = next(((n, t) for n, t in tensors if t.dim() == 2), None)
    if weight is None:
        return None
    D = weight[1].shape[0]
    threes = [n for n, t in tensors if t.dim() == 3 and t.shape[1] == D]
    state = next((n for n in threes if n in call.mutated), None)
    x = next((n for n in threes if n != state), None)
    if x is None:
        return None
    bias = next((n for n, t in tensors if t.dim() == 1 and t.shape[0] == D), None)
    return ConvRoles(x, weight[0], bias, state)


def _random(template: Call, roles: ConvRoles, T: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(T)
    b = dict(template.bound)
    B, D, _ = b[roles.x].shape
    dtype = compute_dtype(b[roles.x].dtype)
    b[roles.x] = torch.randn(B, D, T, generator=gen).to(dtype)
    b[roles.weight] = torch.randn(b[roles.weight].shape, generator=gen).to(dtype)
    if roles.bias is not None:
        b[roles.bias] = torch.randn(D, generator=gen).to(dtype)
    if roles.state is not None:
        b[roles.state] = torch.randn(b[roles.state].shape, generator=gen).to(compute_dtype(b[roles.state].dtype))
    return b


def _confirm(fn: Callable, template: Call, roles: ConvRoles, kind: str) -> tuple[bool, str | None] | str:
    runs = []
    for T in CONFIRM_LENGTHS[kind]:
        args = _random(template, roles, T)
        state_before = args[roles.state].clone() if roles.state else None
        try:
            with torch.no_grad():
                y = fn(**as_kwargs(args))
        except Exception as e:  # noqa: BLE001
            return f"raised {type(e).__name__} on random inputs of length {T}: {e}"
        if not isinstance(y, torch.Tensor) or y.shape != args[roles.x].shape:
            return "does not return a tensor shaped like its input"
        runs.append((args, state_before, y))
    for activation in ("silu", None):
        ok = True
        for args, state_before, y in runs:
            x = args[roles.x].double().transpose(1, 2)
            w = args[roles.weight].double()
            bias = args[roles.bias].double() if roles.bias else None
            init = state_before.double() if state_before is not None else None
            ref_y, ref_state = reference.causal_conv1d(x, w, bias, init, None, activation)
            if not _close(y, ref_y.transpose(1, 2)) or (init is not None and not _close(args[roles.state], ref_state)):
                ok = False
                break
        if ok:
            return True, activation
    return "differs from graphdelta.reference.causal_conv1d (with SiLU and without)"


def recognize(callee: Callee) -> RecognizedConv | str:
    """Recognize ``callee`` as a causal depthwise conv1d (or its state update), or say why not."""
    if not callee.calls:
        return "never called during the probe"
    order = list(callee.signature.parameters)
    roles = assign_roles(callee.calls[0], order)
    if roles is None:
        return "arguments do not have the shapes of x [B, D, T] and weight [D, W]"
    kind = "conv_update" if roles.state else "conv"
    template = callee.calls[0]
    D, W = template.bound[roles.weight].shape
    reads_extras = reads_var_keyword(callee.fn)
    reasons = []
    # The function itself first; then what it wraps (a kernel dispatcher around a torch path).
    for target in wrapped_chain(callee.fn):
        try:
            gm = trace(target, _random(template, roles, 6))
        except Exception as e:  # noqa: BLE001
            reasons.append(f"not traceable with make_fx: {type(e).__name__}: {e}")
            continue
        convs = [
            n for n in gm.graph.nodes
            if n.op == "call_function" and n.target == aten.convolution.default and n.args[-1] == D
        ]
        if not convs:
            reasons.append(f"no depthwise convolution (groups={D}) in the traced graph")
            continue
        evidence = [f"depthwise conv1d (groups={D}, {W} taps)"]
        if roles.state:
            evidence.append(f"conv state '{roles.state}' updated in place")
        if target is not callee.fn:
            evidence.append("found behind a kernel dispatcher (__wrapped__)")
        variants = {}
        for call in callee.calls:
            key = variant_key(call.bound, roles.tensors(), reads_extras)
            if key not in variants:
                got = _confirm(target, call, roles, kind)
                if isinstance(got, str):
                    return f"{kind} structure found but {got}"
                variants[key] = got[1]
        return RecognizedConv(callee.name, kind, roles, evidence, variants)
    return reasons[0]


def replacement(rec: RecognizedConv, original: Callable, binder: Binder) -> Callable:
    """A drop-in for ``original`` (channels-first ``[B, D, T]``) calling the graphdelta conv op."""
    roles, variants = rec.roles, rec.variants
    reads_extras = reads_var_keyword(original)

    def conv_op(*args, **kwargs):
        bound = binder(args, kwargs)
        key = variant_key(bound, roles.tensors(), reads_extras)
        if key not in variants:
            return original(*args, **kwargs)
        activation = variants[key]
        x, weight = bound[roles.x], bound[roles.weight]
        bias = bound[roles.bias] if roles.bias else None
        xt = x.transpose(1, 2)
        if roles.state is None:
            y, _ = torch.ops.graphdelta.causal_conv1d(xt, weight, bias, None, None, activation)
        else:
            y = torch.ops.graphdelta.causal_conv1d_update(xt, bound[roles.state], weight, bias, None, activation)
        return y.transpose(1, 2).to(x.dtype)

    conv_op.__name__ = f"graphdelta_{rec.kind}_{rec.name}"
    return conv_op
