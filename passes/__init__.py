"""Passes: find the gated-delta pipeline, the token recurrence and the causal conv1d in the
functions a model's layers call, and the gated RMSNorm among its submodules, and replace each
recognized function or module with a graphdelta op.

They run on a ``Plan`` in this order (``PASSES``), each a named callable whose docstring says
what it expects and what it leaves behind:

1. ``discover_calls``: list each layer's global callees and the candidate norm submodules,
   and record their calls on a probe (everything later decides from recorded calls, never
   from names);
2. ``recognize_gated_delta`` (``gated_delta.py``): chunked gated delta rule and token
   recurrence (GDN and KDA);
3. ``recognize_conv`` (``conv.py``): causal depthwise conv1d and its state update;
4. ``recognize_gated_norm`` (``norm.py``): the gated RMSNorm (SiLU or sigmoid gate) submodules;
5. ``choose_state_layout``: kv or vk per layer, after 2 (it needs to know which state-reading
   functions were replaced, and which the probe never reached);
6. ``substitute``: build the per-layer drop-ins, last, once every decision is made.

A recognizer is one module plus one line here (``recognize.recognizer_pass``). What a
recognizer replaces, it has proved as far as we can, and anything it cannot prove runs as
written, with a warning that names the function, the node and the user's source line:

- **complete explanation** (``grammar.py``): every node of the function's traced graph, at
  two lengths, has a role in the family's grammar; that grammar is written down in
  ``grammar.py`` (what any function may hold) and in each recognizer's ``_rules`` (what its
  family computes). Comparisons, clamps and everything else piecewise, data-dependent
  indexing and branching, narrowing casts, random numbers and unexplained float literals are
  never part of one;
- **no side effects** (``effects.py``): no argument updated in place (except a conv state the
  family updates), no global, container, attribute or tensor the function can reach changed,
  no argument other than tensors and plain values, and nothing returned beyond the outputs;
- **numbers on an adversarial domain** (``delta_check.py`` for the gated delta rule): gates
  from 0 to -inf, beta in [0, 2], key norms from 1e-3 to 1e3, zero and random states, batch
  2, lengths around the chunk size and past every integer constant the function holds.

``tests/lookalikes.py`` is a zoo of functions that resemble the rule and must not fuse.

Two more run while the model is traced, not on the plan: ``causal_mask`` (transformers'
masking code keeps SDPA's causal path) and ``norm_gate`` (a rewrite of the graph Dynamo hands
to the backend).

Every replacement bumps a counter in ``Plan.counters`` and ``plan.COUNTERS``; ``explain``
reads them. Recognition happens on small graphs of the called functions, so Dynamo later sees
one graphdelta op per call and a single dynamic graph for every prompt length.
"""
from __future__ import annotations

from typing import Callable

from . import conv, discover, gated_delta, norm
from .layout import choose_state_layout
from .plan import COUNTERS, LayerPlan, Plan, Region
from .recognize import recognizer_pass, single_thread


def discover_calls(plan: Plan) -> Plan:
    """Expects: ``plan.model`` and ``plan.probe`` (and what an earlier run discovered, if any).
    Leaves: one ``LayerPlan`` per module whose forward calls global Python functions, and
    ``plan.submodules`` (leaf modules that may be a gated norm), with every call seen during
    the probe recorded (added to those recorded before)."""
    if plan.discovered is None:
        plan.discovered = discover.find_layers(plan.model)
        plan.submodules = discover.find_submodules(plan.model, norm.is_candidate)
    discover.probe(plan.model, plan.discovered, plan.probe, plan.submodules)
    plan.layers = [LayerPlan(layer.path, layer, unprobed=sorted(n for n, c in layer.callees.items() if not c.calls))
                   for layer in plan.discovered]
    return plan


def substitute(plan: Plan) -> Plan:
    """Expects: ``recognized`` and ``state_layout`` per layer. Leaves: ``replacements`` (global
    name -> drop-in function) or ``module_forward`` and ``regions`` per layer, and bumps one
    counter per replacement."""
    built = plan.cache.setdefault("built", {})  # the same drop-in for the same recognition
    for lp in plan.layers:
        for name, rec in lp.recognized.items():
            key = (lp.path, name, id(rec), lp.state_layout)
            fn = built[key][1] if key in built else built.setdefault(key, (rec, rec.replacement(lp, plan)))[1]
            if rec.replaces_module:
                lp.module_forward = fn
            else:
                lp.replacements[name] = fn
            lp.regions.append(Region(name, rec.op, rec.evidence, len(rec.variants)))
            plan.count(rec.counter)
        if lp.flipped:
            # a function never called while probing might read the state: in the other layout it must not run
            for name in lp.unprobed:
                key = (lp.path, name, "never probed")
                guard = built.setdefault(key, (None, _refuse_in_vk(lp.path, lp.layer.callees[name].fn)))[1]
                lp.replacements.setdefault(name, guard)
    return plan


def _refuse_in_vk(path: str, fn: Callable) -> Callable:
    def never_probed(*args, **kwargs):
        raise RuntimeError(
            f"graphdelta: layer {path} called {fn.__name__}, which never ran while probing, and the layer keeps "
            "its recurrent state in a layout the user's code does not, which that function cannot be trusted to "
            "read. Compile with state_layout='auto', or pass a probe that reaches this call.")
    never_probed.__name__ = f"graphdelta_never_probed_{fn.__name__}"
    return never_probed


PASSES: tuple[Callable[[Plan], Plan], ...] = (
    discover_calls,
    recognizer_pass(gated_delta, "gated_delta"),
    recognizer_pass(conv, "conv"),
    norm.recognize_gated_norm,
    choose_state_layout,
    substitute,
)


def run(plan: Plan, on_pass: Callable[[str], None] | None = None) -> Plan:
    """Run ``PASSES`` in order (``on_pass(name)`` before each: progress). Recognition works on
    small tensors, where one thread is much faster than several competing for the cores, so the
    passes run single-threaded."""
    with single_thread():
        for p in PASSES:
            if on_pass is not None:
                on_pass(p.__name__)
            plan = p(plan)
    return plan


__all__ = ["PASSES", "COUNTERS", "Plan", "run", *(p.__name__ for p in PASSES)]
