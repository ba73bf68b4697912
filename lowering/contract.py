"""What every implementation of the gated delta rule agrees on, written once: the dtype the ops
compute and keep states in, the shape of a recurrent state in each layout, and the in-kernel
l2norm of q and k. The ops, the passes, the kernels, the PyTorch path, the tests and the fuzz
harness all read it from here.

``graphdelta.reference`` writes its own l2norm and layout view on purpose: it is what this code
is checked against, so it shares nothing with it.
"""
from __future__ import annotations

import torch

STATE_LAYOUTS = ("kv", "vk")
L2NORM_EPS = 1e-6  # fla's and transformers' eps inside the square root


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in, and returns states in, for inputs of ``dtype``: float64 stays
    float64 (reference-grade calls), everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def state_shape(n: int, hv: int, k: int, v: int, state_layout: str) -> tuple[int, int, int, int]:
    """Shape of ``n`` recurrent states: ``[n, HV, K, V]`` (``"kv"``) or ``[n, HV, V, K]``
    (``"vk"``, each value row's K channels contiguous)."""
    return (n, hv, k, v) if state_layout == "kv" else (n, hv, v, k)


def to_kv(state: torch.Tensor, state_layout: str) -> torch.Tensor:
    """View states ``[..., K, V]`` (kv) or ``[..., V, K]`` (vk) as ``[..., K, V]`` (no copy)."""
    return state if state_layout == "kv" else state.transpose(-1, -2)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x * rsqrt(sum(x^2) + eps)`` over the last dimension (``use_qk_l2norm_in_kernel``)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)
