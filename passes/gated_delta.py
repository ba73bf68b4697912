"""Recognize the gated delta rule in a function a layer calls, and replace the function with a
graphdelta op.

A callee recorded by ``discover`` is recognized in four steps, cheapest first:

1. **Roles from shapes.** In a recorded call, q and k are the first two ``[B, T, H, K]``
   tensors, v the next ``[B, T, HV, V]`` one, g a ``[B, T, HV]`` or ``[B, T, HV, K]`` gate and
   beta a ``[B, T, HV]`` tensor; the initial state is the argument shaped like the returned
   final state ``[B, HV, K, V]``. Argument names play no part. Arguments other than tensors
   and plain values (a dict, a config object) end recognition.
2. **Complete explanation.** The function is traced to aten ops at two lengths and every node
   of both graphs must have a role under ``RULES`` (``grammar``): beyond layout, masks and
   data-independent constants, only additions, products, matmuls, sums, triangular solves and
   inverses of any input; ``exp`` and ``cumsum`` only of the gate; a root, reciprocal or
   divisor only of q or of k alone (an l2norm), or of the gate (a factored decay); float
   literals only 0, ±1, ±inf, ±0.5, 2, the scale ``K ** ±0.5`` and an l2norm's eps. A
   function with a cumulative sum of the gate or a triangular mask is chunked, with the chunk
   size read from the cumsum's axis and the mask's size (they must agree); any other function
   is a token recurrence.
3. **No side effects** (``effects``): no argument updated in place, no global rebound, no
   container, attribute or tensor reachable from the function's globals or closure changed.
4. **Numbers** (``delta_check``): for every distinct set of non-tensor arguments seen, the
   function equals ``graphdelta.reference.gated_delta_rule`` (with or without the in-kernel
   l2norm) on an adversarial domain of gates, norms, betas, states and lengths.

The replacement binds the same arguments and, for a confirmed set of non-tensor arguments and
input dtypes, calls ``torch.ops.graphdelta.chunk_gated_delta_rule`` or
``recurrent_gated_delta_rule``. Any other call runs the original function (and ``explain``
says so), except in the vk state layout, where the original would misread the state: there it
raises.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from graphdelta.lowering.contract import compute_dtype

from . import effects, grammar
from .delta_check import Roles, confirm, draw, lengths
from .discover import Binder, Call, Callee
from .plan import LayerPlan, Plan
from .recognize import Recognized, as_kwargs, reads_var_keyword, trace, variant_key, wrapped_chain

FAMILY = "gated_delta"
EPS_MAX = 1e-3  # an l2norm's eps is at most this


def _within(deps: grammar.Deps, *roles: str) -> bool:
    return any(deps <= {r} for r in roles)


def _rules(K: int) -> grammar.Rules:
    """The grammar of the gated delta rule for head dim K (see ``grammar`` and the docstring)."""
    scales = (K**-0.5, K**0.5)

    def floats(value: float, op: str, deps: grammar.Deps) -> bool:
        if value in (0.5, -0.5, 2.0, -2.0, math.inf, -math.inf) or any(math.isclose(value, s, rel_tol=1e-6) for s in scales):
            return True
        # an l2norm's eps, added to the sum of squares of q or of k
        return op in ("add", "sub") and 0 < abs(value) <= EPS_MAX and _within(deps, "q", "k")

    def gate_only(name: str) -> Callable:
        return lambda node, deps: name if deps(node.args[0]) <= {"g"} else None

    def norm_of_q_or_k(node, deps):
        return "l2norm" if _within(deps(node.args[0]), "q", "k") else None

    def power(node, deps):
        exponent = node.args[1]
        if exponent == 2:
            return "square"
        return "l2norm" if exponent in (0.5, -0.5, -1) and _within(deps(node.args[0]), "q", "k") else None

    def divide(node, deps):
        divisor = deps(node.args[1])
        if not divisor:
            return "scale"
        if _within(divisor, "q", "k"):
            return "l2norm"
        return "decay" if divisor <= {"g"} else None

    restricted = {
        "exp": gate_only("decay"), "exp2": gate_only("decay"), "cumsum": gate_only("gate cumsum"),
        "rsqrt": norm_of_q_or_k, "sqrt": norm_of_q_or_k, "reciprocal": norm_of_q_or_k,
        "linalg_vector_norm": norm_of_q_or_k, "pow": power, "div": divide,
    }
    arithmetic = frozenset({
        "add", "sub", "mul", "neg", "sum", "mean", "bmm", "mm", "matmul", "baddbmm", "addmm", "dot",
        "tril", "triu", "linalg_solve_triangular", "triangular_solve", "linalg_inv", "linalg_inv_ex",
        "inverse", "linalg_solve", "linalg_solve_ex", "_linalg_solve_ex", "square",
    })

    def role_of(op: str, deps: grammar.Deps) -> str:
        if op in ("linalg_solve_triangular", "triangular_solve", "linalg_inv", "linalg_inv_ex", "inverse",
                  "linalg_solve", "linalg_solve_ex", "_linalg_solve_ex"):
            return "triangular solve"
        if op in ("bmm", "mm", "matmul", "baddbmm", "addmm", "dot"):
            return "state products" if "state" in deps else "matmul"
        if op in ("tril", "triu"):
            return "causal mask"
        return "arithmetic"

    return grammar.Rules("the gated delta rule", arithmetic, restricted, floats, role_of)


# ----------------------------------------------------------------------------- roles


def assign_roles(call: Call, signature_order: list[str]) -> Roles | None:
    """Roles from the shapes of one recorded call, or None if they do not fit."""
    tensors = [(n, call.bound[n]) for n in signature_order if isinstance(call.bound.get(n), torch.Tensor)]
    four = [(n, t) for n, t in tensors if t.dim() == 4]
    if len(four) < 3:
        return None
    (qn, q), (kn, k) = four[0], four[1]
    if q.shape != k.shape:
        return None
    B, T, H, K = q.shape
    rest = [(n, t) for n, t in tensors if n not in (qn, kn)]
    vn = next((n for n, t in rest if t.dim() == 4 and t.shape[:2] == (B, T) and t.shape[2] % H == 0), None)
    if vn is None:
        return None
    HV = call.bound[vn].shape[2]
    gates = [n for n, t in rest if n != vn and tuple(t.shape) in ((B, T, HV), (B, T, HV, K))]
    betas = [n for n, t in rest if n != vn and tuple(t.shape) == (B, T, HV)]
    if not gates or not betas:
        return None
    gn = gates[0]
    bn = next((n for n in betas if n != gn), None)
    if bn is None:
        return None
    state_shape = (B, HV, K, call.bound[vn].shape[3])
    state = next((n for n, t in rest if tuple(t.shape) == state_shape and n not in (vn, gn, bn)), None)
    return Roles(qn, kn, vn, gn, bn, state)


def merge_state_role(roles: Roles, calls: list[Call]) -> Roles:
    """A call without a state leaves the state role open; another call may fill it in."""
    if roles.state is not None:
        return roles
    for call in calls:
        v = call.bound[roles.v]
        B, _, HV, V = v.shape
        K = call.bound[roles.k].shape[3]
        for n, t in call.bound.items():
            if isinstance(t, torch.Tensor) and n not in roles.tensors() and tuple(t.shape) == (B, HV, K, V):
                return dataclasses.replace(roles, state=n)
    return roles


# ----------------------------------------------------------------------------- structure


@dataclasses.dataclass
class Structure:
    """What the traced graphs show; ``kind`` is "chunk" or "recurrent"."""

    kind: str
    chunk_size: int | None
    evidence: list[str]
    constants: set[int]  # integer constants no shape explains (the numbers must reach past them)


def _dims(bound: dict[str, Any], roles: Roles) -> dict[str, int]:
    B, T, H, K = bound[roles.q].shape
    HV, V = bound[roles.v].shape[2:]
    return {"B": B, "H": H, "K": K, "HV": HV, "V": V, "group": HV // H}


def _inverse_form(ops: dict[str, int]) -> str:
    for names, form in ((("linalg_solve_triangular", "triangular_solve"), "solve_triangular"),
                        (("linalg_inv", "linalg_inv_ex", "inverse"), "linalg.inv"),
                        (("linalg_solve", "linalg_solve_ex", "_linalg_solve_ex"), "linalg.solve")):
        if any(ops.get(n) for n in names):
            return form
    return "forward substitution or products (no solver op)"


def analyze(fn: Callable, inputs: Callable[[int], dict[str, Any]], roles: Roles) -> Structure | str:
    """Trace ``fn`` (``inputs(T)`` gives its arguments) at 3 tokens and at a longer length
    (3C + 1 for chunk size C, 7 for a token loop) and explain both graphs completely."""
    rules = None
    structure: Structure | None = None
    length = 3
    for attempt in range(2):
        bound = inputs(length)
        try:
            traced = trace(fn, bound)
        except Exception as e:  # noqa: BLE001 - anything untraceable runs as written
            return f"not traceable with make_fx ({type(e).__name__}: {e})"
        dims = _dims(bound, roles)
        rules = rules or _rules(dims["K"])
        names = {p: r for p, param in traced.inputs.items()
                 for r in ("q", "k", "v", "g", "beta", "state") if getattr(roles, r) == param}
        found = grammar.explain(traced.gm, names, rules, dims, length, traced.lines)
        if isinstance(found, grammar.Unexplained):
            return f"not completely explained: {found}"
        if found.mutated:
            return f"updates its argument(s) {sorted(found.mutated)} in place"
        sizes = found.cumsum_axes | found.triangles
        if structure is None:
            if len(sizes) > 1:
                return (f"chunk size ambiguous: cumulative sums over {sorted(found.cumsum_axes)} positions "
                        f"and triangular masks of {sorted(found.triangles)}")
            if sizes:
                C = next(iter(sizes))
                structure = Structure("chunk", C, [f"chunk size {C} (cumsum axis and triangular mask)",
                                                   f"inverse: {_inverse_form(found.ops)}"], set())
            else:
                structure = Structure("recurrent", None, ["token recurrence (no chunk cumsum, no triangular mask)"], set())
        elif sizes and sizes != {structure.chunk_size}:
            return f"chunk size changes with the length ({structure.chunk_size} at 3 tokens, {sorted(sizes)} at {length})"
        structure.constants |= grammar.unexplained_integers(found, dims, structure.chunk_size, length)
        structure.evidence.append(f"{length} tokens: {len(traced.gm.graph.nodes)} nodes explained ({found.summary()})")
        length = 3 * structure.chunk_size + 1 if structure.kind == "chunk" else 7
    return structure


# ----------------------------------------------------------------------------- recognition


@dataclasses.dataclass
class RecognizedDelta(Recognized):
    kind: str = "chunk"  # "chunk" or "recurrent"
    roles: Roles | None = None
    per_channel: bool = False
    state_shape: tuple[int, int, int, int, int] | None = None
    device: torch.device | None = None
    skipped: set = dataclasses.field(default_factory=set)  # calls that ran the original (for explain)

    @property
    def op(self) -> str:
        return f"graphdelta::{'chunk' if self.kind == 'chunk' else 'recurrent'}_gated_delta_rule"

    @property
    def counter(self) -> str:
        return f"gated_delta_{self.kind}"

    def replacement(self, lp: LayerPlan, plan: Plan) -> Callable:
        callee = lp.layer.callees[self.name]
        return replacement(self, callee.fn, Binder(callee.signature), lp.state_layout or "kv")


def _variant_key(bound: dict[str, Any], roles: Roles, reads_extras: bool) -> tuple:
    dtypes = tuple(bound[n].dtype if isinstance(bound.get(n), torch.Tensor) else None for n in roles.tensors())
    return variant_key(bound, roles.tensors(), reads_extras) + (("dtypes", dtypes),)


def recognize(callee: Callee) -> RecognizedDelta | str:
    """Recognize ``callee`` as the chunked or token-recurrent gated delta rule, or say why not."""
    if not callee.calls:
        return "never called during the probe"
    order = list(callee.signature.parameters)
    roles = assign_roles(callee.calls[0], order)
    if roles is None:
        return "arguments do not have the shapes of q, k, v, g, beta"
    roles = merge_state_role(roles, callee.calls)
    template = max(callee.calls, key=lambda c: c.bound[roles.v].shape[1])
    seen = {c.bound[roles.v].shape[1] for c in callee.calls}
    reads_extras = reads_var_keyword(callee.fn)

    reasons = []
    # The function itself first; then what it wraps (a kernel dispatcher around a torch path).
    for target in wrapped_chain(callee.fn):
        structure = analyze(target, lambda T: draw(template, roles, T, "typical", 1), roles)
        if isinstance(structure, str):
            reasons.append(structure)
            continue
        executed = effects.watch(target, as_kwargs(draw(template, roles, 3, "typical", 1)))
        snapshot = effects.Snapshot(executed, [target])
        code_constants = effects.literals(executed, target)
        dims = _dims(template.bound, roles)
        explained = set(dims.values()) | ({structure.chunk_size} if structure.chunk_size else set())
        constants = structure.constants | {c for c in code_constants if abs(c) > 4 and abs(c) not in explained}
        check = lengths(structure.kind, structure.chunk_size, constants, seen)
        if isinstance(check, str):
            reasons.append(f"{structure.kind} structure found but it {check}")
            continue
        variants = {}
        why = None
        for call in callee.calls:
            key = _variant_key(call.bound, roles, reads_extras)
            if key in variants:
                continue
            got = confirm(target, call, roles, check)
            if isinstance(got, str):
                why = f"{structure.kind} structure found but it {got}"
                break
            variants[key] = got
        effects_seen = effects.stores(executed) + snapshot.changes()
        if effects_seen:
            why = f"has side effects a replacement would not reproduce: {effects_seen[0]}"
        if why is not None:
            reasons.append(why)
            continue
        evidence = list(structure.evidence)
        evidence.append(f"confirmed against the float64 reference at lengths {check} (typical, gate, norm cases)")
        if target is not callee.fn:
            evidence.append("found behind a kernel dispatcher (__wrapped__)")
        per_channel = template.bound[roles.g].dim() == 4
        evidence.append(f"{'per-channel (KDA)' if per_channel else 'per-head (GDN)'} gate")
        B, _, H, K = template.bound[roles.q].shape
        HV, V = template.bound[roles.v].shape[2:]
        return RecognizedDelta(callee.name, evidence, variants, kind=structure.kind, roles=roles, per_channel=per_channel,
                               state_shape=(B, H, HV, K, V), device=template.bound[roles.q].device)
    return reasons[0] if reasons else "not recognized"


def replacement(rec: RecognizedDelta, original: Callable, binder: Binder, state_layout: str) -> Callable:
    """A drop-in for ``original`` that calls the graphdelta op for every confirmed variant.

    With ``state_layout="vk"`` the states this function receives and returns are ``[B, HV, V, K]``:
    the layer's cache then holds vk states, which only the layer's own (replaced) functions read.
    """
    op = torch.ops.graphdelta.chunk_gated_delta_rule if rec.kind == "chunk" else torch.ops.graphdelta.recurrent_gated_delta_rule
    roles, variants, skipped = rec.roles, rec.variants, rec.skipped
    reads_extras = reads_var_keyword(original)

    def gated_delta_op(*args, **kwargs):
        bound = binder(args, kwargs)
        key = _variant_key(bound, roles, reads_extras)
        variant = variants.get(key)
        if variant is None:
            if state_layout == "vk":
                raise RuntimeError(
                    f"graphdelta: {rec.name} was called with arguments never confirmed while probing "
                    f"({key}); its layer keeps the recurrent state in the vk layout, which the original "
                    "function cannot read. Compile with state_layout='kv', or probe this call.")
            skipped.add(str(key))
            return original(*args, **kwargs)
        q, k, v, g, beta = (bound[n] for n in roles.tensors())
        state = bound.get(roles.state) if roles.state is not None else None
        if state is not None:
            state = state.to(compute_dtype(v.dtype))
        o, final = op(q, k, v, g, beta, q.shape[-1] ** -0.5, state, None, variant.l2norm, state_layout)
        if not variant.returns_state:
            return o.to(variant.out_dtype), None
        return o.to(variant.out_dtype), final.to(variant.state_dtype)

    gated_delta_op.__name__ = f"graphdelta_{rec.kind}_{rec.name}"
    return gated_delta_op
