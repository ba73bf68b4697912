"""The gated RMSNorm in PyTorch: the CPU implementation of ``graphdelta::gated_rms_norm``.

Written as plain elementwise ops and one reduction so that inductor, which receives it as the
op's decomposition on CPU (``graphdelta.compiler``), fuses it into one loop with its neighbours.
"""
from __future__ import annotations

import torch

from .contract import compute_dtype


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    activation: str,
    norm_before_gate: bool,
) -> torch.Tensor:
    """``x``, ``gate`` ``[..., D]``, ``weight`` ``[D]`` -> ``[..., D]`` in x's dtype; computed
    in float32 (float64 for float64 inputs)."""
    cdt = compute_dtype(x.dtype)
    h, z = x.to(cdt), gate.to(cdt)
    act = torch.sigmoid(z) if activation == "sigmoid" else z * torch.sigmoid(z)
    if not norm_before_gate:
        h = h * act
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cdt)
    if norm_before_gate:
        y = y * act
    return y.to(x.dtype)
