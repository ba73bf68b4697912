"""Choose the recurrent-state layout, ``kv`` (``[.., K, V]``) or ``vk`` (``[.., V, K]``), per layer.

The state a layer keeps between calls is produced and consumed only by its gated-delta
functions; when all of them were replaced, the layer's cache can hold either layout and the
ops read it directly. ``"auto"`` times a one-token decode step of the layer's shape in both
layouts on the model's device and keeps ``vk`` only if it is more than ``MARGIN`` faster (best of 20 steps each) (on
CPU, the PyTorch path has measured no such gain, so ``kv``, the transformers layout, stays).
"""
from __future__ import annotations

import time

import torch

from .plan import Plan

MARGIN = 0.20
_MEASURED: dict[tuple, tuple[str, str]] = {}


def _time_decode(shape: tuple[int, int, int, int, int], layout: str, device: torch.device, reps: int = 20) -> float:
    B, H, HV, K, V = shape
    q = torch.randn(B, 1, H, K, device=device)
    v = torch.randn(B, 1, HV, V, device=device)
    g = -torch.rand(B, 1, HV, device=device)
    beta = torch.rand(B, 1, HV, device=device)
    state = torch.zeros((B, HV, K, V) if layout == "kv" else (B, HV, V, K), device=device)
    op = torch.ops.graphdelta.recurrent_gated_delta_rule
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        op(q, q, v, g, beta, K**-0.5, state, None, True, layout)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def measure(shape: tuple[int, int, int, int, int], device: torch.device) -> tuple[str, str]:
    key = (shape, str(device))
    if key not in _MEASURED:
        kv, vk = (_time_decode(shape, layout, device) for layout in ("kv", "vk"))
        choice = "vk" if vk < (1 - MARGIN) * kv else "kv"
        _MEASURED[key] = (choice, f"measured decode step on {device}: kv {kv * 1e6:.0f} us, vk {vk * 1e6:.0f} us")
    return _MEASURED[key]


def choose_state_layout(plan: Plan) -> Plan:
    """Expects: ``recognized`` filled by the recognizers. Leaves: ``state_layout`` and
    ``layout_reason`` on every layer with a replaced gated-delta function: kv wherever a
    function that might read the state stays as written or was never reached by the probe."""
    for lp in plan.layers:
        deltas = {n: r for n, r in lp.recognized.items() if r.state_shape is not None}
        if not deltas:
            continue
        unreplaced_delta = [callee for callee, _, family in lp.fallbacks if family == "gated_delta"]
        if plan.state_layout != "auto":
            lp.state_layout, lp.layout_reason = plan.state_layout, f"requested (state_layout={plan.state_layout!r})"
        elif unreplaced_delta:
            lp.state_layout, lp.layout_reason = "kv", "kv: not every state-reading function of the layer was replaced"
        elif lp.unprobed:
            lp.state_layout = "kv"
            lp.layout_reason = f"kv: the probe never called {', '.join(lp.unprobed)}, which might read the state"
        else:
            rec = next(iter(deltas.values()))
            lp.state_layout, lp.layout_reason = measure(rec.state_shape, rec.device)
        if lp.state_layout == "vk" and unreplaced_delta:
            raise ValueError(
                f"state_layout='vk' needs every gated-delta function of layer {lp.path} replaced; "
                f"not replaced: {unreplaced_delta}"
            )
    return plan
