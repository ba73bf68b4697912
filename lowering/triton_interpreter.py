"""A fix for Triton's CPU interpreter (``TRITON_INTERPRET=1``) before Triton 3.7.

The interpreter turns a Triton scalar into a Python index with ``int()`` of its one-element
NumPy array; NumPy 2.4 and later refuse that ("only 0-dimensional arrays can be converted to
Python scalars", triton-lang/triton#9171, fixed upstream by squeezing first). Every kernel
whose loop bound is computed in the kernel (``range(tl.cdiv(eos - bos, C))``) then fails under
the interpreter, e.g. with torch 2.11's Triton 3.6 on Python 3.12. Compiled kernels on a GPU
never take this path.
"""
from __future__ import annotations

import inspect

_APPLIED = False


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def apply() -> None:
    """Give the interpreter's scalar tensors the squeezing ``__index__``, if this Triton's
    interpreter lacks it. Idempotent; a Triton without the interpreter hook is left alone."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return
    if "int(self.handle.data)" not in source:  # already squeezes (Triton >= 3.7)
        return

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:  # restored with the interpreter's own patches after the launch
            scope.set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index

    interpreter._patch_lang_tensor = patch_lang_tensor
