"""What every recognizer shares: tracing a candidate, the non-tensor part of a call, the
numerical comparison, the interface of a recognized region, and the pass that runs a
recognizer over every layer's callees.

A recognizer is one module with

- ``assign_roles(call, parameter_names)``: the roles of a recorded call's arguments from their
  shapes, or None when they do not fit the family at all (then nothing is reported);
- ``recognize(callee)``: a ``Recognized`` region, or the reason (a string) it is not one;

and one line in ``passes.PASSES``: ``recognizer_pass(<module>, "<family>")``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import dis
import inspect
import sys
from typing import Any, Callable, Iterator

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.overrides import TorchFunctionMode

from . import effects
from .discover import Callee
from .plan import LayerPlan, Plan

TENSOR = "<tensor>"
# non-tensor arguments a replacement can key on: immutable, hashable, compared by value
PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


# ----------------------------------------------------------------------------- the interface


@dataclasses.dataclass
class Recognized:
    """A recognized region. Subclasses set ``op`` and ``counter`` and implement
    ``replacement``; ``substitute`` and the layout pass need nothing else."""

    name: str  # the callee's global name, or the submodule's path
    evidence: list[str]
    variants: dict[tuple, Any]  # confirmed non-tensor arguments -> how the op reproduces them

    op = "graphdelta::?"
    counter = "?"
    replaces_module = False  # True: replaces a submodule's forward, not a global function
    state_shape = None  # (B, H, HV, K, V) where the region reads and writes a recurrent state

    def replacement(self, lp: LayerPlan, plan: Plan) -> Callable:
        raise NotImplementedError


def plain_arguments(bound: dict[str, Any], reads_extras: bool = True) -> str | None:
    """Why a recorded call's non-tensor arguments cannot be keyed on, or None if they can.
    Extra keyword arguments a function never reads (``reads_extras`` False) do not count."""
    for name, value in bound.items():
        if isinstance(value, torch.Tensor) or (not reads_extras and name.startswith("**")):
            continue
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(x, PLAIN) for x in items):
            return (f"argument {name.removeprefix('**')!r} is a {type(value).__name__}: graphdelta replaces "
                    "only functions of tensors and plain values (None, bool, int, float, str, dtype)")
    return None


_KINDS = ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (torch.dtype, "dtype"),
          (torch.device, "device"), (tuple, "tuple"))


def _kind(value: Any) -> str:
    """The type of a plain value, by name (1, 1.0 and True are equal keys otherwise), written
    with isinstance: torch 2.11's Dynamo cannot hash ``type(value).__name__`` and breaks the
    graph of every replacement at its variant lookup."""
    if value is None:
        return "None"
    for kind, name in _KINDS:
        if isinstance(value, kind):
            return name
    return type(value).__name__


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
            key.append((name, _kind(value), value))
    return tuple(key)


def call_key(callee: Callee, reads_extras: bool = True) -> tuple:
    """Everything recognition depends on in a callee's recorded calls: tensors by shape and dtype,
    other arguments by type and value (extra keyword arguments only if the function reads them).
    Callees with equal keys share one recognition."""
    key = []
    for call in callee.calls:
        for name, value in sorted(call.bound.items()):
            if not reads_extras and name.startswith("**") and not isinstance(value, torch.Tensor):
                continue
            if isinstance(value, torch.Tensor):
                key.append((name, tuple(value.shape), value.dtype, name in call.mutated))
            else:
                key.append((name, type(value).__name__, value))
    return (callee.fn, tuple(key))


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


def as_kwargs(bound: dict[str, Any]) -> dict[str, Any]:
    return {n.removeprefix("**"): v for n, v in bound.items()}


# ----------------------------------------------------------------------------- tracing


class _SourceLines(TorchFunctionMode):
    """Tags each node ``make_fx`` creates with the user's source line that created it."""

    def __init__(self):
        super().__init__()
        self.lines: dict[fx.Node, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        mode = get_proxy_mode()
        graph = mode.tracer.graph if mode is not None else None
        before = len(graph.nodes) if graph is not None else 0
        out = func(*args, **(kwargs or {}))
        if graph is not None and len(graph.nodes) > before:
            frame = sys._getframe(1)
            while frame is not None and not effects.is_user_code(frame.f_code):
                frame = frame.f_back
            where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else ""
            for i, node in enumerate(reversed(graph.nodes)):
                if i >= len(graph.nodes) - before:
                    break
                self.lines.setdefault(node, where)
        return out


@dataclasses.dataclass
class Traced:
    gm: fx.GraphModule
    inputs: dict[str, str]  # placeholder name -> the parameter it binds
    lines: dict[fx.Node, str]  # node -> the user's source line


def trace(fn: Callable, bound: dict[str, Any]) -> Traced:
    """``fn`` traced to aten ops at the given (small, real) arguments and functionalized, so that
    an in-place update of an argument shows as a final ``copy_`` into it. Real tracing is 2-3x
    faster than fake tracing on these inputs and records the same shapes in ``meta["val"]``."""
    names = [n for n, v in bound.items() if isinstance(v, torch.Tensor)]

    def body(*tensors):
        args = dict(bound)
        args.update(zip(names, tensors))
        return fn(**as_kwargs(args))

    functional = torch.func.functionalize(body, remove="mutations_and_views")
    with _SourceLines() as lines:
        gm = make_fx(functional, tracing_mode="real")(*[bound[n] for n in names])
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return Traced(gm, dict(zip(placeholders, names)), lines.lines)


# ----------------------------------------------------------------------------- numbers


@torch.no_grad()
def mismatch(x: Any, ref: torch.Tensor, tol: float, keep: tuple[int, ...], nonfinite_ok: bool,
             magnitude: torch.Tensor | None = None) -> str | None:
    """Why ``x`` is not ``ref`` (float64) within ``tol``, or None.

    The error is measured per slice (the dims in ``keep``, e.g. batch and head), relative to the
    slice's largest reference value (or of ``magnitude``, the size of the terms that were summed,
    where a sum may cancel), so that a small head's error is not hidden by a large head's
    values. With ``nonfinite_ok``, elements where ``x`` overflowed (inf or NaN) are not
    compared: a formulation that overflows where the rule does not (exponentials of a steep
    gate's cumulative sum, factored) differs from its replacement only where its own answer is
    inf or NaN.
    """
    if not isinstance(x, torch.Tensor):
        return f"returned {type(x).__name__} instead of a tensor"
    if tuple(x.shape) != tuple(ref.shape):
        return f"returned shape {list(x.shape)} instead of {list(ref.shape)}"
    if x.numel() == 0:
        return None
    # below its smallest normal number a dtype rounds to a fixed step (6e-5 in float16): that
    # much absolute error is the output's format, not the function
    resolution = torch.finfo(x.dtype).smallest_normal if x.is_floating_point() else 0.0
    x = x.double()
    finite = torch.isfinite(x)
    if not nonfinite_ok and not bool(finite.all()):
        return "returned inf or NaN where the rule is finite"
    ok = finite & torch.isfinite(ref)
    diff = torch.where(ok, ((x - ref).abs() - resolution).clamp_min(0), torch.zeros_like(ref))
    mag = torch.where(ok, (ref if magnitude is None else magnitude).abs(), torch.zeros_like(ref))
    other = tuple(d for d in range(ref.dim()) if d not in keep)
    scale = mag.amax(dim=other, keepdim=True)
    scale = scale.clamp_min(max(1e-6 * float(mag.max()), 1e-30))
    err = float((diff / scale).max())
    if err > tol:
        return f"is off by {err:.3g} (relative to each head's largest value; tolerance {tol:g})"
    return None


# ----------------------------------------------------------------------------- the pass


def recognizer_pass(module: Any, family: str) -> Callable[[Plan], Plan]:
    """The pass that runs ``module.recognize`` on every callee whose recorded arguments fit
    ``module.assign_roles``. Callees with equal ``call_key`` share one recognition; every other
    layer gets its own."""

    def run(plan: Plan) -> Plan:
        cache = plan.cache.setdefault(family, {})
        for lp in plan.layers:
            for name, callee in lp.layer.callees.items():
                if name in lp.recognized or not callee.calls:
                    continue
                if module.assign_roles(callee.calls[0], list(callee.signature.parameters)) is None:
                    continue
                reads = reads_var_keyword(callee.fn)
                why = next((w for c in callee.calls if (w := plain_arguments(c.bound, reads))), None)
                if why is not None:
                    lp.fallbacks.append((name, why, family))
                    continue
                key = call_key(callee, reads)
                if key not in cache:
                    cache[key] = module.recognize(callee)
                got = cache[key]
                if isinstance(got, str):
                    lp.fallbacks.append((name, got, family))
                else:  # one object per layer and name, the same in every run of the passes
                    lp.recognized[name] = cache.setdefault((key, lp.path, name), dataclasses.replace(got, name=name))
        return plan

    run.__name__ = f"recognize_{family}"
    run.__doc__ = (f"Expects: recorded calls. Leaves: ``recognized[callee]`` for every callee that is "
                   f"{family} (complete explanation, no side effects, numerically confirmed); a "
                   "``fallbacks`` entry with the reason for every other callee whose arguments fit.")
    return run


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
