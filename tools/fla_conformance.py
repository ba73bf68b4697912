"""Run flash-linear-attention's own op tests against ``graphdelta.fla``, forward only.

    python tools/fla_conformance.py FLA_CHECKOUT [--backend torch|triton] [--max-tokens N] [-k EXPR]

FLA_CHECKOUT is a clone of fla-org/flash-linear-attention (its ``tests/`` is read; no fla test
file is copied into this repository), and fla itself must be importable (``pip install
fla-core==0.6.0 einops``: fla's PyTorch references and helpers run on CPU). The script copies
fla's GDN, KDA, short-convolution and gated-norm test files into a temporary folder, rewrites
each call of a function that ``graphdelta.fla`` provides, and runs them with pytest:

- a call assigned to a name with a ``ref`` word (``ref``, ``ref_ht``, ``y_ref``), or made inside a
  function so named (``ref_func``, ``run_ref``; not ``prefill``), is fla's reference side: it
  runs this script's oracle, built on fla's PyTorch references (``naive_recurrent_gated_delta_rule``,
  ``naive_recurrent_kda``, ``naive_gdn_gate``, ``naive_kda_gate``, ``naive_kda_lowerbound_gate``)
  and a float64 convolution;
- every other call runs ``graphdelta.fla`` with fla's arguments unchanged. Its outputs are
  joined to the inputs' autograd graph by an empty slice (values unchanged, gradients zero),
  so the test's backward calls run; ``ShortConvolution`` and ``FusedRMSNormGated`` reach
  graphdelta through fla's module globals;
- ``assert_close`` checks every forward comparison (``o``, ``ht``, ``y``, caches) with fla's
  tolerance and skips the gradient ones (one-word names ``d...``, or tensors that
  ``torch.autograd.grad`` returned): graphdelta is inference-only. A test that compares
  gradients only is skipped before it runs, and counted apart.

A test that never reaches ``graphdelta.fla`` (fla's kernel internals, its backends' routing) is
reported as not applicable whatever its outcome. The summary, and with ``--out`` a JSON file,
gives per test: outcome, graphdelta calls, forward comparisons checked, gradient comparisons
skipped. ``--backend triton`` runs graphdelta's Triton kernels under ``TRITON_INTERPRET=1``
(slow on CPU: use ``--max-tokens``).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

FILES = ("tests/ops/test_gdn.py", "tests/ops/test_kda.py", "tests/modules/test_conv.py",
         "tests/modules/test_layernorm_gated.py")
TARGETS = ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_kda", "fused_recurrent_kda",
           "causal_conv1d", "causal_conv1d_update", "rms_norm_gated", "rmsnorm_fn")
HARNESS = "_gd_harness"


# ----------------------------------------------------------------------------------------------
# The rewrite of fla's test files
# ----------------------------------------------------------------------------------------------

class _Rewrite(ast.NodeTransformer):
    """Routes calls of TARGETS to ``_gd_harness.ours_X`` or ``_gd_harness.oracle_X`` and fla's
    ``assert_close`` to the harness's."""

    def __init__(self):
        self.parents: dict[ast.AST, ast.AST] = {}

    def visit_Module(self, node):
        for parent in ast.walk(node):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        self.generic_visit(node)
        node.body.insert(0, ast.parse(f"import fla_conformance as {HARNESS}").body[0])
        return node

    def visit_FunctionDef(self, node):
        if node.name.startswith("test_") and _gradients_only(node):
            node.decorator_list.insert(0, ast.parse(f"pytest.mark.skip(reason={GRADIENTS_ONLY!r})").body[0].value)
        self.generic_visit(node)
        return node

    def _reference_side(self, node) -> bool:
        p = node
        while p in self.parents:
            p = self.parents[p]
            if isinstance(p, ast.Assign):  # the nearest assignment decides
                names = [n.id for t in p.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                return any("ref" in n.split("_") for n in names)
            if isinstance(p, (ast.FunctionDef, ast.Lambda)):  # ref_func, run_ref (not "prefill")
                return isinstance(p, ast.FunctionDef) and "ref" in p.name.split("_")
        return False

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in TARGETS:
            side = "oracle_" if self._reference_side(node) else "ours_"
            node.func = ast.Attribute(ast.Name(HARNESS, ast.Load()), side + node.func.id, ast.Load())
        elif isinstance(node.func, ast.Name) and node.func.id == "assert_close":
            node.func = ast.Attribute(ast.Name(HARNESS, ast.Load()), "assert_close", ast.Load())
        self.generic_visit(node)
        return node


GRADIENTS_ONLY = "compares gradients only, and graphdelta.fla is inference-only"


def _gradients_only(test: ast.FunctionDef) -> bool:
    """A test that takes gradients and compares nothing else: every ``assert_close`` is named
    ``d...`` or by a variable (fla's loops over gradient names), and no other comparison."""
    calls = [n for n in ast.walk(test) if isinstance(n, ast.Call)]
    names = [ast.unparse(c.func) for c in calls]
    takes_grads = any(n.endswith(("backward", "autograd.grad")) for n in names)
    forward = any(n.endswith(("testing.assert_close", "allclose")) for n in names) or any(
        ast.unparse(c.func) == "assert_close" and c.args and _literal_head(c.args[0]) is not None
        and not _gradient_name(_literal_head(c.args[0])) for c in calls)
    return takes_grads and not forward


def _literal_head(node: ast.AST) -> str | None:
    """The literal text a comparison's name starts with: "o" of 'o', "o@" of f'o@{chunk_size}';
    None for a name held in a variable."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _gradient_name(name: str) -> bool:
    """fla names a gradient comparison by one word, maybe tagged: "dq", " dx", "dh0", "dA_log",
    "db_raw", "dq@16"."""
    return re.fullmatch(r"d[A-Za-z0-9_]*(@.*)?", name.strip()) is not None


def rewrite(source: str) -> str:
    tree = _Rewrite().visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))


# ----------------------------------------------------------------------------------------------
# The harness the rewritten tests import (``import fla_conformance as _gd_harness``)
# ----------------------------------------------------------------------------------------------

RECORD = {"calls": 0, "checked": 0, "grads_skipped": 0, "max_tokens_exceeded": False}
MAX_TOKENS = int(os.environ.get("GD_FLA_MAX_TOKENS", "0"))


def _torch():
    import torch
    return torch


def _detached(x):
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(e) for e in x)
    return x


def _link(outputs, inputs):
    """``outputs`` joined to the autograd graph of the ``inputs`` that require grad, values
    unchanged: an empty slice's sum is exactly 0 (no 0 * inf), and a 0-dim float32 tensor does
    not change the outputs' dtype."""
    torch = _torch()
    needing = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not needing or not torch.is_grad_enabled():
        return outputs
    zero = sum(t.reshape(-1)[:0].float().sum() for t in needing)

    def join(o):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            return o + zero
        if isinstance(o, tuple):
            return tuple(join(e) for e in o)
        return o
    return join(outputs)


def _without_autograd(fn):
    """``fn`` run on detached inputs without recording a graph, its outputs linked to the inputs'
    graph (``_link``): graphdelta's ops have no backward, and for the oracle a recorded naive
    loop over 8192 tokens of 96 heads would keep every step's state (fla's largest KDA case
    needs over 100 GB that way); the gradients are not compared either way."""
    def call(*args, **kwargs):
        torch = _torch()
        with torch.no_grad():
            out = fn(*_detached(args), **{k: _detached(v) for k, v in kwargs.items()})
        return _link(out, [*args, *kwargs.values()])
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def _ours(name):
    def call(*args, **kwargs):
        from graphdelta import fla as gd_fla
        torch = _torch()
        RECORD["calls"] += 1
        if MAX_TOKENS:
            x = args[0] if args else kwargs.get("x", kwargs.get("q"))
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] * x.shape[1] > MAX_TOKENS:
                RECORD["max_tokens_exceeded"] = True
                import pytest
                pytest.skip(f"more than --max-tokens={MAX_TOKENS} tokens")
        return _without_autograd(getattr(gd_fla, name))(*args, **kwargs)
    call.__name__ = name
    return call


for _name in TARGETS:
    globals()["ours_" + _name] = _ours(_name)


_GRADS: dict[int, object] = {}  # id -> weakref of every tensor torch.autograd.grad returned


def _recording_grad(grad):
    import weakref

    def call(*args, **kwargs):
        out = grad(*args, **kwargs)
        for t in out:
            if t is not None:
                _GRADS[id(t)] = weakref.ref(t)
        return out
    return call


def _is_gradient(t) -> bool:
    ref = _GRADS.get(id(t))
    return ref is not None and ref() is t


def assert_close(prefix, ref, tri, ratio, *args, **kwargs):
    """fla's assert_close on forward results; gradients (named ``d...`` in one word, or returned by
    ``torch.autograd.grad``) skipped."""
    if _gradient_name(prefix) or _is_gradient(ref) or _is_gradient(tri):
        RECORD["grads_skipped"] += 1
        return None
    from fla.utils import assert_close as fla_assert_close
    fla_assert_close(prefix, ref, tri, ratio, *args, **kwargs)
    RECORD["checked"] += 1


def _gdn_like(naive, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
              use_qk_l2norm_in_kernel, state_v_first, out_dtype, per_key_gate):
    """fla's naive recurrence per sequence, with GVA by repetition and the vk layout by
    transposition: the reference side of fla's tests."""
    torch = _torch()
    F = torch.nn.functional
    H, HV = q.shape[2], v.shape[2]
    if use_qk_l2norm_in_kernel:
        q, k = F.normalize(q.float(), p=2, dim=-1), F.normalize(k.float(), p=2, dim=-1)
    if not per_key_gate:  # naive_recurrent_kda repeats q and k itself
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    h0 = initial_state.transpose(-1, -2) if (initial_state is not None and state_v_first) else initial_state
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        sl = (slice(None), slice(s, e)) if cu_seqlens is not None else (slice(None), slice(None))
        h = None if h0 is None else (h0[n:n + 1] if cu_seqlens is not None else h0)
        if e == s:  # an empty sequence passes its state through
            outs.append(v[sl].float())
            finals.append(h.float() if h is not None else q.new_zeros(1, HV, q.shape[-1], v.shape[-1]).float())
            continue
        args = (q[sl], k[sl], v[sl], g[sl], beta[sl]) if per_key_gate else (q[sl], k[sl], v[sl], beta[sl], g[sl])
        o, ht = naive(*args, scale=scale, initial_state=h, output_final_state=True)
        outs.append(o)
        finals.append(ht)
    o = torch.cat(outs, 1).to(out_dtype)
    ht = torch.cat(finals, 0)
    if state_v_first:
        ht = ht.transpose(-1, -2)
    return o, (ht.float() if output_final_state else None)


def _gdn_oracle(chunked):
    def oracle(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
               state_v_first=False, cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None,
               transpose_state_layout=None, **_tuning):
        from fla.ops.gated_delta_rule.gate import naive_gdn_gate
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
        torch = _torch()
        if transpose_state_layout is not None:
            state_v_first = transpose_state_layout
        if use_gate_in_kernel:
            g = naive_gdn_gate(g, A_log, dt_bias)
        if g is None:
            g = torch.zeros(v.shape[:3], device=v.device)
        if beta is None:
            beta = torch.ones(v.shape[:3], device=v.device)
        if use_beta_sigmoid_in_kernel:
            beta = beta.float().sigmoid() * (2 if allow_neg_eigval else 1)
        return _gdn_like(naive_recurrent_gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                         output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, state_v_first,
                         q.dtype if chunked else v.dtype, per_key_gate=False)
    return oracle


def _kda_oracle(chunked):
    def oracle(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None,
               lower_bound=None, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
               state_v_first=False, cu_seqlens=None, transpose_state_layout=None, **_tuning):
        from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
        from fla.ops.kda.naive import naive_recurrent_kda
        if transpose_state_layout is not None:
            state_v_first = transpose_state_layout
        if use_gate_in_kernel:
            g = (naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound) if lower_bound is not None
                 else naive_kda_gate(g, A_log, dt_bias))
        if use_beta_sigmoid_in_kernel:
            beta = beta.float().sigmoid() * (2 if allow_neg_eigval else 1)
        return _gdn_like(naive_recurrent_kda, q, k, v, g, beta, scale, initial_state, output_final_state,
                         cu_seqlens, use_qk_l2norm_in_kernel, state_v_first,
                         q.dtype if chunked else v.dtype, per_key_gate=True)
    return oracle


oracle_chunk_gated_delta_rule = _without_autograd(_gdn_oracle(chunked=True))
oracle_fused_recurrent_gated_delta_rule = _without_autograd(_gdn_oracle(chunked=False))
oracle_chunk_kda = _without_autograd(_kda_oracle(chunked=True))
oracle_fused_recurrent_kda = _without_autograd(_kda_oracle(chunked=False))


@_without_autograd
def oracle_causal_conv1d(x, weight=None, bias=None, residual=None, initial_state=None, output_final_state=False,
                         activation=None, backend=None, cu_seqlens=None, **_tuning):
    """fla's short convolution in float64: per sequence, the W-1 inputs before it (the initial
    state's last W-1 columns, or zeros), a depthwise causal conv, bias, SiLU for
    "silu"/"swish", then the residual; the final state holds the last W inputs."""
    torch = _torch()
    F = torch.nn.functional
    D, W = weight.shape[0], weight.shape[-1]
    xs = x.reshape(*x.shape[:2], D).double()
    bounds = [0, x.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    ys, finals = [], []
    for n in range(x.shape[0] if cu_seqlens is None else len(bounds) - 1):
        seq = xs[n] if cu_seqlens is None else xs[0, bounds[n]:bounds[n + 1]]
        before = (initial_state[n].double()[:, 1:].t() if initial_state is not None
                  else seq.new_zeros(W - 1, D))
        full = torch.cat([before, seq], 0)  # [W - 1 + L, D]
        y = F.conv1d(torch.cat([full.new_zeros(1, D), full]).t()[None], weight.reshape(D, 1, W).double(),
                     None if bias is None else bias.double(), groups=D)[0].t()[1:]  # (L = 0 too)
        ys.append(F.silu(y) if activation in ("silu", "swish") else y)
        history = initial_state[n].double().t() if initial_state is not None else seq.new_zeros(W, D)
        finals.append(torch.cat([history, seq], 0)[-W:].t())  # an empty sequence keeps its state
    y = torch.stack(ys) if cu_seqlens is None else torch.cat(ys)[None]
    if residual is not None:
        y = y + residual.reshape(y.shape).double()
    final = torch.stack(finals).to(x.dtype) if output_final_state else None
    return y.reshape(x.shape).to(x.dtype), final


@_without_autograd
def oracle_causal_conv1d_update(x, cache, residual=None, weight=None, bias=None, activation=None):
    """One token per sequence through ``oracle_causal_conv1d``, the cache shifted in place."""
    rows = x.reshape(-1, x.shape[-1])
    y, final = oracle_causal_conv1d(rows[:, None], weight, bias, None, cache, True, activation)
    y = y[:, 0]
    if residual is not None:
        y = y + residual.reshape(y.shape)
    cache.copy_(final)
    return y.reshape(x.shape), cache


def _patch_fla_modules():
    """fla's modules call these functions through their own globals: route those to graphdelta."""
    import fla.modules.causal_conv1d.ops as conv_ops
    import fla.modules.norm.fused_norm_gate as fused_norm_gate
    import fla.modules.norm.layernorm_gated as layernorm_gated
    conv_ops.causal_conv1d = globals()["ours_causal_conv1d"]
    conv_ops.causal_conv1d_update = globals()["ours_causal_conv1d_update"]
    fused_norm_gate.rms_norm_gated = globals()["ours_rms_norm_gated"]
    layernorm_gated.rmsnorm_fn = globals()["ours_rmsnorm_fn"]


# pytest plugin hooks (``-p fla_conformance``)

RESULTS: list[dict] = []


def pytest_configure(config):
    import fla.utils
    # Without a GPU fla still names "cuda" as its device (its hardware probe falls back to it):
    # the tests build their inputs with ``.to(device)``, so they must read "cpu".
    fla.utils.device = "cpu"
    _patch_fla_modules()
    torch = _torch()
    torch.autograd.grad = _recording_grad(torch.autograd.grad)
    torch.testing.assert_close = _counted(torch.testing.assert_close)


def _counted(check):
    def call(actual, expected, *args, **kwargs):
        if _is_gradient(actual) or _is_gradient(expected):
            RECORD["grads_skipped"] += 1
            return None
        check(actual, expected, *args, **kwargs)
        RECORD["checked"] += 1
    return call


def pytest_runtest_setup(item):
    RECORD.update(calls=0, checked=0, grads_skipped=0, max_tokens_exceeded=False)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        message = ""
        if report.outcome != "passed" and report.longrepr is not None:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)[-300:]
        RESULTS.append({"test": report.nodeid, "outcome": report.outcome, **RECORD,
                        "message": message.splitlines()[0][:300] if message else ""})
        # (reset here too: a skip mark stops the setup before pytest_runtest_setup reaches us)
        RECORD.update(calls=0, checked=0, grads_skipped=0, max_tokens_exceeded=False)
        out = os.environ.get("GD_FLA_RESULTS")
        if out:  # after every test, so that a run killed part-way still reports what it did
            Path(out).write_text(json.dumps(RESULTS, indent=1))


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def classify(r: dict) -> str:
    if r["outcome"] == "skipped" and GRADIENTS_ONLY in r["message"]:
        return "gradients only"
    if r["outcome"] == "skipped":
        return "skipped"
    if r["calls"] == 0:
        return "n/a"
    if r["outcome"] == "passed":
        return "passed" if r["checked"] else "passed (no forward comparison)"
    return "failed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fla_checkout", type=Path, help="a clone of fla-org/flash-linear-attention")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch",
                   help="graphdelta's PyTorch path, or its Triton kernels under TRITON_INTERPRET=1")
    p.add_argument("--max-tokens", type=int, default=0, help="skip calls with more than B*T tokens (0: none)")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--files", nargs="*", default=list(FILES), help="fla test files, relative to the checkout")
    p.add_argument("--out", type=Path, default=None, help="write the per-test results here as JSON")
    args = p.parse_args(argv)

    tests = args.fla_checkout / "tests"
    if not tests.is_dir():
        p.error(f"fla_checkout: {args.fla_checkout} has no tests/ folder")
    try:
        import fla  # noqa: F401
    except ImportError as e:
        p.error(f"fla is not importable ({e}): pip install fla-core==0.6.0 einops")

    work = Path(tempfile.mkdtemp(prefix="gd_fla_"))
    for rel in args.files:
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(rewrite((args.fla_checkout / rel).read_text()))
    shutil.copy(__file__, work / "fla_conformance.py")
    results = work / "results.json"
    env = dict(os.environ, GD_FLA_RESULTS=str(results), GD_FLA_MAX_TOKENS=str(args.max_tokens),
               PYTHONPATH=os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
               FLA_DISABLE_BACKEND_DISPATCH="1", GRAPHDELTA_BACKEND=args.backend)
    if args.backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "fla_conformance", "-p", "no:cacheprovider",
           "-W", "ignore::DeprecationWarning", "-W", "ignore::UserWarning",
           "--rootdir", str(work), "-o", "python_files=test_*.py", *[str(work / f) for f in args.files]]
    if args.k:
        cmd += ["-k", args.k]
    import subprocess
    rc = subprocess.run(cmd, env=env, cwd=work).returncode
    if rc not in (0, 1):  # 1: some tests failed; anything else: pytest itself did not finish
        print(f"pytest exited with {rc}; the rewritten tests are in {work}", file=sys.stderr)
    rows = json.loads(results.read_text()) if results.exists() else []
    for r in rows:
        r["class"] = classify(r)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    _summary(rows, args)
    return 1 if any(r["class"] == "failed" for r in rows) else 0


def _summary(rows, args):
    print(f"\nfla's tests against graphdelta.fla (backend {args.backend}, "
          f"max tokens {args.max_tokens or 'none'}):")
    files = sorted({r["test"].split("::")[0] for r in rows})
    kinds = ("passed", "passed (no forward comparison)", "failed", "gradients only", "skipped", "n/a")
    print(f"| file | {' | '.join(kinds)} | forward comparisons | gradient comparisons skipped |")
    print("|---|" + "---|" * (len(kinds) + 2))
    for f in files:
        mine = [r for r in rows if r["test"].startswith(f + "::")]
        counts = [sum(r["class"] == k for r in mine) for k in kinds]
        print(f"| {Path(f).name} | {' | '.join(map(str, counts))} | {sum(r['checked'] for r in mine)} "
              f"| {sum(r['grads_skipped'] for r in mine)} |")
    over = sum(r["max_tokens_exceeded"] for r in rows)
    if over:
        print(f"({over} of the skipped tests called graphdelta with more than --max-tokens={args.max_tokens} tokens)")
    for r in rows:
        if r["class"] in ("failed", "passed (no forward comparison)"):
            print(f"{r['class']}: {r['test']}: {r['message']}")


if __name__ == "__main__":
    sys.exit(main())
