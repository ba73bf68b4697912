"""Replaying a compiled CPU decode step without Dynamo: the CPU counterpart of a CUDA graph.

Each call of a ``torch.compile``'d step runs Dynamo's bytecode for it before the compiled code:
it fetches every weight and cache pool the step reads (77 tensors for the tiny Qwen3-Next,
more with every layer) from the modules, switches the MoE dispatch and the compile stance, and
then calls inductor's compiled function. A runner's step shape always reads the same weights
and the same cache pools (``HybridCache`` keeps them at fixed addresses), so after the
compiling call the runner calls inductor's function itself, with the argument list that call
received and only the step's own inputs (tokens, slots, positions) put in.

That is sound only where the compiled function is all the step does. ``Capture.replay`` builds a
``Replay`` only when all of these hold, and otherwise returns None (the step keeps running
through Dynamo):
- the call went through one compiled function (``recording_inductor``), once;
- every argument is one of the step's inputs or a tensor the runner keeps: a parameter or
  buffer of its modules, or a cache pool (nothing made per call, nothing that is not a plain
  tensor or parameter: Dynamo wraps the call for tensor subclasses);
- the step returned one of the function's outputs as it is, and appended nothing to ``aux``;
- Dynamo's bytecode for the step does nothing else (``_only_calls_graph``): no attribute, item
  or global stores or deletions, and no call but the compiled function's and Dynamo's own
  bookkeeping. A graph break calls a resume function; side effects Dynamo replays after the
  graph (list, dict and attribute mutations) store or call methods: both are refused.

A replay also holds only while the objects it was given are the ones Dynamo would fetch: it
keeps every parameter, buffer and submodule entry of the runner's module tree as it found them
(``Replay.fresh``, a check of identities, run in C: 9 us per tiny step), and a runner drops
its replays when Dynamo's caches reset (``resets()``, counted by the backend's ``reset``).
"""
from __future__ import annotations

import contextlib
import dis
import operator
import threading
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from graphdelta.runtime.layouts import layout

_STATE = threading.local()  # the Capture of this thread's step call, if any
_RESETS = [0]  # Dynamo's cache resets seen by recording_inductor backends


def resets() -> int:
    """How many times Dynamo's caches were reset (``torch._dynamo.reset``) since the runtime was
    imported, as far as a ``recording_inductor`` backend in use was told."""
    return _RESETS[0]


# bytecode that changes something outside the frame's own locals
_MUTATING = {"STORE_ATTR", "DELETE_ATTR", "STORE_SUBSCR", "DELETE_SUBSCR", "STORE_SLICE", "DELETE_SLICE",
             "STORE_GLOBAL", "DELETE_GLOBAL", "STORE_DEREF", "DELETE_DEREF", "STORE_NAME", "DELETE_NAME",
             "IMPORT_NAME", "IMPORT_STAR"}
_CALLS = {"CALL", "CALL_FUNCTION", "CALL_FUNCTION_EX", "CALL_FUNCTION_KW", "CALL_KW", "CALL_METHOD"}


def recording_inductor(options: dict[str, Any] | None) -> Callable:
    """inductor as ``torch.compile(backend="inductor", options=options)`` builds it: pass it to
    ``torch._dynamo.optimize`` (``torch.compile`` would wrap it as a user's backend). It is
    inductor to Dynamo (its ``compiler_name``), compares equal to that backend (runners with
    the same options share Dynamo's entries), and wraps every compiled function to tell a
    ``capture()`` in progress what it was called with. Dynamo's reset moves ``resets()``."""
    base = getattr(torch, "_TorchCompileInductorWrapper")

    class RecordingInductor(base):
        def __call__(self, model_, inputs_, **kwargs):
            # Dynamo resets the backends registered when their optimize context was made, and
            # forgets them at each reset. Registered again with every compile, this one sees
            # every reset after a compile, however many came before: each Dynamo entry, and
            # so each replay of one, comes from a compile.
            backends = getattr(torch._dynamo.eval_frame, "cached_backends", None)
            if isinstance(backends, dict):
                backends.setdefault(id(self), self)
            return recorded(super().__call__(model_, inputs_, **kwargs))

        def reset(self):
            _RESETS[0] += 1
            super().reset()

    return RecordingInductor(None, options, False)


def recorded(compiled: Callable) -> Callable:
    """``compiled`` (a backend's compiled function), telling a ``capture()`` in progress what
    it was called with and what it returned."""
    def recording(*args: Any) -> Any:  # Dynamo calls the backend's function with the arguments
        out = compiled(*args)
        capture = getattr(_STATE, "capture", None)
        if capture is not None:
            capture.calls.append((recording, compiled, list(args), out))
        return out

    return recording


class Capture:
    """What the compiled functions were called with during one step call (``capture()``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, Callable, list, Any]] = []

    def replay(self, inputs: list[Tensor], root: nn.Module, pools: Iterable[Tensor], result: Tensor, aux: list,
               frame: Callable) -> "Replay | None":
        """The step as a ``Replay``, or None where replaying it would not be the same step
        (module doc). ``inputs``: the step's own input tensors, in the order ``Replay.__call__``
        takes them; ``root``: the module the step ran (its parameters and buffers are kept from
        step to step, while ``Replay.fresh``); ``pools``: the other tensors kept (the cache's);
        ``result``: what the step returned; ``frame``: the function Dynamo compiled (its entries)."""
        if len(self.calls) != 1 or aux:
            return None
        wrapper, fn, args, out = self.calls[0]
        if not isinstance(out, (list, tuple)):
            return None
        which = [i for i, o in enumerate(out) if o is result]
        if len(which) != 1:
            return None
        tree = module_tree(root)
        kept_ids = {id(v) for _, _, v in tree if isinstance(v, Tensor)} | {id(t) for t in pools}
        places = []  # where each step input goes in the argument list (None: not read)
        for x in inputs:
            at = [i for i, a in enumerate(args) if a is x]
            if len(at) > 1:
                return None
            places.append(at[0] if at else None)
        for i, a in enumerate(args):
            if type(a) not in (Tensor, torch.nn.Parameter) or (i not in places and id(a) not in kept_ids):
                return None
        if not _only_calls_graph(frame, wrapper):
            return None
        return Replay(fn, args, places, which[0], tree)


@contextlib.contextmanager
def capture() -> Iterator[Capture]:
    """Record the compiled functions this thread calls inside the block (``recording_inductor``)."""
    outer = getattr(_STATE, "capture", None)
    _STATE.capture = Capture()
    try:
        yield _STATE.capture
    finally:
        _STATE.capture = outer


def _only_calls_graph(frame: Callable, wrapper: Callable) -> bool:
    """Whether Dynamo's entry of function ``frame`` that calls ``wrapper`` (every entry, where none can be
    told to) only fetches its inputs, calls its compiled function and returns: no stores
    outside its locals, and as many calls as loads of the compiled functions
    (``__compiled_fn_*``) and of Dynamo's bytecode timers. Code of another shape (a later
    torch's, a graph break's resume call) is refused, never guessed at."""
    try:
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(frame.__code__)
    except (AttributeError, RuntimeError, TypeError):
        return False
    if not entries:
        return False
    ours = [entry for entry in entries if _calls(entry.code, frame.__globals__, wrapper)]
    for entry in ours or entries:
        calls = callees = 0
        for ins in dis.get_instructions(entry.code):
            if ins.opname in _MUTATING:
                return False
            if ins.opname in _CALLS:
                calls += 1
            name = ins.argval if isinstance(ins.argval, str) else ""
            if ((ins.opname == "LOAD_GLOBAL" and name.startswith("__compiled_fn"))
                    or (ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and name.startswith("record_pregraph_bytecode"))):
                callees += 1
        if calls != callees:
            return False
    return True


def _calls(entry_code: Any, globals_: dict, wrapper: Callable) -> bool:
    """Whether ``entry_code`` loads a compiled function that is ``wrapper`` (Dynamo installs it
    among the frame's globals, inside decorators of its own that keep it as ``__wrapped__``)."""
    for name in (n for n in entry_code.co_names if n.startswith("__compiled_fn")):
        fn, depth = globals_.get(name), 0
        while fn is not None and depth < 8:
            if fn is wrapper:
                return True
            fn, depth = getattr(fn, "__wrapped__", None), depth + 1
    return False


class Replay:
    """One compiled step shape, called without Dynamo: ``replay(tokens, slots, starts)`` -> the
    step's result, from the argument list its compiling call received with the step's inputs put
    in (``Capture.replay``). The weights and cache pools the list holds are the objects Dynamo
    fetched then: valid while ``fresh()`` (weights changed in place are read as they are; a
    model must not change dtype or device under a runner, as with Dynamo's guards skipped,
    ``Runner._dynamo_context``)."""

    def __init__(self, fn: Callable, args: list, places: list[int | None], which: int,
                 tree: list[tuple[dict, str, Any]]):
        self.fn, self.which, self.tree = fn, which, tree
        # fresh() walks these in C (map, operator.is_): a Python loop over the entries was a
        # per-step cost that grew with the layers
        self._dicts = [entries for entries, _, _ in tree]
        self._names = [name for _, name, _ in tree]
        self._values = [value for _, _, value in tree]
        self._plain = all(type(entries) is dict for entries in self._dicts)
        self.args = list(args)
        self.places = places
        # inductor's code reads its inputs' memory as compiled: same dtype, device, shape, strides
        self.layouts = [None if at is None else layout(args[at]) for at in places]

    def fresh(self) -> bool:
        """Whether every parameter, buffer and submodule entry of the module tree is still the
        object it was at the capture: none was set anew, by ``setattr``, ``load_state_dict(assign=
        True)``, ``_apply`` or a direct write to a module's ``_parameters`` and the like."""
        # (~9 us for the tiny model's 184 entries, against the ~0.2 ms Dynamo's call added)
        if self._plain:
            return all(map(operator.is_, map(dict.get, self._dicts, self._names), self._values))
        return all(entries.get(name) is value for entries, name, value in self.tree)

    def fits(self, *inputs: Tensor) -> bool:
        """Whether ``inputs`` lie in memory as the compiling call's did."""
        return all(want is None or layout(x) == want for x, want in zip(inputs, self.layouts))

    def __call__(self, *inputs: Tensor) -> Tensor:
        """The step's result for ``inputs`` (check ``fits`` first)."""
        args = list(self.args)
        for at, x in zip(self.places, inputs):
            if at is not None:
                args[at] = x
        out = self.fn(*args)
        return out[self.which]


def module_tree(root: nn.Module) -> list[tuple[dict, str, Any]]:
    """Every (dictionary, name, object) entry of ``root``'s module tree: each module's
    ``_modules``, ``_parameters`` and ``_buffers``, reached from every module that holds them."""
    return [(entries, name, value) for module in root.modules()
            for entries in (module._modules, module._parameters, module._buffers)
            for name, value in entries.items()]
