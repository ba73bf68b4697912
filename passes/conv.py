"""Recognize the causal depthwise conv1d of a linear-attention layer (prompt form and in-place
state update) in a function the layer calls, and replace it with a graphdelta op.

1. **Roles from shapes.** ``x`` is the first ``[B, D, T]`` tensor, the weight the ``[D, W]``
   one, the bias a ``[D]`` one (if any), and the conv state the ``[B, D, S]`` tensor that the
   call wrote in place (the update form).
2. **Complete explanation** (``grammar``, at two lengths): a convolution with ``groups == D``
   of x (or x after the state) with the weight, bias additions, the SiLU activation, layout,
   and in the update form the state's in-place update; nothing else.
3. **No side effects** beyond the state update (``effects``).
4. **Numbers.** For every distinct set of non-tensor arguments seen, the function equals
   ``graphdelta.reference.causal_conv1d`` (with SiLU or without) at batch 2 on lengths 1,
   W - 1, W, W + 1, 40 and past every integer constant, with inputs whose channels range over
   magnitudes 1e-3 to 1e3, and the updated state equals the reference's.

The replacement keeps the function's channels-first convention ``[B, D, T]`` and calls
``graphdelta::causal_conv1d`` / ``graphdelta::causal_conv1d_update``, which take ``[B, T, D]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from graphdelta import reference
from . import effects, grammar
from .discover import Binder, Call, Callee
from .plan import LayerPlan, Plan
from .recognize import Recognized, as_kwargs, mismatch, reads_var_keyword, trace, variant_key, wrapped_chain

FAMILY = "conv"
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
MAX_LENGTH = 4096


@dataclasses.dataclass(frozen=True)
class ConvRoles:
    x: str
    weight: str
    bias: str | None
    state: str | None  # present: the in-place update form

    def tensors(self) -> tuple[str, ...]:
        return tuple(n for n in (self.x, self.weight, self.bias, self.state) if n is not None)


@dataclasses.dataclass
class RecognizedConv(Recognized):
    kind: str = "conv"  # "conv" or "conv_update"
    roles: ConvRoles | None = None

    @property
    def op(self) -> str:
        return "graphdelta::causal_conv1d" if self.kind == "conv" else "graphdelta::causal_conv1d_update"

    @property
    def counter(self) -> str:
        return self.kind

    def replacement(self, lp: LayerPlan, plan: Plan) -> Callable:
        callee = lp.layer.callees[self.name]
        return replacement(self, callee.fn, Binder(callee.signature))


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


def _rules(D: int, state: bool) -> grammar.Rules:
    def depthwise(node, deps):
        groups = node.args[-1] if len(node.args) >= 9 else node.kwargs.get("groups", 1)
        return "depthwise conv" if groups == D and deps(node.args[1]) <= {"weight"} else None

    def activation(node, deps):  # SiLU, or its x * sigmoid(x) decomposition
        return "activation" if "x" in deps(node.args[0]) else None

    return grammar.Rules(
        "a causal depthwise conv1d",
        arithmetic=frozenset({"add", "mul", "sum"}),
        restricted={"convolution": depthwise, "silu": activation, "sigmoid": activation},
        floats=lambda value, op, deps: False,
        role_of=lambda op, deps: "bias or activation" if op in ("add", "mul") else "taps",
        mutable=frozenset({"state"}) if state else frozenset(),
    )


def _random(template: Call, roles: ConvRoles, T: int, seed: int = 0) -> dict[str, Any]:
    """Batch 2, length T; each channel of x at its own magnitude (1e-3 to 1e3)."""
    gen = torch.Generator().manual_seed(seed * 1009 + T)
    b = dict(template.bound)
    _, D, _ = b[roles.x].shape
    magnitude = 10 ** (6 * torch.rand(1, D, 1, generator=gen, dtype=torch.float64) - 3)
    drawn = {roles.x: torch.randn(2, D, T, generator=gen, dtype=torch.float64) * magnitude,
             roles.weight: torch.randn(b[roles.weight].shape, generator=gen, dtype=torch.float64)}
    if roles.bias is not None:
        drawn[roles.bias] = torch.randn(D, generator=gen, dtype=torch.float64)
    if roles.state is not None:
        drawn[roles.state] = torch.randn(2, *b[roles.state].shape[1:], generator=gen, dtype=torch.float64) * magnitude
    # drawn on the CPU, checked where the function runs
    b.update({n: x.to(device=b[n].device, dtype=b[n].dtype) for n, x in drawn.items()})
    return b


def _confirm(fn: Callable, template: Call, roles: ConvRoles, lengths: list[int]) -> str | None | tuple[str | None]:
    """The activation (``(None,)`` or ``("silu",)``) that reproduces ``fn``, or why none does."""
    tol = TOLERANCE.get(template.bound[roles.x].dtype, 1e-4)
    runs = []
    for T in lengths:
        for seed in (0, 1):
            args = _random(template, roles, T, seed)
            state_before = args[roles.state].clone() if roles.state else None
            try:
                with torch.no_grad():
                    y = fn(**as_kwargs(args))
            except Exception as e:  # noqa: BLE001
                return f"raised {type(e).__name__} on random inputs of length {T}: {e}"
            runs.append((T, args, state_before, y))
    reasons = []
    for activation in ("silu", None):
        why = None
        for T, args, state_before, y in runs:
            x = args[roles.x].double().cpu().transpose(1, 2)
            w = args[roles.weight].double().cpu()
            bias = args[roles.bias].double().cpu() if roles.bias else None
            init = state_before.double().cpu() if state_before is not None else None
            y = y.cpu()
            ref_y, ref_state = reference.causal_conv1d(x, w, bias, init, None, activation)
            # the size of the terms each output sums, as a scale for its rounding error
            terms, _ = reference.causal_conv1d(x.abs(), w.abs(), None if bias is None else bias.abs(),
                                               None if init is None else init.abs(), None, None)
            why = mismatch(y, ref_y.transpose(1, 2), tol, keep=(0, 1), nonfinite_ok=False,
                           magnitude=terms.transpose(1, 2))
            if why is None and init is not None:
                why = mismatch(args[roles.state].cpu(), ref_state, tol, keep=(0, 1), nonfinite_ok=False)
                why = f"the updated state {why}" if why else None
            if why is not None:
                why = f"{why} at length {T}"
                break
        if why is None:
            return (activation,)
        reasons.append(f"{'with SiLU' if activation else 'without activation'}, {why}")
    return "differs from graphdelta.reference.causal_conv1d: " + "; ".join(reasons)


def recognize(callee: Callee) -> RecognizedConv | str:
    """Recognize ``callee`` as a causal depthwise conv1d (or its state update), or say why not."""
    if not callee.calls:
        return "never called during the probe"
    roles = assign_roles(callee.calls[0], list(callee.signature.parameters))
    if roles is None:
        return "arguments do not have the shapes of x [B, D, T] and weight [D, W]"
    kind = "conv_update" if roles.state else "conv"
    template = callee.calls[0]
    D, W = template.bound[roles.weight].shape
    reads_extras = reads_var_keyword(callee.fn)
    rules = _rules(D, roles.state is not None)
    names = {r: getattr(roles, r) for r in ("x", "weight", "bias", "state")}
    reasons = []
    # The function itself first; then what it wraps (a kernel dispatcher around a torch path).
    for target in wrapped_chain(callee.fn):
        constants: set[int] = set()
        why = None
        convs = 0
        for i, T in enumerate((6, 2 * W + 3)):
            bound = _random(template, roles, T)
            try:
                traced = trace(target, bound)
            except Exception as e:  # noqa: BLE001
                why = f"not traceable with make_fx ({type(e).__name__}: {e})"
                break
            inputs = {p: r for p, param in traced.inputs.items() for r, n in names.items() if n == param}
            dims = {"B": 2, "D": D, "W": W, **({"S": bound[roles.state].shape[-1]} if roles.state else {})}
            found = grammar.explain(traced.gm, inputs, rules, dims, T, traced.lines)
            if isinstance(found, grammar.Unexplained):
                why = f"not completely explained: {found}"
                break
            convs = found.roles["depthwise conv"]
            constants |= grammar.unexplained_integers(found, dims, None, T)
            if roles.state and found.mutated != {"state"}:
                why = "does not update its conv state in place"
                break
        if why is None and not convs:
            why = f"no depthwise convolution (groups={D}) in the traced graph"
        if why is not None:
            reasons.append(why)
            continue
        try:
            executed = effects.watch(target, as_kwargs(_random(template, roles, 3)))
        except Exception as e:  # noqa: BLE001
            reasons.append(f"raised {type(e).__name__} on random inputs: {e}")
            continue
        snapshot = effects.Snapshot(executed, [target])
        constants |= {c for c in effects.literals(executed, target) if abs(c) > 4 and abs(c) not in (D, W)}
        if any(abs(c) + 1 > MAX_LENGTH for c in constants):
            reasons.append(f"holds an integer constant ({max(constants, key=abs)}) past the check's reach")
            continue
        check = sorted({1, max(W - 1, 1), W, W + 1, 40} | {abs(c) + 1 for c in constants})
        variants = {}
        for call in callee.calls:
            key = variant_key(call.bound, roles.tensors(), reads_extras)
            if key not in variants:
                got = _confirm(target, call, roles, check)
                if isinstance(got, str):
                    why = f"{kind} structure found but it {got}"
                    break
                variants[key] = got[0]
        changes = effects.stores(executed) + snapshot.changes()
        if why is None and changes:
            why = f"has side effects a replacement would not reproduce: {changes[0]}"
        if why is not None:
            reasons.append(why)
            continue
        evidence = [f"depthwise conv1d (groups={D}, {W} taps), every node explained",
                    f"confirmed against the float64 reference at lengths {check}"]
        if roles.state:
            evidence.append(f"conv state '{roles.state}' updated in place")
        if target is not callee.fn:
            evidence.append("found behind a kernel dispatcher (__wrapped__)")
        return RecognizedConv(callee.name, evidence, variants, kind, roles)
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
