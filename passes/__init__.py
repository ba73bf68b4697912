"""Passes: find the gated-delta pipeline, the token recurrence and the causal conv1d in the
functions a model's layers call, and the gated RMSNorm among its submodules, and replace each
recognized function or module with a graphdelta op.

They run on a ``Plan`` in this order (``PASSES``), each a named callable whose docstring says
what it expects and what it leaves behind:

1. ``discover_calls``: list each layer's global callees and the candidate norm submodules,
   and record their calls on a probe (everything later decides from recorded calls, never
   from names);
2. ``recognize_gated_delta``: chunked gated delta rule and token recurrence (GDN and KDA);
3. ``recognize_conv``: causal depthwise conv1d and its state update;
4. ``recognize_gated_norm``: the gated RMSNorm (SiLU or sigmoid gate) submodules;
5. ``choose_state_layout``: kv or vk per layer, after 2 (it needs to know which state-reading
   functions were replaced);
6. ``substitute``: build the per-layer forwards that call the replacements, last, once every
   decision is made.

Two more run while the model is traced, not on the plan: ``causal_mask`` (transformers'
masking code keeps SDPA's causal path) and ``norm_gate`` (a rewrite of the graph Dynamo hands
to the backend).

Every replacement bumps a counter in ``Plan.counters`` and ``plan.COUNTERS``; ``explain``
reads them. Recognition happens on small graphs of the called functions, so Dynamo later sees
one graphdelta op per call and a single dynamic graph for every prompt length.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import conv, discover, gated_delta, norm
from .layout import choose_state_layout
from .plan import COUNTERS, LayerPlan, Plan, Region


def discover_calls(plan: Plan) -> Plan:
    """Expects: ``plan.model`` and ``plan.probe``. Leaves: one ``LayerPlan`` per module whose
    forward calls global Python functions, and ``plan.submodules`` (leaf modules that may be a
    gated norm), with every call seen during the probe recorded."""
    layers = discover.find_layers(plan.model)
    plan.submodules = discover.find_submodules(plan.model, norm.is_candidate)
    discover.probe(plan.model, layers, plan.probe, plan.submodules)
    plan.layers = [LayerPlan(layer.path, layer) for layer in layers]
    return plan


def _recognize(plan: Plan, family: str, fits: Callable, recognize: Callable) -> Plan:
    cache: dict = {}
    for lp in plan.layers:
        for name, callee in lp.layer.callees.items():
            if name in lp.recognized or not callee.calls or fits(callee.calls[0], list(callee.signature.parameters)) is None:
                continue
            shapes = tuple(
                (n, tuple(v.shape) if hasattr(v, "shape") else repr(v)) for c in callee.calls for n, v in c.bound.items()
            )
            key = (callee.fn, shapes)
            if key not in cache:
                cache[key] = recognize(callee)
            got = cache[key]
            if isinstance(got, str):
                lp.fallbacks.append((name, got, family))
            else:
                lp.recognized[name] = got
    return plan


def recognize_gated_delta(plan: Plan) -> Plan:
    """Expects: recorded calls. Leaves: ``recognized[callee]`` = ``gated_delta.Recognized`` for
    every callee with q/k/v/g/beta-shaped arguments that is structurally and numerically the
    gated delta rule; a ``fallbacks`` entry with the reason for every other such callee."""
    return _recognize(plan, "gated_delta", gated_delta.assign_roles, gated_delta.recognize)


def recognize_conv(plan: Plan) -> Plan:
    """Expects: recorded calls. Leaves: ``recognized[callee]`` = ``conv.RecognizedConv`` for
    every causal depthwise conv1d (or state update) callee; ``fallbacks`` for the others."""
    return _recognize(plan, "conv", conv.assign_roles, conv.recognize)


def recognize_gated_norm(plan: Plan) -> Plan:
    """Expects: recorded submodule calls. Leaves: a ``LayerPlan`` with ``recognized["forward"]``
    = ``norm.RecognizedNorm`` for every gated-RMSNorm submodule, and one with a ``fallbacks``
    entry for every submodule with the structure but not the numbers of one."""
    for sub in plan.submodules:
        got = norm.recognize(sub)
        if got is None:
            continue
        layer = discover.Layer(sub.path, sub.module, type(sub.module).forward, {})
        lp = LayerPlan(sub.path, layer)
        if isinstance(got, str):
            lp.fallbacks.append(("forward", got, "gated_norm"))
        else:
            lp.recognized["forward"] = got
        plan.layers.append(lp)
    return plan


def substitute(plan: Plan) -> Plan:
    """Expects: ``recognized`` and ``state_layout`` per layer. Leaves: ``replacements`` (global
    name -> drop-in function) and ``regions`` per layer, and bumps one counter per replacement."""
    for lp in plan.layers:
        for name, rec in lp.recognized.items():
            if isinstance(rec, norm.RecognizedNorm):
                sub = next(s for s in plan.submodules if s.module is lp.layer.module)
                lp.module_forward = norm.replacement(rec, sub)
                lp.regions.append(Region(name, rec.op, rec.evidence, len(rec.variants)))
                plan.count(rec.kind)
                continue
            callee = lp.layer.callees[name]
            binder = discover.Binder(callee.signature)
            if isinstance(rec, gated_delta.Recognized):
                fn = gated_delta.replacement(rec, callee.fn, binder, lp.state_layout or "kv")
                evidence = list(rec.structure.evidence) + [f"{'per-channel (KDA)' if rec.per_channel else 'per-head (GDN)'} gate"]
                counter = f"gated_delta_{rec.kind}"
            else:
                fn = conv.replacement(rec, callee.fn, binder)
                evidence, counter = rec.evidence, rec.kind
            lp.replacements[name] = fn
            lp.regions.append(Region(name, rec.op, evidence, len(rec.variants)))
            plan.count(counter)
    return plan


PASSES: tuple[Callable[[Plan], Plan], ...] = (
    discover_calls,
    recognize_gated_delta,
    recognize_conv,
    recognize_gated_norm,
    choose_state_layout,
    substitute,
)


def run(plan: Plan) -> Plan:
    """Run ``PASSES`` in order. Recognition works on small tensors, where one thread is much
    faster than several competing for the cores, so the passes run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p in PASSES:
            plan = p(plan)
    finally:
        torch.set_num_threads(threads)
    return plan


__all__ = ["PASSES", "COUNTERS", "Plan", "run", *(p.__name__ for p in PASSES)]
