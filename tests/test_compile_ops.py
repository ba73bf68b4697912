"""The ops are single graph nodes under torch.compile(fullgraph=True), and give the eager results."""
import pytest
import torch
from torch.library import opcheck

import graphdelta as gd
from graphdelta.testing import ProblemSpec, relative_error

OPS = torch.ops.graphdelta


def layer(q, k, v, g, beta, h0, pool, slots, x, w, conv_pool):
    """A linear-attention layer's kernels, prefill then a decode step."""
    y, conv_state = gd.causal_conv1d(x, w, None, None, True)
    o, state = gd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)
    o2, _ = gd.gated_delta_rule_decode(q[:, -1:], k[:, -1:], v[:, -1:], g[:, -1:], beta[:, -1:],
                                       pool, slots, use_qk_l2norm_in_kernel=True)
    y2 = gd.causal_conv1d_update(x[:, -1], conv_pool, w, None, slots)
    return y, conv_state, o, state, o2, y2


def _inputs(T):
    p = ProblemSpec(B=2, T=T, H=1, group=2, K=16, V=16, initial_state=True, l2norm_in_kernel=True,
                    per_channel_gate=True, seed=T).build()
    gen = torch.Generator().manual_seed(T)  # the same inputs whatever ran before in the process
    pool = torch.randn(4, 2, 16, 16, generator=gen)
    conv_pool = torch.randn(4, 8, 3, generator=gen)
    x, w = torch.randn(2, T, 8, generator=gen), torch.randn(8, 4, generator=gen)
    return (p.q, p.k, p.v, p.g, p.beta, p.initial_state, pool, torch.tensor([3, -1], dtype=torch.int32),
            x, w, conv_pool)


def _clone(args):
    return tuple(a.clone() for a in args)


def test_one_node_per_op_and_same_results():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    for T in (5, 70, 130):  # several chunk counts
        args = _inputs(T)
        eager_args, compiled_args = _clone(args), _clone(args)
        expected = layer(*eager_args)
        got = compiled(*compiled_args)
        for e, c in zip(expected, got):
            assert relative_error(c, e) < 1e-6
        assert torch.equal(eager_args[6], compiled_args[6])  # the pools were updated alike
        assert torch.equal(eager_args[10], compiled_args[10])
    assert len(graphs) == 1, "one dynamic graph serves every length"
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    targets = [t.default if isinstance(t, torch._ops.OpOverloadPacket) else t for t in targets]
    for op in (OPS.chunk_gated_delta_rule, OPS.gated_delta_rule_decode, OPS.causal_conv1d,
               OPS.causal_conv1d_update):
        assert targets.count(op.default) == 1, f"{op} appears {targets.count(op.default)} times"


def test_inductor_compiles_the_ops():
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    args = _inputs(33)
    eager_args, compiled_args = _clone(args), _clone(args)
    for e, c in zip(layer(*eager_args), compiled(*compiled_args)):
        assert relative_error(c, e) < 1e-6
    assert torch.equal(eager_args[6], compiled_args[6])


@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck(varlen):
    spec = ProblemSpec(B=1, T=20, H=1, group=2, K=16, V=16, initial_state=True,
                       seqlens=(3, 17) if varlen else None, state_layout="vk")
    p = spec.build()
    args = (p.q, p.k, p.v, p.g, p.beta, 0.25, p.initial_state, p.cu_seqlens, True, "vk")
    opcheck(OPS.chunk_gated_delta_rule, args)
    opcheck(OPS.recurrent_gated_delta_rule, args)
    pool = torch.randn(3, 2, 16, 16)
    step = (x[:, :1].expand(2, *x.shape[1:]).contiguous() for x in (p.q, p.k, p.v, p.g, p.beta))
    opcheck(OPS.gated_delta_rule_decode, (*step, pool, torch.tensor([2, -1], dtype=torch.int32), 0.25,
                                          False, "vk", True))
    x, w = torch.randn(1, 20, 8), torch.randn(8, 4)
    opcheck(OPS.causal_conv1d, (x, w, torch.randn(8), torch.randn(spec.N, 8, 4), p.cu_seqlens, "silu"))
    opcheck(OPS.causal_conv1d_update, (x[:, :2].transpose(0, 1).contiguous(), torch.randn(3, 8, 3), w,
                                       None, torch.tensor([0, -1]), "silu"))
