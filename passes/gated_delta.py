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
FILLS = ("masked_fill", "where", "full", "full_like", "new_full", "scalar_tensor", "fill")


def _within(deps: grammar.Deps, *roles: str) -> bool:
    return any(deps <= {r} for r in roles)


def _rules(K: int) -> grammar.Rules:
    """The grammar of the gated delta rule for head dim K (see ``grammar`` and the docstring)."""
    scales = (K**-0.5, K**0.5)

    def floats(value: float, op: str, deps: grammar.Deps) -> bool:
        if value in (0.5, -0.5, 2.0, -2.0, math.inf, -math.inf) or any(math.isclose(value, s, rel_tol=1e-6) for s in scales):
            return True
        if op in FILLS and value <= -1e30:  # a mask's fill written as finfo.min: exp of it is 0, as of -inf
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
    """Roles from the shapes of one recorded call, or None if they do not fit.

    q and k are the first two 4-D tensors of one shape, ``[B, T, H, K]`` (heads last) or
    ``[B, H, T, K]`` (heads first); v the next 4-D tensor with the same B and T, ``HV`` a multiple
    of H; then a gate ``[.., HV]`` or ``[.., HV, K]`` and a beta ``[.., HV]``; the state the
    argument shaped ``[B, HV, K, V]`` (kv) or ``[B, HV, V, K]`` (vk; both when K == V, for the
    numbers to decide)."""
    tensors = [(n, call.bound[n]) for n in signature_order if isinstance(call.bound.get(n), torch.Tensor)]
    four = [(n, t) for n, t in tensors if t.dim() == 4]
    if len(four) < 3:
        return None
    (qn, q), (kn, k) = four[0], four[1]
    if q.shape != k.shape:
        return None
    for heads_first in (False, True):
        B, T, H, K = (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) if heads_first else tuple(q.shape)
        rest = [(n, t) for n, t in tensors if n not in (qn, kn)]

        def lead(t):  # (B, T, heads) of a tensor in this layout
            return (t.shape[0], t.shape[2], t.shape[1]) if heads_first else tuple(t.shape[:3])

        vn = next((n for n, t in rest if t.dim() == 4 and lead(t)[:2] == (B, T) and lead(t)[2] % H == 0), None)
        if vn is None:
            continue
        HV, V = lead(call.bound[vn])[2], call.bound[vn].shape[3]
        seq = (B, HV, T) if heads_first else (B, T, HV)
        gates = [n for n, t in rest if n != vn and tuple(t.shape) in (seq, (*seq, K))]
        betas = [n for n, t in rest if n != vn and tuple(t.shape) == seq]
        gn = gates[0] if gates else None
        bn = next((n for n in betas if n != gn), None)
        if gn is None or bn is None:
            continue
        shapes = _state_shapes(B, HV, K, V)
        state = next((n for n, t in rest if tuple(t.shape) in shapes.values() and n not in (vn, gn, bn)), None)
        return Roles(qn, kn, vn, gn, bn, state, heads_first, _fits(shapes, call.bound.get(state)))
    return None


def _state_shapes(B: int, HV: int, K: int, V: int) -> dict[str, tuple[int, ...]]:
    return {"kv": (B, HV, K, V), "vk": (B, HV, V, K)}


def _fits(shapes: dict[str, tuple[int, ...]], state: Any) -> tuple[str, ...]:
    """The layouts a state's shape allows; both when there is no state yet (the returned final
    state's shape, or the numbers, decide)."""
    if not isinstance(state, torch.Tensor):
        return tuple(shapes)
    return tuple(lay for lay, shape in shapes.items() if tuple(state.shape) == shape)


def merge_state_role(roles: Roles, calls: list[Call]) -> Roles:
    """A call without a state leaves the state role open; another call may fill it in."""
    if roles.state is not None:
        return roles
    for call in calls:
        B, _, HV, V = roles.to_function(call.bound[roles.v]).shape
        K = call.bound[roles.k].shape[3]
        shapes = _state_shapes(B, HV, K, V)
        for n, t in call.bound.items():
            if isinstance(t, torch.Tensor) and n not in roles.tensors() and tuple(t.shape) in shapes.values():
                return dataclasses.replace(roles, state=n, state_layouts=_fits(shapes, t))
    return roles


# ----------------------------------------------------------------------------- structure


@dataclasses.dataclass
class Structure:
    """What the traced graphs show; ``kind`` is "chunk" or "recurrent"."""

    kind: str
    chunk_size: int | None
    evidence: list[str]
    constants: set[int]  # integer constants no shape explains (the numbers must reach past them)
    decay: str = ""  # chunked: "masked difference" or "factored exponentials"


def _dims(bound: dict[str, Any], roles: Roles) -> dict[str, int]:
    B, T, H, K = roles.to_function(bound[roles.q]).shape
    HV, V = roles.to_function(bound[roles.v]).shape[2:]
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
        if structure.kind == "chunk" and not structure.decay:
            masked = any(d and d <= {"g"} for d in found.masked)
            structure.decay = "masked difference" if masked else "factored exponentials"
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
    state_layout: str = "kv"  # the layout of the states the function takes and returns
    skipped: set = dataclasses.field(default_factory=set)  # calls that ran the original (for explain)

    @property
    def op(self) -> str:
        return f"graphdelta::{'chunk' if self.kind == 'chunk' else 'recurrent'}_gated_delta_rule"

    @property
    def counter(self) -> str:
        return f"gated_delta_{self.kind}"

    def replacement(self, lp: LayerPlan, plan: Plan) -> Callable:
        callee = lp.layer.callees[self.name]
        return replacement(self, callee.fn, Binder(callee.signature), lp.state_layout or self.state_layout)


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
    template = max(callee.calls, key=lambda c: roles.to_function(c.bound[roles.v]).shape[1])
    seen = {roles.to_function(c.bound[roles.v]).shape[1] for c in callee.calls}
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
            roles = dataclasses.replace(roles, state_layouts=(got.state_layout,))  # one layout for every call
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
        layout = next(iter(variants.values())).state_layout
        form = [f"{'per-channel (KDA)' if per_channel else 'per-head (GDN)'} gate",
                f"arguments heads {'first' if roles.heads_first else 'last'}", f"state {layout} in the function's code"]
        if structure.decay:
            form.insert(1, f"decay: {structure.decay}")
        evidence.append("; ".join(form))
        if structure.decay == "factored exponentials":
            evidence.append("factored decays overflow on steep gates: there eager's answer is inf or NaN, and the "
                            "op gives the rule's finite one")
        B, _, H, K = roles.to_function(template.bound[roles.q]).shape
        HV, V = roles.to_function(template.bound[roles.v]).shape[2:]
        return RecognizedDelta(callee.name, evidence, variants, kind=structure.kind, roles=roles, per_channel=per_channel,
                               state_shape=(B, H, HV, K, V), device=template.bound[roles.q].device,
                               state_layout=layout)
    return reasons[0] if reasons else "not recognized"


def replacement(rec: RecognizedDelta, original: Callable, binder: Binder, state_layout: str) -> Callable:
    """A drop-in for ``original`` that calls the graphdelta op for every confirmed variant.

    ``state_layout`` is the layout of the states this function receives and returns from now on:
    the function's own, or the other one where the layout pass chose it (only when every
    function of the layer that reads the state is replaced, so that nothing else reads it).
    """
    op = torch.ops.graphdelta.chunk_gated_delta_rule if rec.kind == "chunk" else torch.ops.graphdelta.recurrent_gated_delta_rule
    roles, variants, skipped = rec.roles, rec.variants, rec.skipped
    reads_extras = reads_var_keyword(original)

    def gated_delta_op(*args, **kwargs):
        bound = binder(args, kwargs)
        key = _variant_key(bound, roles, reads_extras)
        variant = variants.get(key)
        if variant is None:
            if state_layout != rec.state_layout:
                raise RuntimeError(
                    f"graphdelta: {rec.name} was called with arguments never confirmed while probing "
                    f"({key}); its layer keeps the recurrent state in the {state_layout} layout, which the "
                    "original function cannot read. Compile with state_layout='auto', or probe this call.")
            skipped.add(str(key))
            return original(*args, **kwargs)
        q, k, v, g, beta = (roles.to_function(bound[n]) for n in roles.tensors())  # [B, T, H, .]
        state = bound.get(roles.state) if roles.state is not None else None
        if state is not None:
            state = state.to(compute_dtype(v.dtype))
        o, final = op(q, k, v, g, beta, q.shape[-1] ** -0.5, state, None, variant.l2norm, state_layout)
        o = roles.to_function(o).to(variant.out_dtype)
        return o, (final.to(variant.state_dtype) if variant.returns_state else None)

    gated_delta_op.__name__ = f"graphdelta_{rec.kind}_{rec.name}"
    return gated_delta_op
