"""Give the gated RMSNorm its gate in the layout the gate was produced in.

The GDN layers of transformers flatten both norm inputs to ``[B * T * HV, V]`` rows. The gate
``z`` is a slice of the input projection (``[B, T, H, (HV / H) * V]`` for Qwen3-Next), so the
flattening cannot be a view: inductor fuses the copy into the norm's kernel and indexes ``z``
with a division and a modulo per row, and on CPU that kernel runs scalar, one ``exp`` at a
time (tiny Qwen3-Next, 2048 tokens: 2.56 ms per layer; 0.29 ms when the gate keeps its shape).

The norm works row by row over the last dimension, so any leading shape gives the same rows.
This pass, on the graph Dynamo hands to the backend, follows the gate back through reshapes
to the first tensor whose last dimension is a multiple of D, and calls the norm on that
tensor split as ``[..., m, D]`` (a view) with ``x`` reshaped to match; the result is reshaped
back to the shape the norm returned. Reshapes keep row-major element order, so the rows pair
up exactly as before.
"""
from __future__ import annotations

import torch
from torch import fx

RESHAPE_METHODS = ("reshape", "view", "flatten", "unflatten", "contiguous")
RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten, torch.unflatten)


def _norm_targets() -> tuple:
    import graphdelta.ops  # noqa: F401  (registers the op)

    packet = torch.ops.graphdelta.gated_rms_norm
    return (packet, packet.default)


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in RESHAPE_METHODS
    return node.op == "call_function" and node.target in RESHAPE_FUNCTIONS


def _producer(gate: fx.Node, D: int) -> fx.Node | None:
    """The node the gate was reshaped from, if its last dimension holds whole rows of D."""
    node = gate
    while _is_reshape(node) and isinstance(node.args[0], fx.Node) and _value(node.args[0]) is not None:
        node = node.args[0]
    value = _value(node)
    if node is gate or value is None or value.dim() < 1:
        return None
    last = value.shape[-1]
    return node if isinstance(last, int) and last % D == 0 else None


def unflatten_norm_gates(gm: fx.GraphModule) -> int:
    """Rewrite every CPU gated RMSNorm of ``gm`` whose gate is a reshape (see the module
    docstring); returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _norm_targets():
            continue
        x, gate = node.args[:2]
        xv, gv = _value(x), _value(gate)
        if xv is None or gv is None or xv.device.type != "cpu" or xv.shape != gv.shape:
            continue
        D = gv.shape[-1]
        source = _producer(gate, D) if isinstance(D, int) else None
        if source is None:
            continue
        with gm.graph.inserting_before(node):
            split = gm.graph.call_method("unflatten", (source, -1, (-1, D)))
            x_split = gm.graph.call_method("reshape_as", (x, split))
            normed = gm.graph.call_function(node.target, (x_split, split, *node.args[2:]), dict(node.kwargs))
        with gm.graph.inserting_after(normed):
            back = gm.graph.call_method("reshape_as", (normed, x))
        node.replace_all_uses_with(back)
        gm.graph.erase_node(node)
        while gate is not source and not gate.users:  # the flattening reshapes, now unused
            gate, dead = gate.args[0], gate
            gm.graph.erase_node(dead)
        count += 1
    if count:
        gm.recompile()
    return count
