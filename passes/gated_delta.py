"""Recognize the gated delta rule in a function a layer calls, and replace the function with a
graphdelta op.

A callee recorded by ``discover`` is recognized in three steps, cheapest first:

1. **Roles from shapes.** In a recorded call, q and k are the first two ``[B, T, H, K]``
   tensors, v the next ``[B, T, HV, V]`` one, g a ``[B, T, HV]`` or ``[B, T, HV, K]`` gate and
   beta a ``[B, T, HV]`` tensor; the initial state is the argument shaped like the returned
   final state ``[B, HV, K, V]``. Argument names play no part.
2. **Structure of the traced graph.** The function is traced to aten ops with ``make_fx`` at
   two lengths (see ``analyze``). The chunked pipeline must show a reshape to
   ``[.., chunks, C, ..]``, a cumsum, a decay mask (an ``exp`` of differences of the cumsum
   masked to ``-inf``, in ``masked_fill`` or ``where`` form), a unit-lower-triangular solve
   (``linalg_solve_triangular``, or an unrolled forward substitution: one op repeated at least
   C - 1 times in the part of the graph that does not grow with the chunk count) and a
   per-chunk state scan (matrix products that do grow with it). The token recurrence must
   grow by a fixed number of ops, exps among them, per token, and hold no cumsum.
3. **Numbers.** For every distinct set of non-tensor arguments seen (chunk size, flags, ...),
   the function is run on random inputs at several lengths and compared with
   ``graphdelta.reference.gated_delta_rule`` (with and without the in-kernel l2norm); the first
   hypothesis that matches at every length is kept. No match, no replacement.

The replacement binds the same arguments, checks at call time that their non-tensor part is
one that was confirmed (otherwise it calls the original function), and calls
``torch.ops.graphdelta.chunk_gated_delta_rule`` or ``recurrent_gated_delta_rule``.
"""
from __future__ import annotations

import collections
import dataclasses
import dis
import inspect
import math
from typing import Any, Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graphdelta import reference
from graphdelta.lowering.torch_chunk import compute_dtype
from .discover import Binder, Call, Callee

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.baddbmm.default}
TENSOR = "<tensor>"
CONFIRM_LENGTHS = {"chunk": (1, 37, 150), "recurrent": (1, 5)}
RTOL = 2e-4


@dataclasses.dataclass(frozen=True)
class Roles:
    """Parameter names of the gated-delta inputs in one function's signature."""

    q: str
    k: str
    v: str
    g: str
    beta: str
    state: str | None  # the initial state, [B, HV, K, V]

    def tensors(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.g, self.beta)


@dataclasses.dataclass
class Structure:
    """What the traced graph shows; ``kind`` is "chunk", "recurrent" or None."""

    kind: str | None
    chunk_size: int | None = None
    solver: str | None = None  # "solve_triangular" or "forward substitution"
    evidence: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A confirmed set of non-tensor arguments and how the op reproduces it."""

    l2norm: bool
    returns_state: bool


@dataclasses.dataclass
class Recognized:
    name: str
    kind: str  # "chunk" or "recurrent"
    roles: Roles
    structure: Structure
    variants: dict[tuple, Variant]
    per_channel: bool

    @property
    def op(self) -> str:
        return "graphdelta::chunk_gated_delta_rule" if self.kind == "chunk" else "graphdelta::recurrent_gated_delta_rule"


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


def variant_key(bound: dict[str, Any], skip: tuple[str, ...], reads_extras: bool = True) -> tuple:
    """The non-tensor part of a call: parameters not in ``skip`` by value, tensors as a marker.

    Extra keyword arguments (``"**name"``, swallowed by a ``**kwargs`` the function never
    reads when ``reads_extras`` is False) count only when they are tensors, so that e.g. a
    ``cu_seqlens`` tensor never reaches a replacement confirmed without one.
    """
    key = []
    for name in sorted(bound):
        if name in skip:
            continue
        value = bound[name]
        if isinstance(value, torch.Tensor):
            key.append((name, TENSOR))
        elif reads_extras or not name.startswith("**"):
            key.append((name, value))
    return tuple(key)


def wrapped_chain(fn: Callable) -> list[Callable]:
    """``fn``, then what it wraps (``__wrapped__``), and so on: a kernel dispatcher such as
    transformers' hub-kernel wrapper calls fla or causal-conv1d when installed, and keeps the
    PyTorch path it replaces reachable only this way."""
    chain = [fn]
    while hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)
    return chain


def reads_var_keyword(fn: Callable) -> bool:
    """Whether ``fn`` (unwrapped) reads its ``**kwargs`` at all."""
    fn = wrapped_chain(fn)[-1]
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_flags & inspect.CO_VARKEYWORDS:
        return code is None
    name = code.co_varnames[code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARARGS)]
    return any(i.argval == name for i in dis.get_instructions(code) if i.opname.startswith("LOAD"))


# ----------------------------------------------------------------------------- structure


def _is_neg_inf(x: Any) -> bool:
    if isinstance(x, float):
        return x == -math.inf
    if isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in (aten.full.default, aten.scalar_tensor.default):
        v = x.args[1] if x.target == aten.full.default else x.args[0]
        return isinstance(v, float) and v == -math.inf
    return False


def _ancestors(node: torch.fx.Node, limit: int = 6) -> set[torch.fx.Node]:
    seen, frontier = set(), [node]
    for _ in range(limit):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def _features(gm: torch.fx.GraphModule, length: int) -> dict[str, Any]:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    cumsums = [n for n in nodes if n.target == aten.cumsum.default]
    masks = [n for n in nodes if any(_is_neg_inf(a) for a in n.args)]
    decay = [
        n for n in nodes if n.target == aten.exp.default
        and (anc := _ancestors(n)) & set(masks) and anc & set(cumsums)
        and any(a.target == aten.sub.Tensor for a in anc if a.op == "call_function")
    ]
    chunks: collections.Counter[int] = collections.Counter()  # C -> nodes shaped [.., ceil(T / C), C, ..]
    for n in nodes:
        shape = getattr(n.meta.get("val"), "shape", ())
        for a, c in zip(shape, shape[1:]):
            if isinstance(a, int) and isinstance(c, int) and c >= 8 and c & (c - 1) == 0 and a == -(-length // c):
                chunks[c] += 1
    ops = collections.Counter(str(n.target) for n in nodes)
    return {
        "nodes": len(nodes),
        "ops": ops,
        "cumsum": len(cumsums),
        "decay_mask": len(decay),
        "solve": ops[str(aten.linalg_solve_triangular.default)],
        "matmul": sum(ops[str(m)] for m in MATMULS),
        "exp": ops[str(aten.exp.default)],
        "chunks": chunks,
    }


def trace(fn: Callable, bound: dict[str, Any]) -> torch.fx.GraphModule:
    """``fn`` traced at the given (small, real) arguments; real tracing is 2-3x faster than
    fake tracing on these inputs and records the same shapes in ``meta["val"]``."""
    names = [n for n, v in bound.items() if isinstance(v, torch.Tensor)]

    def body(*tensors):
        args = dict(bound)
        args.update(zip(names, tensors))
        return fn(**as_kwargs(args))

    return make_fx(body, tracing_mode="real")(*[bound[n] for n in names])


def as_kwargs(bound: dict[str, Any]) -> dict[str, Any]:
    return {n.removeprefix("**"): v for n, v in bound.items()}


def analyze(fn: Callable, inputs: Callable[[int], dict[str, Any]]) -> Structure:
    """Trace ``fn`` at a few lengths (``inputs(T)`` gives its arguments) and classify the graph.

    A trace at 3 tokens (one chunk, whatever the chunk size) tells a chunked pipeline (a
    cumsum) from a token recurrence, which a trace at 7 tokens confirms (a fixed number of ops
    per token). For the chunked form, a trace at 100 tokens gives the chunk size C (a view to
    ``[.., ceil(100 / C), C, ..]``); the two traces then split the graph into a per-chunk part
    (the state scan) and a constant part, where an unrolled forward substitution shows as one
    op repeated at least C - 1 times.
    """
    try:
        f1 = _features(trace(fn, inputs(3)), 3)
        if f1["cumsum"]:
            long = 100
            f2 = _features(trace(fn, inputs(long)), long)
            # A chunk size must show at both lengths ([.., 1, C, ..] and [.., ceil(100 / C), C, ..]);
            # a lone match at one length is a coincidence with a head count or a head dim.
            both = f1["chunks"].keys() & f2["chunks"].keys()
            C = max(both, key=lambda c: f2["chunks"][c]) if both else None
            if C is not None and -(-long // C) == 1:
                long = 2 * C + 1
                f2 = _features(trace(fn, inputs(long)), long)
        else:
            f2 = _features(trace(fn, inputs(7)), 7)
    except Exception as e:  # noqa: BLE001 - anything untraceable is simply not recognized
        return Structure(None, missing=[f"not traceable with make_fx: {type(e).__name__}: {e}"])

    if f1["cumsum"]:
        if C is None:
            return Structure(None, missing=["cumsum but no chunk reshape [.., ceil(T / C), C, ..]"])
        s = Structure("chunk", chunk_size=C)
        chunks = -(-long // C)
        per_chunk = {op: (f2["ops"][op] - f1["ops"][op]) / (chunks - 1) for op in f2["ops"]}
        constant = {op: f1["ops"][op] - per_chunk.get(op, 0) for op in f1["ops"]}
        op, repeats = max(constant.items(), key=lambda kv: kv[1])
        if f1["solve"]:
            s.solver = "solve_triangular"
        elif repeats >= C - 1:
            s.solver = f"forward substitution: {repeats:g} x {op.split('.')[-2]} independent of the chunk count"
        scan = per_chunk.get(str(aten.bmm.default), 0) + per_chunk.get(str(aten.mm.default), 0)
        checks = {
            f"chunk reshape to [.., {chunks}, {C}, ..] at {long} tokens (chunk size {C})": True,
            "chunk-local cumsum": f2["cumsum"] > 0,
            "decay mask exp(masked cumsum differences)": f2["decay_mask"] > 0,
            f"unit-lower-triangular solve ({s.solver})": s.solver is not None,
            f"per-chunk state scan ({scan:g} matmuls/chunk)": scan >= 2,
        }
        s.evidence = [k for k, ok in checks.items() if ok]
        s.missing = [k for k, ok in checks.items() if not ok]
        if s.missing:
            s.kind = None
        return s
    per_token = (f2["nodes"] - f1["nodes"]) / 4
    if per_token >= 4 and f2["exp"] - f1["exp"] >= 4:
        return Structure("recurrent", evidence=[f"token recurrence ({per_token:g} ops/token, exp decay per token)"])
    return Structure(None, missing=["no chunked pipeline (cumsum + chunk reshape) and no per-token recurrence"])


# ----------------------------------------------------------------------------- numbers


def random_inputs(template: Call, roles: Roles, T: int, seed: int = 0) -> dict[str, Any]:
    """Arguments like ``template``'s at length T, drawn so the delta rule stays well scaled:
    |q|, |k| in [0.5, 1] (so an l2norm inside the function changes the result), gates <= 0."""
    gen = torch.Generator().manual_seed(seed + T)
    b = template.bound
    B, _, H, K = b[roles.q].shape
    _, _, HV, V = b[roles.v].shape
    # Checked in float32 (float64 stays): the check asks what a function computes, not how
    # precisely; a bf16 model's chunk function is the same math, ~1e-2 off the reference.
    dtype = compute_dtype(b[roles.v].dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float32)

    def unit_ish(*shape):
        x = torch.randn(*shape, generator=gen)
        return x / x.norm(dim=-1, keepdim=True) * (0.5 + 0.5 * rand(*shape[:-1], 1))

    args = dict(b)
    args[roles.q], args[roles.k] = unit_ish(B, T, H, K), unit_ish(B, T, H, K)
    args[roles.v] = torch.randn(B, T, HV, V, generator=gen)
    args[roles.g] = -(0.02 + 0.5 * rand(*b[roles.g].shape[:1], T, *b[roles.g].shape[2:]))
    args[roles.beta] = rand(B, T, HV)
    if roles.state is not None and isinstance(b.get(roles.state), torch.Tensor):
        args[roles.state] = 0.1 * torch.randn(B, HV, K, V, generator=gen)
    for n in roles.tensors():
        args[n] = args[n].to(dtype)
    return args


def _close(x: torch.Tensor, ref: torch.Tensor) -> bool:
    if x.shape != ref.shape or not torch.isfinite(x).all():
        return False
    err = (x.double() - ref).abs().max().item() if x.numel() else 0.0
    return err <= RTOL * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)


def confirm(fn: Callable, template: Call, roles: Roles, lengths: tuple[int, ...]) -> Variant | str:
    """The variant that reproduces ``fn`` at ``template``'s non-tensor arguments, or why none does."""
    runs = []
    for T in lengths:
        args = random_inputs(template, roles, T)
        try:
            with torch.no_grad():
                out = fn(**as_kwargs(args))
        except Exception as e:  # noqa: BLE001
            return f"raised {type(e).__name__} on random inputs of length {T}: {e}"
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
            return "does not return (output, state)"
        runs.append((args, out))
    for l2norm in (True, False):
        ok = True
        for args, (o, final) in runs:
            ref_o, ref_s = reference.gated_delta_rule(
                *(args[n].double() for n in roles.tensors()),
                initial_state=None if roles.state is None or args.get(roles.state) is None else args[roles.state].double(),
                output_final_state=True, use_qk_l2norm_in_kernel=l2norm,
            )
            if not _close(o, ref_o) or (final is not None and not _close(final, ref_s)):
                ok = False
                break
        if ok:
            return Variant(l2norm=l2norm, returns_state=runs[0][1][1] is not None)
    return "differs from graphdelta.reference.gated_delta_rule (with and without in-kernel l2norm)"


# ----------------------------------------------------------------------------- recognition


def recognize(callee: Callee) -> Recognized | str:
    """Recognize ``callee`` as the chunked or token-recurrent gated delta rule, or say why not."""
    if not callee.calls:
        return "never called during the probe"
    order = [p for p in callee.signature.parameters]
    roles = assign_roles(callee.calls[0], order)
    if roles is None:
        return "arguments do not have the shapes of q, k, v, g, beta"
    roles = merge_state_role(roles, callee.calls)
    template = max(callee.calls, key=lambda c: c.bound[roles.v].shape[1])

    # The function itself first; then what it wraps (a kernel dispatcher around a torch path).
    reasons = []
    for target in wrapped_chain(callee.fn):
        structure = analyze(target, lambda T: random_inputs(template, roles, T))
        if structure.kind is None:
            reasons.append("; ".join(structure.missing))
            continue
        variants = {}
        for call in callee.calls:
            key = variant_key(call.bound, roles.tensors(), reads_var_keyword(callee.fn))
            if key in variants:
                continue
            got = confirm(target, call, roles, CONFIRM_LENGTHS[structure.kind])
            if isinstance(got, str):
                reasons.append(f"{structure.kind} structure found but {got}")
                break
            variants[key] = got
        else:
            per_channel = template.bound[roles.g].dim() == 4
            return Recognized(callee.name, structure.kind, roles, structure, variants, per_channel)
    return reasons[0] if reasons else "not recognized"


def replacement(rec: Recognized, original: Callable, binder: Binder, state_layout: str) -> Callable:
    """A drop-in for ``original`` that calls the graphdelta op for every confirmed variant.

    With ``state_layout="vk"`` the states this function receives and returns are ``[B, HV, V, K]``:
    the layer's cache then holds vk states, which only the layer's own (replaced) functions read.
    """
    op = torch.ops.graphdelta.chunk_gated_delta_rule if rec.kind == "chunk" else torch.ops.graphdelta.recurrent_gated_delta_rule
    roles, variants = rec.roles, rec.variants
    reads_extras = reads_var_keyword(original)

    def gated_delta_op(*args, **kwargs):
        bound = binder(args, kwargs)
        variant = variants.get(variant_key(bound, roles.tensors(), reads_extras))
        if variant is None:
            return original(*args, **kwargs)
        q, k, v, g, beta = (bound[n] for n in roles.tensors())
        state = bound.get(roles.state) if roles.state is not None else None
        if state is not None:
            state = state.to(torch.float32)
        o, final = op(q, k, v, g, beta, q.shape[-1] ** -0.5, state, None, variant.l2norm, state_layout)
        return o.to(q.dtype), (final if variant.returns_state else None)

    gated_delta_op.__name__ = f"graphdelta_{rec.kind}_{rec.name}"
    return gated_delta_op
