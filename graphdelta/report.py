"""``graphdelta.explain(compiled)``: what ``graphdelta.compile`` did to each layer, and every
graph compiled so far with the reason it was compiled.

From the command line, on a model directory or a config (random weights when only a config):

    python -m graphdelta.report PATH [--lengths 100,300] [--backend aot_eager] [--state-layout kv]
"""
from __future__ import annotations

import argparse
import sys

from graphdelta.compiler import CompiledModel


def explain(compiled: CompiledModel) -> str:
    """A plain-text report of ``compiled``: per layer, the regions replaced by graphdelta ops
    (with the structural evidence), the functions kept as written and why, the state layout;
    then the graphs compiled so far and why each was compiled."""
    plan = compiled.plan
    lines = [f"graphdelta: {type(plan.model).__name__}, passes took {getattr(plan, 'seconds', 0.0):.1f} s"]
    for lp in plan.layers:
        if not lp.regions and not lp.fallbacks:
            continue
        lines.append(f"layer {lp.path} ({type(lp.layer.module).__name__})")
        for r in lp.regions:
            lines.append(f"  replaced {r.callee} -> {r.op} ({r.variants} argument variant(s))")
            for e in r.evidence:
                lines.append(f"      {e}")
        for callee, why, family in lp.fallbacks:
            lines.append(f"  fallback {callee} [{family}]: {why}")
        if lp.state_layout:
            lines.append(f"  state layout: {lp.state_layout} ({lp.layout_reason})")
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
            f"norm gates kept unflattened: {g.norm_gates}; backend {g.seconds:.1f} s"
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
