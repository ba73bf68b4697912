"""The memory layouts a compiled CPU step was compiled for, checked once per step.

inductor's generated code reads each input's memory with the dtype, device, sizes and strides
it was compiled for. Two things usually make sure they still hold: Dynamo's guards before the
call, and inductor's ``assert_size_stride`` on every input inside it. The runner skips the
first for compiled shapes (``Runner._dynamo_context``), and compiles its CPU steps without the
second (``_cpu_step_options``): the tiny model's step reads 77 tensors, and their asserts were
about 0.1 ms of a 0.66 ms step (BENCHMARKS.md, session of 2026-12-03, twelfth). In their
place, ``Layouts`` checks every tensor a runner's steps may read (its modules' parameters and
buffers, its cache pools) in one C++ call, about 8 us for 80 tensors; a weight whose layout
changed in place (``param.data = ...``) then sends the step back through its guards, which
compile it anew, instead of letting the compiled code read memory it was not compiled for.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor


class Layouts:
    """The layouts of ``tensors`` now; ``same()`` tells whether they still hold (the same
    objects: a parameter's ``.data`` set anew changes its layout in place)."""

    def __init__(self, tensors: Iterable[Tensor]):
        self.tensors = list(tensors)
        self._check = _checker(self.tensors)

    def same(self) -> bool:
        return self._check(*self.tensors)


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
