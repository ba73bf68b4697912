"""The graph pass that hands the gated RMSNorm its gate unflattened (``passes/norm_gate.py``):
rewritten where the gate is a reshape of a tensor holding whole rows, left alone otherwise,
and the same numbers either way (to the last bit or so)."""
from __future__ import annotations

import pytest
import torch

import graphdelta
from graphdelta.compiler import inner_backend
from graphdelta.passes.norm_gate import unflatten_norm_gates
from graphdelta.report import GraphLog

D = 8


def qwen_style(x, proj, weight):
    """The gate is a slice of a projection, [B, T, H, 2 * D], flattened to rows of D."""
    B, T = proj.shape[:2]
    z = proj.unflatten(-1, (2, 3 * D))[..., D:]  # [B, T, 2, 2D]: not viewable as rows of D
    z = z.reshape(B, T, 4, D).reshape(-1, D)
    return graphdelta.ops.gated_rms_norm(x.reshape(-1, D), z, weight).reshape(B, T, -1)


def contiguous_gate(x, gate, weight):
    return graphdelta.ops.gated_rms_norm(x, gate, weight)


def odd_width(x, proj, weight):
    """The gate's producer has rows of 60, not a multiple of D: its rows straddle the norm's."""
    z = proj.reshape(-1, D)
    return graphdelta.ops.gated_rms_norm(x.reshape(-1, D), z, weight)


@pytest.mark.parametrize("fn, shapes, rewritten", [
    (qwen_style, [(2, 5, 4 * D), (2, 5, 6 * D), (D,)], 1),
    (contiguous_gate, [(10, D), (10, D), (D,)], 0),
    (odd_width, [(15, D), (2, 60), (D,)], 0),
])
def test_norm_gate_rewrite(fn, shapes, rewritten):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g) for s in shapes]
    log = GraphLog(inner_backend("eager"), rewrite=unflatten_norm_gates)
    compiled = torch.compile(fn, backend=log, fullgraph=True)
    out = compiled(*args)
    assert [r.norm_gates for r in log.graphs] == [rewritten]
    # The same rows in the same order. Not bit-identical on every CPU: a strided gate can take
    # another vectorization of SiLU than a contiguous one (1 ulp apart on some x86 machines).
    torch.testing.assert_close(out, fn(*args), rtol=1e-6, atol=1e-7)
