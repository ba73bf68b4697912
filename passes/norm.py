"""Recognize the gated RMSNorm at the output of a linear-attention layer (a ``norm(x, gate)``
submodule) and replace its forward with ``graphdelta::gated_rms_norm``.

1. **Candidates.** Leaf modules with a single parameter, one-dimensional (the weight ``[D]``),
   whose recorded calls pass two tensors of one shape ``[..., D]``. Names play no part.
2. **Structure.** The forward traced with ``make_fx`` (its weight an input) must hold an
   ``rsqrt`` (or a ``sqrt``, or a power of +-1/2), a mean or sum over the last dimension, and a
   ``sigmoid`` or ``silu``; eps is the scalar added to the reduction just before the root. A
   candidate without this structure is not a gated norm and is left alone silently.
3. **Complete explanation** (``grammar``): beyond layout, only sums, products, means, squares,
   a root or divisor of x or of the gated x, and the activation of the gate; float literals
   only an eps, ±1, ±0.5 and 2. And no side effects (``effects``).
4. **Numbers.** A float32 copy of the module, given a random weight, is run on random x and
   gate (rows scaled down until eps matters, rows scaled up by 1e3, gates up to ±30) and
   compared with ``graphdelta.reference.gated_rms_norm`` for each activation (SiLU,
   sigmoid), each order (norm then gate, gate then norm) and each assignment of the two
   tensors to x and gate; the first that matches is kept. A structural match that is not
   explained or that no hypothesis reproduces falls back, with the reason.

The replacement reads the module's weight at call time and calls the original forward for any
call whose non-tensor arguments (or a missing gate) were not confirmed.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from graphdelta import reference
from . import effects, grammar
from .discover import Binder, Layer, Submodule
from .plan import LayerPlan, Plan
from .recognize import Recognized, mismatch, plain_arguments, trace, variant_key

aten = torch.ops.aten
ACTIVATIONS = ("silu", "sigmoid")
ROW_COUNTS = (1, 7)  # rows of the random inputs for the numerical check, besides the recorded shape
TOLERANCE = 1e-4  # the check runs a float32 copy of the module
EPS_MAX = 1e-3


def is_candidate(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    forward = getattr(type(module), "forward", None)
    return (
        len(params) == 1 and params[0].dim() == 1
        and not getattr(forward, "__module__", "torch").startswith("torch.")
    )


@dataclasses.dataclass(frozen=True)
class NormRoles:
    x: str
    gate: str
    weight: str  # the parameter's attribute name on the module


@dataclasses.dataclass
class RecognizedNorm(Recognized):
    roles: NormRoles | None = None
    eps: float = 0.0
    activation: str = "silu"
    norm_before_gate: bool = True
    sub: Submodule | None = None

    op = "graphdelta::gated_rms_norm"
    counter = "gated_norm"
    replaces_module = True

    def replacement(self, lp: LayerPlan, plan: Plan) -> Callable:
        return replacement(self, self.sub)


def _rules() -> grammar.Rules:
    def of_data(role: str) -> Callable:  # a root, reciprocal or divisor of x or the gated x
        return lambda node, deps: role if deps(node.args[0]) and deps(node.args[0]) <= {"x", "gate"} else None

    def power(node, deps):
        if node.args[1] == 2:
            return "square"
        return "rms" if node.args[1] in (0.5, -0.5, -1) and deps(node.args[0]) <= {"x", "gate"} else None

    def divide(node, deps):
        divisor = deps(node.args[1])
        return "rms" if divisor <= {"x", "gate"} else None

    def gate_activation(node, deps):
        return "gate activation" if deps(node.args[0]) <= {"gate"} else None

    def floats(value, op, deps):
        return value in (0.5, -0.5, 2.0) or (op in ("add", "sub") and 0 < abs(value) <= EPS_MAX)

    return grammar.Rules(
        "a gated RMSNorm",
        arithmetic=frozenset({"add", "sub", "mul", "mean", "sum", "square", "neg"}),
        restricted={"rsqrt": of_data("rms"), "sqrt": of_data("rms"), "reciprocal": of_data("rms"), "pow": power,
                    "div": divide, "sigmoid": gate_activation, "silu": gate_activation},
        floats=floats,
        role_of=lambda op, deps: "reduction" if op in ("mean", "sum") else "arithmetic",
    )


def _key(bound: dict[str, Any], roles: NormRoles) -> tuple:
    """The non-tensor part of a call (other tensors as a marker)."""
    return variant_key(bound, (roles.x, roles.gate))


def assign_roles(sub: Submodule) -> tuple[str, str] | None:
    """The two same-shape ``[..., D]`` tensor parameters of the first call, in signature order."""
    weight = next(sub.module.parameters(recurse=False))
    D = weight.shape[0]
    call = sub.calls[0]
    tensors = [n for n in sub.signature.parameters
               if isinstance(call.bound.get(n), torch.Tensor) and call.bound[n].dim() >= 1 and call.bound[n].shape[-1] == D]
    pairs = [(a, b) for i, a in enumerate(tensors) for b in tensors[i + 1:] if call.bound[a].shape == call.bound[b].shape]
    return pairs[0] if pairs else None


def _structure(gm: torch.fx.GraphModule, D: int) -> tuple[list[str], float] | str | None:
    """Evidence and eps from the traced graph; None when it is not a gated norm at all."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    targets = {n.target for n in nodes}
    roots = [n for n in nodes if n.target in (aten.rsqrt.default, aten.sqrt.default)
             or (n.target == aten.pow.Tensor_Scalar and n.args[1] in (-0.5, 0.5))]
    reductions = [
        n for n in nodes if n.target in (aten.mean.dim, aten.sum.dim_IntList)
        and list(n.args[1]) in ([-1], [len(n.args[0].meta["val"].shape) - 1])
    ]
    gates = targets & {aten.sigmoid.default, aten.silu.default}
    if not roots or not reductions or not gates:
        return None
    eps, root_name = None, ""
    for root in roots:
        src = root.args[0]
        if src.op == "call_function" and src.target in (aten.add.Tensor, aten.add.Scalar):
            scalars = [a for a in src.args if isinstance(a, (int, float))]
            if scalars:
                eps = float(scalars[0])
                root_name = root.target.__name__.split(".")[0] + ("" if root.target != aten.pow.Tensor_Scalar
                                                                  else f" {root.args[1]:g}")
    if eps is None or not eps > 0:
        return "root of a last-dim mean square found, but no positive scalar eps added before it"
    gate_op = "silu" if aten.silu.default in gates else "sigmoid"
    evidence = [f"mean square over the last dim (D={D}), {root_name}, eps={eps:g}", f"{gate_op} on the gate"]
    return evidence, eps


def _inputs(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(shape, generator=gen)
    rows = x.reshape(-1, shape[-1])
    rows[::3] *= 1e-3  # mean square near eps: the check sees eps
    rows[1::3] *= 1e3
    gate = torch.randn(shape, generator=gen) * 3
    gate.reshape(-1, shape[-1])[1::2] *= 10  # gates far in both tails of the activation
    return x, gate


def _confirm(sub: Submodule, pair: tuple[str, str], eps: float) -> tuple[NormRoles, str, bool] | str:
    module = copy.deepcopy(sub.module).float()
    name, weight = next(module.named_parameters(recurse=False))
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    template = sub.calls[0].bound
    shapes = [tuple(template[pair[0]].shape)] + [(n, weight.shape[0]) for n in ROW_COUNTS]
    shapes = [s if len(s) > 1 else (1, *s) for s in shapes]
    gen = torch.Generator().manual_seed(1)
    runs = []
    for shape in shapes:
        a, b = (x.to(weight.device) for x in _inputs(shape, gen))  # drawn on the CPU, run where the module is
        args = {**template, pair[0]: a, pair[1]: b}
        try:
            with torch.no_grad():
                out = module(**{k: v for k, v in args.items() if not k.startswith("**")})
        except Exception as e:  # noqa: BLE001
            return f"raised {type(e).__name__} on random inputs of shape {list(shape)}: {e}"
        runs.append((a, b, out))
    for x_name, gate_name in (pair, pair[::-1]):
        for activation in ACTIVATIONS:
            for norm_before_gate in (True, False):
                if all(
                    mismatch(out, reference.gated_rms_norm(
                        (a if x_name == pair[0] else b).double(), (b if x_name == pair[0] else a).double(),
                        weight.double(), eps, activation, norm_before_gate), TOLERANCE, (0,), False) is None
                    for a, b, out in runs
                ):
                    return NormRoles(x_name, gate_name, name), activation, norm_before_gate
    return "differs from graphdelta.reference.gated_rms_norm (SiLU or sigmoid gate, either order)"


def _trace(sub: Submodule, template: dict[str, Any]):
    """The module's forward traced with its weight as an input (named ``"**weight"``)."""
    name, weight = next(sub.module.named_parameters(recurse=False))
    args = {k: v for k, v in template.items() if not k.startswith("**")}

    def forward(**kw):
        weight = kw.pop("weight")
        return torch.func.functional_call(sub.module, {name: weight}, (), kw)

    return trace(forward, {**args, "weight": weight.detach()})


def recognize(sub: Submodule) -> RecognizedNorm | str | None:
    """``sub`` as a gated RMSNorm, or why a look-alike is not one (None: not a look-alike)."""
    if not sub.calls:
        return None
    pair = assign_roles(sub)
    if pair is None:
        return None
    template = sub.calls[0].bound
    D = template[pair[0]].shape[-1]
    try:
        traced = _trace(sub, template)
        executed = effects.watch(sub.module, {k: v for k, v in template.items() if not k.startswith("**")})
    except Exception:  # noqa: BLE001 - not traceable: not ours to replace
        return None
    found = _structure(traced.gm, D)
    if found is None or isinstance(found, str):
        return found
    evidence, eps = found
    if why := next((w for c in sub.calls if (w := plain_arguments(c.bound))), None):
        return f"gated-norm structure found but {why}"
    snapshot = effects.Snapshot(executed, [type(sub.module).forward])
    got = _confirm(sub, pair, eps)
    if isinstance(got, str):
        return f"gated-norm structure found but {got}"
    roles, activation, norm_before_gate = got
    names = {roles.x: "x", roles.gate: "gate", "weight": "weight"}
    explained = grammar.explain(traced.gm, {p: names[param] for p, param in traced.inputs.items() if param in names},
                                _rules(), {"D": D}, 1, traced.lines)
    if isinstance(explained, grammar.Unexplained):
        return f"gated-norm structure found but not completely explained: {explained}"
    changes = effects.stores(executed) + snapshot.changes()
    if changes:
        return f"gated-norm structure found but it has side effects a replacement would not reproduce: {changes[0]}"
    order = "norm, then gate" if norm_before_gate else "gate, then norm"
    evidence = evidence + [f"every node explained ({explained.summary()})",
                           f"confirmed: {activation} gate, {order}, x={roles.x!r}, gate={roles.gate!r}"]
    variants = {_key(c.bound, roles): True for c in sub.calls if isinstance(c.bound.get(roles.gate), torch.Tensor)}
    return RecognizedNorm(sub.path, evidence, variants, roles, eps, activation, norm_before_gate, sub)


def recognize_gated_norm(plan: Plan) -> Plan:
    """Expects: recorded submodule calls. Leaves: a ``LayerPlan`` with ``recognized["forward"]``
    = ``RecognizedNorm`` for every gated-RMSNorm submodule, and one with a ``fallbacks`` entry
    for every submodule with the structure but not the explanation or the numbers of one."""
    cache = plan.cache.setdefault("gated_norm", {})
    for sub in plan.submodules:
        key = (sub.path, len(sub.calls))
        got = cache[key] if key in cache else cache.setdefault(key, recognize(sub))
        if got is None:
            continue
        lp = LayerPlan(sub.path, Layer(sub.path, sub.module, type(sub.module).forward, {}))
        if isinstance(got, str):
            lp.fallbacks.append(("forward", got, "gated_norm"))
        else:
            lp.recognized["forward"] = got
        plan.layers.append(lp)
    return plan


def replacement(rec: RecognizedNorm, sub: Submodule) -> Callable:
    """A forward for ``sub.module`` (bound: takes the call's arguments) calling the op."""
    module, roles = sub.module, rec.roles
    original = type(module).forward
    binder = Binder(sub.signature)
    variants = rec.variants

    def forward(*args, **kwargs):
        bound = binder(args, kwargs)
        x, gate = bound.get(roles.x), bound.get(roles.gate)
        if (not isinstance(gate, torch.Tensor) or not isinstance(x, torch.Tensor) or gate.shape != x.shape
                or _key(bound, roles) not in variants):
            return original(module, *args, **kwargs)
        weight = getattr(module, roles.weight)
        return torch.ops.graphdelta.gated_rms_norm(x, gate, weight, rec.eps, rec.activation, rec.norm_before_gate)

    forward.__name__ = f"graphdelta_gated_rms_norm_{sub.path.replace('.', '_')}"
    return forward
