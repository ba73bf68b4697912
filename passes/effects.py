"""Side effects a replacement would not reproduce, and the literals of the code that ran.

A graphdelta op computes outputs from inputs and nothing else. A function that also changes
something the caller can see is not replaceable, however right its outputs are. The traced
graph shows updates of tensor arguments (``grammar.explain`` refuses them); this module
watches what the graph cannot show:

- ``Executed`` records, while the function runs once, every Python code object of the user's
  (not torch's, not the standard library's) that ran, with its module globals;
- ``Snapshot`` then fingerprints everything those code objects can reach by name (the globals
  they read, containers and objects held there, the function's closure), and
  ``Snapshot.changes`` says what differs after the function has run again: a rebound or new
  global, an item stored into or removed from a container, an attribute written, a tensor
  updated in place (its version counter moved).

Effects of a first call only (a lazily filled cache, a warning printed once) are not counted:
the snapshot is taken after one run.

``literals`` lists the integer constants of the code that ran, so that the numerical check can
reach past each of them (a branch at ``T > 4096`` shows in no trace at 200 tokens).
"""
from __future__ import annotations

import dis
import functools
import os
import sys
import types
from typing import Any, Callable

import torch

_STDLIB = os.path.dirname(os.path.realpath(os.__file__))
_TORCH = os.path.dirname(os.path.realpath(torch.__file__))
_OURS = os.path.dirname(os.path.realpath(__file__))


@functools.lru_cache(maxsize=None)
def _user_file(name: str) -> bool:
    if name.startswith("<"):
        return False
    path = os.path.realpath(name)
    if path.startswith(_STDLIB) and "-packages" not in path:
        return False
    return not path.startswith((_TORCH, _OURS))


def is_user_code(code: types.CodeType) -> bool:
    """Code of the model's (transformers' or the user's), not torch's, Python's or graphdelta's."""
    return _user_file(code.co_filename)


class Executed:
    """While active, records each user code object that runs, with its module globals."""

    def __init__(self):
        self.code: dict[types.CodeType, dict[str, Any]] = {}

    def _hook(self, frame, event, arg):
        # a trace function sees each Python frame once, at its start, and returning None
        # leaves the frame untraced: C calls and lines cost nothing (a profile hook sees both)
        if frame.f_code not in self.code and is_user_code(frame.f_code):
            self.code[frame.f_code] = frame.f_globals
        return None

    def __enter__(self) -> "Executed":
        self._previous = sys.gettrace()
        sys.settrace(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self._previous)


def watch(fn: Callable, kwargs: dict[str, Any]) -> Executed:
    """Run ``fn(**kwargs)`` once (under no_grad) and return the user code that ran."""
    with Executed() as executed, torch.no_grad():
        fn(**kwargs)
    return executed


def _consts(code: types.CodeType) -> list[Any]:
    out = []
    for c in code.co_consts:
        out.extend(c if isinstance(c, (tuple, frozenset)) else [c])
    return out


def literals(executed: Executed, extra: Callable | None = None) -> set[int]:
    """Integer constants of the code that ran: its literals, the integer globals it read, and
    the integer defaults of ``extra`` (the function under test)."""
    found = set()
    for code, env in executed.code.items():
        for c in _consts(code):
            if isinstance(c, int) and not isinstance(c, bool):
                found.add(c)
        for name in code.co_names:
            value = env.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                found.add(value)
    if extra is not None:
        defaults = list(getattr(extra, "__defaults__", None) or ()) + list((getattr(extra, "__kwdefaults__", None) or {}).values())
        found |= {d for d in defaults if isinstance(d, int) and not isinstance(d, bool)}
    return found


def _foreign(obj: Any) -> bool:
    """torch's and Python's own objects: their internal caches change as they are used."""
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(type(obj), "__module__", "") or ""
    if isinstance(obj, type):
        module = obj.__module__ or ""
    root = module.split(".")[0]
    return root in ("torch", "builtins", "typing", "abc", "enum", "numpy", "math", "operator", "warnings",
                    "logging", "inspect", "threading", "weakref", "_thread", "sympy", "triton")


def _fingerprint(obj: Any, depth: int = 2) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj._version, tuple((k, id(v)) for k, v in vars(obj).items()))
    if depth == 0 or isinstance(obj, (int, float, complex, str, bytes, bool, type(None), types.FunctionType,
                                      types.BuiltinFunctionType, types.MethodType, torch.dtype, torch.device)):
        return None
    if isinstance(obj, dict):
        return ("dict", tuple((id(k), id(v), _fingerprint(v, depth - 1)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "deque":
        return (type(obj).__name__, tuple((id(x), _fingerprint(x, depth - 1)) for x in obj))
    if isinstance(obj, (set, frozenset)):
        return ("set", frozenset(id(x) for x in obj))
    if isinstance(obj, bytearray):
        return ("bytearray", bytes(obj))
    if isinstance(obj, types.ModuleType) or _foreign(obj):
        return None
    attrs = getattr(obj, "__dict__", None)
    if attrs is not None:
        return ("object", tuple((k, id(v), _fingerprint(v, depth - 1)) for k, v in dict(attrs).items()))
    return None


class Snapshot:
    """Fingerprints of everything the code that ran can reach by name (see the module docstring)."""

    def __init__(self, executed: Executed, fns: list[Callable]):
        self.items: dict[str, tuple[Callable[[], Any], Any]] = {}
        for code, env in executed.code.items():
            for name in code.co_names:
                key = f"global {name!r} of {env.get('__name__', '?')}"
                if key not in self.items:
                    def read(env=env, name=name):
                        value = env.get(name, _MISSING)
                        return (id(value), _fingerprint(value))
                    self.items[key] = (read, read())
        for fn in fns:
            for var, cell in zip(getattr(fn, "__code__", None) and fn.__code__.co_freevars or (), fn.__closure__ or ()):
                def read(cell=cell):
                    try:
                        value = cell.cell_contents
                    except ValueError:
                        return None
                    return (id(value), _fingerprint(value))
                self.items[f"closure variable {var!r} of {fn.__name__}"] = (read, read())

    def changes(self) -> list[str]:
        return [f"changes {what}" for what, (read, before) in self.items.items() if read() != before]


_MISSING = object()


def stores(executed: Executed) -> list[str]:
    """Writes of globals (``global x; x = ...``) in the code that ran; attribute writes and
    container stores are judged by their effect (``Snapshot``), as objects the function makes
    for itself may be written freely."""
    found = []
    for code in executed.code:
        for ins in dis.get_instructions(code):
            if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                found.append(f"rebinds global {ins.argval!r} in {code.co_name} ({code.co_filename}:{ins.positions.lineno if ins.positions else '?'})")
    return found
