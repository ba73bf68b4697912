"""The interpreter fix for Triton < 3.7 (lowering/triton_interpreter.py), on a stand-in for the
old interpreter hook: this machine's Triton may already squeeze, where the fix does nothing."""
from __future__ import annotations

import numpy as np
import pytest

from graphdelta.lowering import triton_interpreter


class _Scope:
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((name, value))
        setattr(obj, name, value)


def _old_patch_lang_tensor(tensor, scope):  # as Triton 3.6 writes it
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


class _Handle:
    def __init__(self, data):
        self.data = data


@pytest.fixture
def old_interpreter(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    monkeypatch.setattr(triton_interpreter, "_APPLIED", False)
    return interpreter


def test_old_interpreter_gets_a_squeezing_index(old_interpreter):
    triton_interpreter.apply()
    assert old_interpreter._patch_lang_tensor is not _old_patch_lang_tensor

    class Tensor:
        pass

    scope = _Scope()
    old_interpreter._patch_lang_tensor(Tensor, scope)
    scalar = Tensor()
    scalar.handle = _Handle(np.array([7], dtype=np.int64))  # a scalar, as the interpreter holds it
    assert range(scalar)[-1] == 6
    # the replacement goes through the scope, so the interpreter restores it after the launch
    assert [name for name, _ in scope.changes] == ["__index__", "__index__"]


def test_fixed_interpreter_is_left_alone(monkeypatch):
    from triton.runtime import interpreter

    def new_patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", new_patch_lang_tensor)
    monkeypatch.setattr(triton_interpreter, "_APPLIED", False)
    triton_interpreter.apply()
    assert interpreter._patch_lang_tensor is new_patch_lang_tensor
