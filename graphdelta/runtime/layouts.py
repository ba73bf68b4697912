"""The memory layouts a compiled CPU step was compiled for, checked once per step.

inductor's generated code reads each input's memory with the dtype, device, sizes and strides
it was compiled for. Two things usually make sure they still hold: Dynamo's guards before the
call, and inductor's ``assert_size_stride`` on every input inside it. The runner skips the
first for compiled shapes (``Runner._dynamo_context``), and compiles its CPU steps without the
second (``_cpu_step_options``): the tiny model's step reads 77 tensors (75 kept ones plus
tokens, slots and positions), and their asserts were about 0.1 ms of a 0.66 ms step
(BENCHMARKS.md, session of 2026-12-03, twelfth). In their place, ``Layouts`` checks every
tensor a runner's steps may read (its modules' parameters and buffers, looked up where Dynamo
fetches them, and its cache pools) in one C++ call, 11 us for the tiny model's 75. A weight
whose layout changed (``param.data = ...``, or a parameter set anew) then sends the steps back
through their guards, which compile them anew, instead of letting compiled code read memory it
was not compiled for.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor


class Layouts:
    """The layouts of the tensors at ``places`` (a module dictionary and a name: what Dynamo
    fetches for a step) and of the ``fixed`` tensors (the cache pools) now; ``same()`` tells
    whether the tensors there now still have them. A parameter set anew is looked up where it
    is, and so is one whose ``.data`` changed (the same object, another layout); one removed
    fails the check. A tensor at two places (tied weights) is checked once, and the two places
    must keep holding one object (``TensorGuards`` refuses a tensor passed twice)."""

    def __init__(self, places: Iterable[tuple[dict, str]], fixed: Iterable[Tensor] = ()):
        self._dicts, self._names, self._aliases, first = [], [], [], {}
        for entries, name in places:
            value = entries.get(name)
            if id(value) in first:  # another place of a tensor already checked
                self._aliases.append((entries, name, first[id(value)]))
                continue
            first[id(value)] = len(self._dicts)
            self._dicts.append(entries)
            self._names.append(name)
        self._fixed = list(fixed)
        self._check = _checker(self._now())

    def _now(self) -> list:
        return [*map(dict.get, self._dicts, self._names), *self._fixed]

    def same(self) -> bool:
        now = self._now()
        if any(entries.get(name) is not now[i] for entries, name, i in self._aliases):
            return False
        try:
            return self._check(*now)
        except (TypeError, AttributeError):  # an entry removed (None) or not a tensor any more
            return False


def _checker(tensors: list[Tensor]) -> Callable[..., bool]:
    """Dynamo's own tensor check (``TensorGuards``: dtype, device, dispatch keys, requires_grad,
    sizes and strides) where this torch has it as used here, else the same in Python (dtype,
    device, sizes, strides: 4-5x slower)."""
    want = [layout(t) for t in tensors]

    def python_check(*now: Tensor) -> bool:
        return [layout(t) for t in now] == want

    try:
        from torch._C._dynamo.guards import TensorGuards

        guards = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
        if guards.check(*tensors):
            return guards.check
    except (ImportError, AttributeError, TypeError, RuntimeError, SystemError):
        pass
    return python_check


def layout(x: Tensor) -> tuple:
    """What compiled code assumes of a tensor's memory: dtype, device, sizes, strides."""
    return x.dtype, x.device, x.shape, x.stride()
