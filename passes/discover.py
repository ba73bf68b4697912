"""Discovery: which Python functions each layer calls, and with what arguments.

A layer's ``forward`` reaches the gated delta rule, the causal conv1d and friends through
module-level functions (``torch_chunk_gated_delta_rule(query, key, ...)`` in transformers, any
name in a hand-written model). Discovery does not trust those names. It lists every plain
Python function that a layer's ``forward`` names as a global, swaps each for a recorder in a
per-layer copy of ``forward``, runs the model eagerly on a short probe (prefill without a
cache, prefill into a cache, one decode step), and keeps for each function the arguments it
actually received and what it returned. The recognizers (``gated_delta``, ``conv``) decide
from those calls, the traced graph and numerical checks what each function computes.

Some regions are whole modules instead (the gated RMSNorm is a ``norm(x, gate)`` submodule):
``find_submodules`` lists the leaf modules a recognizer asks for, and the same probe records
their calls through forward hooks.

The per-layer copy of ``forward`` is the same code object with its own globals, so a
substitution affects one layer of one model and nothing else; ``LayerPatch`` installs it as
an instance attribute for the duration of a call and removes it afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import dis
import functools
import inspect
import itertools
import sys
import types
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclasses.dataclass
class Call:
    """One recorded call: arguments bound to parameter names, before and after the call."""

    bound: dict[str, Any]  # parameter name -> value as passed (tensors cloned before the call)
    mutated: set[str]  # tensor parameters the function wrote in place
    output: Any


@dataclasses.dataclass
class Callee:
    """A global function called by a layer's forward, with the calls seen during the probe."""

    name: str  # the global name the forward uses
    fn: Callable
    signature: inspect.Signature
    calls: list[Call] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Layer:
    """A module whose forward calls plain Python functions through its globals."""

    path: str
    module: nn.Module
    forward: types.FunctionType  # the undecorated forward
    callees: dict[str, Callee]


@dataclasses.dataclass
class Submodule:
    """A leaf module whose calls the probe records, for recognizers that replace a whole module."""

    path: str
    module: nn.Module
    signature: inspect.Signature  # of its forward, without ``self``
    calls: list[Call] = dataclasses.field(default_factory=list)


_SCOPES = itertools.count()
MAX_RECORDED_CALLS = 4  # per submodule: the probe's prefill, cached prefill and decode shapes


def _unwrap(fn: Callable) -> Callable:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code reads as globals (``co_names`` also holds attribute names)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:  # generator expressions and comprehensions
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def find_layers(model: nn.Module) -> list[Layer]:
    """Modules whose ``forward`` calls module-level Python functions (one ``Layer`` each)."""
    layers = []
    for path, module in model.named_modules():
        forward = _unwrap(type(module).forward)
        if not isinstance(forward, types.FunctionType) or forward.__module__.startswith("torch."):
            continue
        callees = {}
        for name in sorted(_global_names(forward.__code__)):
            fn = forward.__globals__.get(name)
            if isinstance(fn, types.FunctionType) and not fn.__module__.startswith(("torch", "typing")):
                try:
                    callees[name] = Callee(name, fn, inspect.signature(fn))
                except (TypeError, ValueError):
                    continue
        if callees:
            layers.append(Layer(path, module, forward, callees))
    return layers


def find_submodules(model: nn.Module, accept: Callable[[nn.Module], bool]) -> list[Submodule]:
    """Leaf modules (no children) for which ``accept(module)`` holds, with their signatures."""
    found = []
    for path, module in model.named_modules():
        if next(module.children(), None) is not None or not accept(module):
            continue
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            continue
        found.append(Submodule(path, module, signature))
    return found


def _record_module(sub: Submodule) -> tuple[Callable, Callable]:
    """A forward pre-hook and hook pair recording ``sub``'s calls (inputs cloned before the call)."""
    binder = Binder(sub.signature)
    pending: list[dict[str, Any]] = []

    def before(module, args, kwargs):
        pending.append({k: _clone(v) for k, v in binder(args, kwargs).items()})

    def after(module, args, kwargs, output):
        bound = pending.pop()
        if len(sub.calls) < MAX_RECORDED_CALLS:
            sub.calls.append(Call(bound, set(), _clone_out(output)))

    return before, after


def _clone(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


class Binder:
    """Binds a call's arguments to parameter names with plain dict operations (which Dynamo
    traces without a graph break, unlike ``inspect.Signature.bind``). Keyword arguments that
    match no parameter are kept under ``"**name"``."""

    def __init__(self, signature: inspect.Signature):
        params = list(signature.parameters.values())
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = tuple(p.name for p in params if p.kind in kinds)
        self.names = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def __call__(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = dict(self.defaults)
        for name, value in zip(self.positional, args):
            bound[name] = value
        for name, value in kwargs.items():
            bound[name if name in self.names else "**" + name] = value
        return bound


def _recorder(callee: Callee) -> Callable:
    binder = Binder(callee.signature)

    @functools.wraps(callee.fn)
    def record(*args, **kwargs):
        bound = binder(args, kwargs)
        before = {k: _clone(v) for k, v in bound.items()}
        out = callee.fn(*args, **kwargs)
        mutated = {
            k for k, v in bound.items()
            if isinstance(v, torch.Tensor) and v.shape == before[k].shape and not torch.equal(v, before[k])
        }
        callee.calls.append(Call(before, mutated, _clone_out(out)))
        return out

    return record


def _clone_out(out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    return _clone(out)


def forward_with(layer: Layer, replacements: dict[str, Callable]) -> types.MethodType:
    """``layer``'s forward bound to its module, with the named globals replaced.

    The new globals are those of a fresh module registered in ``sys.modules``: Dynamo reaches
    a function's globals through its module's name, so a bare dict would be bypassed.
    """
    fwd = layer.forward
    name = f"graphdelta_layer_{next(_SCOPES)}_{fwd.__module__.replace('.', '_')}"
    scope = types.ModuleType(name)
    scope.__dict__.update(fwd.__globals__)
    scope.__dict__.update(replacements)
    scope.__name__ = name
    sys.modules[name] = scope
    # A code object of its own: Dynamo caches compiled frames on the code object, and a frame
    # compiled with one scope installs its compiled function in that scope only, so another
    # scope sharing the code would call a name it lacks (torch 2.11 guards do not tell them apart).
    code = fwd.__code__.replace()
    fn = types.FunctionType(code, scope.__dict__, fwd.__name__, fwd.__defaults__, fwd.__closure__)
    fn.__kwdefaults__ = fwd.__kwdefaults__
    fn.__qualname__ = fwd.__qualname__
    return types.MethodType(fn, layer.module)


class LayerPatch:
    """Per-layer forwards to install on the modules, as instance attributes, while a call runs.

    Each layer's forward keeps one globals scope for the life of the patch, and ``update``
    changes only the entries whose replacement changed: graphs Dynamo compiled against the other
    entries stay valid when a later probe (``graphdelta.compile`` without a probe) adds
    replacements."""

    def __init__(self):
        self.forwards: dict[nn.Module, Callable] = {}

    def update(self, layer: Layer, replacements: dict[str, Callable]) -> None:
        current = self.forwards.get(layer.module)
        if current is None or getattr(current, "__func__", None) is None:
            self.forwards[layer.module] = forward_with(layer, replacements)
            return
        scope = current.__func__.__globals__
        for name in layer.callees:
            want = replacements.get(name, layer.forward.__globals__.get(name))
            if scope.get(name) is not want:
                scope[name] = want

    def set_forward(self, module: nn.Module, forward: Callable) -> None:
        self.forwards[module] = forward

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        missing = object()
        saved = {m: m.__dict__.get("forward", missing) for m in self.forwards}
        for module, fwd in self.forwards.items():
            module.forward = fwd
        try:
            yield
        finally:
            for module, old in saved.items():
                if old is missing:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = old


def probe(model: nn.Module, layers: list[Layer], run: Callable[[nn.Module], None],
          submodules: list[Submodule] = ()) -> None:
    """Run ``run(model)`` eagerly with every callee of every layer, and every call of the
    given submodules, recorded."""
    patch = LayerPatch()
    for layer in layers:
        patch.update(layer, {n: _recorder(c) for n, c in layer.callees.items()})
    handles = []
    for sub in submodules:
        before, after = _record_module(sub)
        handles.append(sub.module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(sub.module.register_forward_hook(after, with_kwargs=True))
    try:
        with patch.applied(), torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
