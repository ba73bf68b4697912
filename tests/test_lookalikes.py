"""Soundness: functions that resemble the gated delta rule are not replaced.

``lookalikes.ZOO`` holds the rule plus one change each (clamps, thresholds, periodic resets,
windows, wrong transposes, decay order, extra normalizations, side effects, containers as
arguments, ...). One ``graphdelta.compile`` of a model with every entry in a layer of its own
must keep each look-alike as written, with a warning that names the function and says why,
fuse the rule itself and the changes that equal it on the whole domain, and give eager's
outputs. ``test_mutants_are_rejected_or_equal`` draws single mutations of the rule's source
with hypothesis: a mutant may be fused only if it equals the rule on an adversarial domain
drawn independently of the recognizer's own check.
"""
from __future__ import annotations

import ast
import inspect
import math
import textwrap
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import graphdelta
import lookalikes
from graphdelta import reference
from graphdelta.passes import gated_delta
from graphdelta.passes.discover import Call, Callee

ZOO = lookalikes.ZOO


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    model = lookalikes.ZooLM(ZOO).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = graphdelta.compile(model, backend="eager", probe=lookalikes.probe, state_layout="kv")
    return model, compiled, [str(w.message) for w in caught if "graphdelta" in str(w.message)]


@pytest.mark.parametrize("index", range(len(ZOO)), ids=[e.name for e in ZOO])
def test_lookalike_verdict(zoo, index):
    entry = ZOO[index]
    _, compiled, messages = zoo
    lp = next(lp for lp in compiled.plan.layers if lp.path == f"mixers.{index}")
    callee = "delta" if entry.base is lookalikes.delta_rule else "step"
    if not entry.why:
        assert callee in lp.recognized, lp.fallbacks
        return
    assert callee not in lp.recognized
    mine = [m for m in messages if f"layer mixers.{index}: {callee} ({entry.name}) kept as written" in m]
    assert mine and entry.why in mine[0], (mine, messages)


@torch.no_grad()
def test_zoo_matches_eager(zoo):
    """Kept functions run as written and fused ones run the op: with the layers' replacements
    installed (what the compiled graphs call; Dynamo itself is tested on the model families,
    and tracing 37 layers of unrolled loops would take minutes), the model's outputs are
    eager's through a prefill, a cached prefill and a decode step."""
    model, compiled, _ = zoo
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(5))

    def patched(*args):
        with compiled.patch.applied():
            return model(*args)

    torch.testing.assert_close(patched(ids), model(ids), rtol=1e-4, atol=1e-5)
    ref_cache, out_cache = {}, {}
    torch.testing.assert_close(patched(ids, out_cache), model(ids, ref_cache), rtol=1e-4, atol=1e-5)
    step = ids[:, -1:]
    torch.testing.assert_close(patched(step, out_cache), model(step, ref_cache), rtol=1e-4, atol=1e-5)
    for i in range(len(ZOO)):
        torch.testing.assert_close(out_cache[i], ref_cache[i], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- mutants

SOURCE = textwrap.dedent(inspect.getsource(lookalikes.delta_rule))
TREE = ast.parse(SOURCE)
# the statements after the docstring: mutation sites are expressions inside them
SITES = [n for n in ast.walk(TREE.body[0]) if isinstance(n, (ast.BinOp, ast.Call, ast.Constant, ast.UnaryOp))
         and not (isinstance(n, ast.Constant) and isinstance(n.value, str))]
KINDS = ("replace op", "perturb constant", "drop node", "add elementwise op")
BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.MatMult, ast.Pow)
WRAPPERS = ("torch.clamp({}, -1e4, 1e4)", "torch.relu({})", "({}).abs()", "torch.nan_to_num({})",
            "({}) * 1.0001", "torch.tanh({})", "({}) + 1e-6", "torch.where(({}) > -1e30, {}, 0.0)",
            "({}).half().float()", "({}).exp().log()")
RENAMES = {"exp": "exp2", "cumsum": "cummax", "tril": "triu", "transpose": "permute", "float": "half",
           "solve_triangular": "solve_triangular", "repeat_interleave": "repeat", "masked_fill": "masked_fill"}


class Mutate(ast.NodeTransformer):
    def __init__(self, site: ast.AST, kind: str, choice: int):
        self.site, self.kind, self.choice = site, kind, choice

    def visit(self, node):
        if node is not self.site:
            return super().visit(node)
        if self.kind == "replace op" and isinstance(node, ast.BinOp):
            options = [op for op in BINOPS if not isinstance(node.op, op)]
            return ast.BinOp(node.left, options[self.choice % len(options)](), node.right)
        if self.kind == "replace op" and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            new = RENAMES.get(node.func.attr, "neg")
            return ast.Call(ast.Attribute(node.func.value, new, ast.Load()), node.args, node.keywords)
        if self.kind == "perturb constant" and isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            value = node.value
            if isinstance(value, bool):
                return ast.Constant(not value)
            step = (1, -1, 2)[self.choice % 3] if isinstance(value, int) else (1e-3, -1e-3, 0.5)[self.choice % 3]
            return ast.Constant(value + step if isinstance(value, int) else value * (1 + step))
        if self.kind == "drop node" and isinstance(node, ast.BinOp):
            return (node.left, node.right)[self.choice % 2]
        if self.kind == "drop node" and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            return node.func.value
        if self.kind == "drop node" and isinstance(node, ast.UnaryOp):
            return node.operand
        if self.kind == "add elementwise op" and not isinstance(node, ast.Constant):
            text = WRAPPERS[self.choice % len(WRAPPERS)].replace("{}", ast.unparse(node))
            return ast.parse(text, mode="eval").body
        return node  # no such mutation at this site: the mutant is the rule itself


def mutant(site_index: int, kind: str, choice: int):
    tree = ast.parse(SOURCE)
    site = [n for n in ast.walk(tree.body[0]) if isinstance(n, (ast.BinOp, ast.Call, ast.Constant, ast.UnaryOp))
            and not (isinstance(n, ast.Constant) and isinstance(n.value, str))][site_index]
    tree = ast.fix_missing_locations(Mutate(site, kind, choice).visit(tree))
    tree.body[0].name = "mutant"
    namespace = dict(lookalikes.__dict__)
    exec(compile(tree, f"{lookalikes.__file__}::mutant", "exec"), namespace)
    return namespace["mutant"], ast.unparse(tree)


def _inputs(B: int, T: int, seed: int, state: bool):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, 1, 8, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, 1, 8, generator=gen), dim=-1)
    v = torch.randn(B, T, 2, 8, generator=gen)
    classes = torch.tensor([0.0, -1e-3, -0.5, -3.0, -20.0, -1e4, -math.inf])
    g = classes[torch.randint(0, len(classes), (B, T, 2), generator=gen)] * torch.rand(B, T, 2, generator=gen)
    g = torch.where(torch.isnan(g), torch.zeros_like(g), g)
    beta = 2 * torch.rand(B, T, 2, generator=gen)
    s = torch.randn(B, 2, 8, 8, generator=gen) if state else None
    return q, k, v, g, beta, s


def equals_rule(fn) -> bool:
    """An independent check of a fused mutant: batch 3, lengths off the recognizer's grid, gates
    drawn per token from 0 to -inf, random states; finite outputs must match the reference."""
    for T, seed in ((2, 1), (23, 2), (57, 3), (131, 4)):
        q, k, v, g, beta, s = _inputs(3, T, seed, state=seed % 2 == 0)
        try:
            with torch.no_grad():
                o, final = fn(q, k, v, g, beta, s)
        except Exception:  # noqa: BLE001 - eager raises where the op would not: not equal
            return False
        ref_o, ref_s = reference.gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                                  initial_state=None if s is None else s.double(),
                                                  output_final_state=True)
        for x, ref in ((o, ref_o), (final, ref_s)):
            ok = torch.isfinite(x)
            if x.shape != ref.shape or not torch.allclose(x.double()[ok], ref[ok], rtol=1e-2, atol=1e-2 * float(ref.abs().max())):
                return False
    return True


def recognize(fn):
    q, k, v, g, beta, s = _inputs(1, 20, 0, state=False)
    callee = Callee("mutant", fn, inspect.signature(fn))
    for state in (None, torch.randn(1, 2, 8, 8)):
        bound = dict(q=q, k=k, v=v, g=g.clamp_min(-1), beta=beta, state=state)
        callee.calls.append(Call(bound, set(), None))
    return gated_delta.recognize(callee)


@given(site=st.integers(0, len(SITES) - 1), kind=st.sampled_from(KINDS), choice=st.integers(0, 9))
def test_mutants_are_rejected_or_equal(site, kind, choice):
    try:
        fn, source = mutant(site, kind, choice)
    except SyntaxError:
        return
    got = recognize(fn)
    if not isinstance(got, str):
        assert equals_rule(fn), f"a mutant was fused but differs from the rule:\n{source}"


def test_rule_itself_is_recognized():
    """The mutation test's harness recognizes the unmutated rule (so its rejections mean something)."""
    got = recognize(lookalikes.delta_rule)
    assert not isinstance(got, str), got
    assert equals_rule(lookalikes.delta_rule)
