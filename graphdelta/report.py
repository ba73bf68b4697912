"""``graphdelta.explain(compiled)``: what ``graphdelta.compile`` did to each layer, and every
graph compiled so far with the reason it was compiled.

From the command line, on a model directory or a config (random weights when only a config):

    python -m graphdelta.report PATH [--lengths 100,300] [--backend aot_eager] [--state-layout kv]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys
import time

from typing import Any, Callable

import torch

SIZE_ONE_GUARDS = (r"^2 <= .*size\(\)\[\d+\]$", r"size mismatch at index \d+\. expected 1,")
LEFTOVER_OPS = ("solve_triangular",)  # what the chunked pipeline leaves when it is not fused


@dataclasses.dataclass
class GraphRecord:
    """One graph Dynamo handed to the backend."""

    index: int
    reason: str  # why it was compiled: first call, or the guard that failed
    nodes: int
    graphdelta_ops: dict[str, int]
    leftovers: dict[str, int]  # ops that a full fusion removes (solve_triangular, cumsum)
    matmuls: int  # matmul / bmm / einsum nodes in linear-attention layers (a fused layer has none)
    inputs: list[str]
    attention: dict[str, int] = dataclasses.field(default_factory=dict)  # SDPA calls: "unmasked" / "masked"
    seconds: float = 0.0
    norm_gates: int = 0  # gated norms given their gate unflattened (passes/norm_gate.py)
    compile_id: str = ""  # Dynamo's "frame/compile" id, as its guard failures name the graph
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # tensor parallel: all_reduce x N


def _guard_text(failure: str) -> str:
    """Dynamo's first line for a failed guard (``guard  # user code  # file.py:N in fn (...)``)
    as the guard, where the model's code made it, and a gloss of the guards users meet most."""
    parts = [p.strip() for p in failure.splitlines()[0].split("  # ")]
    text = parts[0]
    where = [m.group(0) for p in parts[1:] if (m := re.search(r"[\w./-]+\.py:\d+ in \w+", p))]
    if where:
        text += f" (at {where[-1]})"
    if hint := re.search(r"\(HINT: [^)]*\)", failure):
        text += f" {hint.group(0)}"
    if "kwargs" in parts[0]:
        text += ": keyword arguments differ from that graph's"
    elif any(re.search(pattern, parts[0]) for pattern in SIZE_ONE_GUARDS):
        text += ": a size of 1 gets graphs of its own (Dynamo specializes sizes 0 and 1)"
    return text


# Dynamo's restart signals that carry no message, and what each means.
_SILENT = {"TensorifyScalarRestartAnalysis": "Dynamo traces the frame again with Python float inputs as tensors"}


class GraphLog:
    """A backend in front of ``inner`` that records every graph it is asked to compile."""

    def __init__(self, compile_graph: Callable[..., Callable],
                 layer_classes: tuple[type, ...] = (), rewrite: Callable[[torch.fx.GraphModule], int] | None = None):
        self.compile_graph = compile_graph  # the inner backend (``graphdelta.compiler.backend``)
        self.rewrite = rewrite  # a graph rewrite run before it; returns how many sites it changed
        # the linear-attention layers' classes; matmuls elsewhere (rotary embeddings) don't count
        self.layer_classes = layer_classes
        self.graphs: list[GraphRecord] = []
        self.pending = ""
        self.note: Callable[[str], None] | None = None  # progress: told of each graph as it compiles

    def _in_layer(self, node: torch.fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(cls in self.layer_classes for _, cls in stack.values())

    def _reason(self, compile_id: Any) -> str:
        if self.pending:
            reason, self.pending = self.pending, ""
            return reason
        if not self.graphs:
            return "first call"
        # Dynamo logs why each cache entry of the frame missed, prefixed by the entry's compile
        # id ("3/1: ..."), when it recompiles the frame. Only this model's entries count (other
        # compiled models share transformers' code objects); each one's latest failure is why
        # it missed this time.
        ours = {g.compile_id for g in self.graphs}
        frame = f"{compile_id.frame_id}/" if compile_id is not None else None
        latest: dict[str, str] = {}
        for reasons in torch._dynamo.utils.guard_failures.values():
            for r in reasons:
                entry, _, text = str(r).strip().partition(": ")
                if frame and entry.startswith(frame) and entry in ours:
                    latest[entry] = _guard_text(text)
        if not latest:
            return "new code path (different branch or graph break)"
        order = sorted(latest, key=lambda e: int(e.rsplit("/", 1)[1]))
        return "guard failed: " + " | ".join(f"{e}: {latest[e]}" for e in order)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **compile_options: Any) -> Callable:
        """Record ``gm`` and compile it; ``compile_options`` are torch.compile's ``mode`` and
        ``options``, which it hands to a custom backend as keyword arguments."""
        ops: collections.Counter[str] = collections.Counter()
        leftovers: collections.Counter[str] = collections.Counter()
        attention: collections.Counter[str] = collections.Counter()
        collectives: collections.Counter[str] = collections.Counter()
        matmuls = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(getattr(node.target, "__name__", node.target))
            qualified = str(node.target)
            if "graphdelta" in qualified:
                ops[qualified.replace("graphdelta.", "graphdelta::").split("graphdelta::")[-1].split(".")[0]] += 1
            if any(s in name for s in LEFTOVER_OPS):
                leftovers[name] += 1
            if name in ("matmul", "bmm", "mm", "einsum", "__matmul__") and self._in_layer(node):
                matmuls += 1
            if "_c10d_functional" in qualified and "wait_tensor" not in qualified:
                collectives[qualified.split(".")[-2] if qualified.endswith(".default") else name] += 1
            if name == "scaled_dot_product_attention":
                masked = (len(node.args) > 3 and node.args[3] is not None) or node.kwargs.get("attn_mask") is not None
                attention["masked" if masked else "unmasked"] += 1
        inputs = [
            str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs[:6]
        ]
        compile_id = torch._guards.CompileContext.current_compile_id()
        record = GraphRecord(len(self.graphs), self._reason(compile_id), len(gm.graph.nodes), dict(ops),
                             dict(leftovers), matmuls, inputs, dict(attention), compile_id=str(compile_id or ""),
                             collectives=dict(collectives))
        self.graphs.append(record)
        start = time.perf_counter()
        record.norm_gates = self.rewrite(gm) if self.rewrite else 0
        if self.note is not None:
            self.note(f"graph {record.index} ({record.nodes} nodes) in the backend")
        try:
            compiled = self.compile_graph(gm, example_inputs, **compile_options)
        except Exception as e:
            # Dynamo may catch this and trace the frame again (e.g. to specialize a size):
            # the next record then says why.
            message = (str(e).strip().splitlines() or [_SILENT.get(type(e).__name__, "no message")])[0][:160]
            record.reason += f"; backend gave up ({type(e).__name__}: {message})"
            self.pending = f"retrace after the backend gave up on graph {record.index} ({type(e).__name__})"
            raise
        finally:
            record.seconds = time.perf_counter() - start
        return compiled




def explain(compiled) -> str:
    """A plain-text report of ``compiled``: per layer, the regions replaced by graphdelta ops
    (with the structural evidence), the functions kept as written and why, the state layout;
    then the graphs compiled so far and why each was compiled."""
    plan = compiled.plan
    lines = [f"graphdelta: {type(plan.model).__name__}, passes took {getattr(plan, 'seconds', 0.0):.1f} s"]
    tp = getattr(plan.model, "_graphdelta_tp", None)
    if tp is not None:
        lin, att = tp.spec.linear, tp.spec.attention
        lines.append(f"tensor parallel: rank {tp.rank} of {tp.size}; this rank's linear-attention heads "
                     f"{lin.heads} (conv channels {lin.conv_dim}), attention KV heads {att.kv_heads} cached")
    if getattr(compiled, "_lazy", False):
        lines.append(f"probed on the model's own calls: {len(compiled._calls_seen)} kind(s) of call so far")
    for lp in plan.layers:
        if not lp.regions and not lp.fallbacks:
            continue
        lines.append(f"layer {lp.path or '(root)'} ({type(lp.layer.module).__name__})")
        for r in lp.regions:
            lines.append(f"  replaced {r.callee} -> {r.op} ({r.variants} argument variant(s))")
            for e in r.evidence:
                lines.append(f"      {e}")
            for key in sorted(getattr(lp.recognized.get(r.callee), "skipped", ())):
                lines.append(f"      a call with arguments never confirmed ran as written: {key}")
        for callee, why, family in lp.fallbacks:
            lines.append(f"  fallback {callee} [{family}]: {why}")
        if lp.state_layout or lp.layout_reason:
            lines.append(f"  state layout: {lp.state_layout or 'per function'} ({lp.layout_reason})")
        if lp.unprobed and (lp.regions or lp.fallbacks):
            lines.append(f"  never called while probing (run as written if called): {', '.join(lp.unprobed)}")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(plan.counters.items())) or "none"
    lines.append(f"replacements: {counts}")
    graphs = compiled.graph_log.graphs
    lines.append(f"graphs compiled so far: {len(graphs)}")
    for g in graphs:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(g.graphdelta_ops.items())) or "no graphdelta ops"
        left = ", ".join(f"{k} x{v}" for k, v in g.leftovers.items()) or "none"
        attention = ", ".join(f"{v} {k}" for k, v in sorted(g.attention.items())) or "none"
        lines.append(
            f"  graph {g.index} (Dynamo {g.compile_id or '?'}): {g.nodes} nodes, {ops}; left over: {left}; "
            f"{g.matmuls} matmuls in linear-attention layers; attention: {attention}; "
            f"norm gates kept unflattened: {g.norm_gates}; "
            + (f"collectives: {', '.join(f'{k} x{v}' for k, v in sorted(g.collectives.items()))}; "
               if g.collectives else "")
            + f"backend {g.seconds:.1f} s"
        )
        lines.append(f"      compiled because: {g.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="model directory or config.json (random weights if no weights)")
    parser.add_argument("--lengths", default="100,300", help="prompt lengths to run, comma-separated")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--state-layout", default="auto", choices=("auto", "kv", "vk"))
    args = parser.parse_args(argv)

    import os

    from graphdelta.assets import auto_model_class, load_checkpoint, load_config

    config = load_config(args.path)  # offline, no checkpoint code
    auto = auto_model_class(config)
    has_weights = os.path.isdir(args.path) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(args.path))
    if has_weights:
        model = load_checkpoint(args.path, torch.float32, strict=True)
    else:
        model = auto.from_config(config)
    model = model.float().eval()
    compiled = __import__("graphdelta").compile(model, backend=args.backend, state_layout=args.state_layout)
    vocab = config.get_text_config().vocab_size
    with torch.no_grad():
        for length in (int(x) for x in args.lengths.split(",")):
            compiled(input_ids=torch.randint(0, vocab, (1, length)), use_cache=False)
    print(explain(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
