"""Choose the recurrent-state layout, ``kv`` (``[.., K, V]``) or ``vk`` (``[.., V, K]``), per layer.

The state a layer keeps between calls is produced and consumed only by its gated-delta
functions; when all of them were replaced, the layer's cache can hold either layout and the
ops read it directly. ``"auto"`` times what a server runs in each layout: the runtime's decode
step (``graphdelta::gated_delta_rule_decode`` on a state pool) at a serving batch of
``SERVING_BATCH`` sequences, with the layer's head shape and gate kind (per head for GDN, per
key channel for KDA). On a GPU each layout's step is captured in a CUDA graph and its replays
are timed with CUDA events (median of ``REPLAYS``): a step is a few microseconds, which one
uncaptured call's launch overhead would hide. On a CPU it is timed by the wall clock (median of
``REPLAYS`` calls at batch 1, the runtime's CPU decode batch). ``vk`` is kept only if it is more
than ``MARGIN`` faster; the reason ``explain`` shows says what was measured.
"""
from __future__ import annotations

import statistics
import time

import torch

from graphdelta.lowering.contract import state_shape

from .plan import Plan

MARGIN = 0.20
SERVING_BATCH = 64
REPLAYS = 50
_MEASURED: dict[tuple, tuple[str, str]] = {}


def _decode_inputs(shape: tuple[int, int, int, int, int], per_channel: bool, batch: int, layout: str,
                   device: torch.device) -> tuple:
    _, H, HV, K, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, 1, H, K, device=device, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(batch, 1, H, K, device=device, generator=gen), dim=-1)
    v = torch.randn(batch, 1, HV, V, device=device, generator=gen)
    g = -torch.rand((batch, 1, HV, K) if per_channel else (batch, 1, HV), device=device, generator=gen)
    beta = torch.rand(batch, 1, HV, device=device, generator=gen)
    pool = torch.zeros(state_shape(batch, HV, K, V, layout), device=device)
    slots = torch.arange(batch, device=device)
    return q, k, v, g, beta, pool, slots, K**-0.5, True, layout


def _time_decode(shape: tuple[int, int, int, int, int], per_channel: bool, layout: str,
                 device: torch.device) -> float:
    """Median seconds of one decode step of the runtime (see the module docstring)."""
    op = torch.ops.graphdelta.gated_delta_rule_decode
    if device.type != "cuda":
        args = _decode_inputs(shape, per_channel, 1, layout, device)
        op(*args, False)
        times = []
        for _ in range(REPLAYS):
            start = time.perf_counter()
            op(*args, False)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    args = _decode_inputs(shape, per_channel, SERVING_BATCH, layout, device)
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compiles the kernel) off the default stream
            for _ in range(3):
                op(*args, False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            op(*args, False)
        times = []
        for _ in range(REPLAYS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(shape: tuple[int, int, int, int, int], per_channel: bool, device: torch.device) -> tuple[str, str]:
    key = (shape, per_channel, str(device))
    if key not in _MEASURED:
        kv, vk = (_time_decode(shape, per_channel, layout, device) for layout in ("kv", "vk"))
        choice = "vk" if vk < (1 - MARGIN) * kv else "kv"
        how = (f"CUDA-graph replay at batch {SERVING_BATCH}, CUDA events" if device.type == "cuda"
               else "wall clock at batch 1")
        gate = "per-channel gate" if per_channel else "per-head gate"
        _MEASURED[key] = (choice, f"measured the runtime's decode step on {device} ({how}, {gate}, median of "
                                  f"{REPLAYS}): kv {kv * 1e6:.1f} us, vk {vk * 1e6:.1f} us; vk needs "
                                  f"{MARGIN:.0%} less")
    return _MEASURED[key]


def choose_state_layout(plan: Plan) -> Plan:
    """Expects: ``recognized`` filled by the recognizers. Leaves: ``state_layout`` and
    ``layout_reason`` on every layer with a replaced gated-delta function, and ``flipped`` where
    that layout is not the one the layer's functions take and return in the user's code.

    A layer's functions keep their own layout (transformers': kv) wherever something else may
    read the state: a gated-delta function left as written, or one the probe never reached.
    Otherwise ``"auto"`` keeps a vk layout of the user's, and measures kv against vk for kv
    code; a requested layout applies where it can."""
    for lp in plan.layers:
        deltas = [r for r in lp.recognized.values() if r.state_shape is not None]
        if not deltas:
            continue
        natives = {r.state_layout for r in deltas}
        native = next(iter(natives)) if len(natives) == 1 else None
        unreplaced = [callee for callee, _, family in lp.fallbacks if family == "gated_delta"]
        if plan.state_layout != "auto":
            want = plan.state_layout
            if want != native and (unreplaced or native is None):
                why = (f"not replaced: {unreplaced}" if unreplaced
                       else f"its functions keep different layouts ({sorted(natives)})")
                raise ValueError(f"state_layout={want!r} cannot apply to layer {lp.path}, whose states only its own "
                                 f"layout reads there ({why})")
            lp.state_layout, lp.layout_reason = want, f"requested (state_layout={want!r})"
        elif native is None:
            lp.state_layout, lp.layout_reason = None, f"each function keeps its own layout ({sorted(natives)})"
        elif unreplaced or lp.unprobed:
            left = unreplaced or lp.unprobed
            lp.state_layout = native
            lp.layout_reason = f"{native}, the functions' own: {', '.join(left)} might read the state as written"
        elif native == "vk":
            lp.state_layout, lp.layout_reason = "vk", "vk, the user's own layout"
        else:
            rec = deltas[0]
            lp.state_layout, lp.layout_reason = measure(rec.state_shape, rec.per_channel, rec.device)
        lp.flipped = lp.state_layout is not None and any(r.state_layout != lp.state_layout for r in deltas)
    return plan
