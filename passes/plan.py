"""The state the passes share: what was found in the model, what each layer gets, and why."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

from torch import nn

from .discover import Layer, Submodule

# Every replacement bumps one of these (process-wide; ``explain`` shows a compile's own counts).
COUNTERS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass
class Region:
    """A function a layer calls, replaced by a graphdelta op."""

    callee: str
    op: str
    evidence: list[str]
    variants: int


@dataclasses.dataclass
class LayerPlan:
    path: str
    layer: Layer
    regions: list[Region] = dataclasses.field(default_factory=list)
    # (callee, why, family): a callee whose arguments fit a family's roles but was not replaced
    fallbacks: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    recognized: dict[str, Any] = dataclasses.field(default_factory=dict)  # callee -> Recognized*
    state_layout: str | None = None  # of the states this layer's replaced functions pass around
    layout_reason: str = ""
    flipped: bool = False  # state_layout is not the one the user's code holds
    replacements: dict[str, Callable] = dataclasses.field(default_factory=dict)
    module_forward: Callable | None = None  # replaces the module's whole forward (gated norm)
    unprobed: list[str] = dataclasses.field(default_factory=list)  # callees the probe never reached


@dataclasses.dataclass
class Plan:
    model: nn.Module
    probe: Callable[[nn.Module], None]
    state_layout: str  # "auto", "kv" or "vk"
    layers: list[LayerPlan] = dataclasses.field(default_factory=list)
    submodules: list[Submodule] = dataclasses.field(default_factory=list)  # recorded whole-module candidates
    counters: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    warnings: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # time the passes took
    # kept from an earlier run of the passes on the same model (graphdelta.compile's lazy probe
    # records more calls on each new kind of call): what was discovered, and recognitions
    discovered: list[Layer] | None = None
    cache: dict = dataclasses.field(default_factory=dict)

    def count(self, name: str) -> None:
        self.counters[name] += 1
        COUNTERS[name] += 1
