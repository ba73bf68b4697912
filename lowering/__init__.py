"""Lowering: implementations of the graphdelta ops, chosen per device.

- ``torch_*.py``: the vectorized PyTorch path, used on CPU tensors;
- ``triton_*.py``: Triton kernels, used on CUDA tensors (and on CPU tensors under
  ``TRITON_INTERPRET=1``, which is how they are tested without a GPU).

``GRAPHDELTA_BACKEND=triton|torch`` forces one; the default is triton on CUDA, torch elsewhere.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("triton", "torch")

# op name -> backend -> "module:function", imported on first use so that the PyTorch path never
# needs Triton.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "chunk_gated_delta_rule": {
        "triton": "triton_chunk:chunk_gated_delta_rule",
        "torch": "torch_chunk:chunk_gated_delta_rule",
    },
    "recurrent_gated_delta_rule": {
        "triton": "triton_recurrent:recurrent_gated_delta_rule",
        "torch": "torch_recurrent:recurrent_gated_delta_rule",
    },
    "gated_delta_rule_decode": {
        "triton": "triton_recurrent:gated_delta_rule_decode",
        "torch": "torch_recurrent:gated_delta_rule_decode",
    },
    "causal_conv1d": {
        "triton": "triton_conv:causal_conv1d",
        "torch": "torch_conv:causal_conv1d",
    },
    "causal_conv1d_update": {
        "triton": "triton_conv:causal_conv1d_update",
        "torch": "torch_conv:causal_conv1d_update",
    },
    "gated_rms_norm": {
        "triton": "triton_norm:gated_rms_norm",
        "torch": "torch_norm:gated_rms_norm",
    },
}


def backend_for(t: torch.Tensor) -> str:
    """The backend that runs an op whose inputs live on ``t``'s device."""
    forced = os.environ.get("GRAPHDELTA_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"GRAPHDELTA_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "triton" and t.device.type not in ("cuda", "meta") and not _interpreted():
            raise ValueError(
                f"GRAPHDELTA_BACKEND=triton needs CUDA tensors, got tensors on {t.device}: set "
                "TRITON_INTERPRET=1 before importing graphdelta to run the kernels on CPU (slowly), "
                "or GRAPHDELTA_BACKEND=torch"
            )
        return forced
    # The kernels compute in fp32 at most; float64 (a reference-grade request) stays in PyTorch.
    if t.is_cuda and t.dtype != torch.float64:
        return "triton"
    return "torch"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def implementation(op: str, t: torch.Tensor):
    """The function implementing ``op`` for tensors on ``t``'s device."""
    backend = backend_for(t)
    if backend == "triton" and _interpreted():
        from .triton_interpreter import apply

        apply()
    target = IMPLEMENTATIONS[op].get(backend)
    if target is None:
        raise NotImplementedError(f"graphdelta op {op!r} has no {backend!r} implementation")
    module, name = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


if _interpreted():  # kernels imported directly, not through implementation(), need it too
    from .triton_interpreter import apply as _apply_interpreter_fix

    _apply_interpreter_fix()
