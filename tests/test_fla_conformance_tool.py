"""``tools/fla_conformance.py``, the runner of fla's own tests against ``graphdelta.fla``: its
rewrite sends each call to the right side, it sets gradient-only tests apart, and its parts that
need no fla (the convolution oracle, the autograd link) compute what they claim."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from graphdelta import fla

spec = importlib.util.spec_from_file_location("fla_conformance", Path(__file__).parents[1] / "tools/fla_conformance.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

SOURCE = '''
import pytest
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from fla.utils import assert_close

def test_chunk_varlen_prefill(q):
    tri, tri_ht = chunk_gated_delta_rule(q=q)
    ref, ref_ht = chunk_gated_delta_rule(q=q, use_gate_in_kernel=False)
    y, ref_cache = chunk_gated_delta_rule(q)
    assert_close('o', ref, tri, 0.005)
    assert_close('dq', ref, tri, 0.005)

def test_named_by_an_fstring(q, chunk_size):
    o = chunk_gated_delta_rule(q)
    o.sum().backward()
    assert_close(f'o@{chunk_size}', o, o, 0.005)
    assert_close(f'dq@{chunk_size}', q.grad, q.grad, 0.005)

def test_grads(q):
    def ref_func(x):
        return chunk_gated_delta_rule(x)
    def triton_func(x):
        return chunk_gated_delta_rule(x)
    grads = torch.autograd.grad(ref_func(q).sum(), q)
    for name, a, b in zip(["x"], grads, grads):
        assert_close(name, a, b, 1e-3)
'''


def test_the_rewrite_routes_each_call():
    tree = ast.parse(tool.rewrite(SOURCE))
    calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and "chunk_gated" in ast.unparse(n.func)]
    # test_chunk_varlen_prefill: tri (ours), ref (oracle), "y, ref_cache" (oracle); the f-string
    # test: o (ours); test_grads: ref_func (oracle), triton_func (ours)
    assert calls == ["_gd_harness.ours_chunk_gated_delta_rule", "_gd_harness.oracle_chunk_gated_delta_rule",
                     "_gd_harness.oracle_chunk_gated_delta_rule", "_gd_harness.ours_chunk_gated_delta_rule",
                     "_gd_harness.oracle_chunk_gated_delta_rule", "_gd_harness.ours_chunk_gated_delta_rule"]
    tests = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not tests["test_chunk_varlen_prefill"].decorator_list  # compares 'o': a forward test
    assert not tests["test_named_by_an_fstring"].decorator_list  # f'o@{chunk_size}' too
    assert tool.GRADIENTS_ONLY in ast.unparse(tests["test_grads"].decorator_list[0])
    assert all(ast.unparse(n.func) == "_gd_harness.assert_close"
               for n in ast.walk(tree) if isinstance(n, ast.Call) and "assert_close" in ast.unparse(n.func))


@pytest.mark.parametrize("name, gradient", [("dq", True), (" dx", True), ("dh0", True), ("dA_log", True),
                                            ("dq@16", True),
                                            ("o", False), (" y", False), ("ht", False),
                                            ("decode y with non-contiguous x", False), ("o@16", False)])
def test_gradient_names(name, gradient):
    assert tool._gradient_name(name) == gradient


def test_the_link_keeps_values_and_gives_zero_gradients():
    x = torch.tensor([1.0, float("-inf"), 2.0], requires_grad=True)
    out = torch.tensor([3.0, 4.0], dtype=torch.float16)
    linked = tool._link((out, None), [x, 5])
    assert linked[1] is None and linked[0].dtype == torch.float16 and torch.equal(linked[0], out)
    linked[0].float().sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))  # no 0 * inf


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("activation", [None, "swish"])
def test_the_convolution_oracle_is_fla_s_convolution(varlen, activation):
    """The float64 oracle against graphdelta.fla (itself checked against graphdelta's reference in
    test_fla_calls.py): two independent writings of fla's [N, D, W] state convention."""
    gen = torch.Generator().manual_seed(3)
    B, T, D, W = (1, 11, 6, 4) if varlen else (2, 7, 6, 4)
    x, residual = torch.randn(B, T, D, generator=gen), torch.randn(B, T, D, generator=gen)
    weight, bias = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    cu = torch.tensor([0, 3, 3, 11]) if varlen else None
    h0 = torch.randn(3 if varlen else B, D, W, generator=gen)
    got = tool.oracle_causal_conv1d(x, weight, bias, residual, h0, True, activation, cu_seqlens=cu)
    want = fla.causal_conv1d(x, weight, bias, residual, h0, True, activation, cu_seqlens=cu)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    cache, token = got[1].clone(), torch.randn(h0.shape[0], D, generator=gen)
    y, cache = tool.oracle_causal_conv1d_update(token, cache, None, weight, bias, activation)
    y2, cache2 = fla.causal_conv1d_update(token, got[1].clone(), None, weight, bias, activation)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, cache2)
