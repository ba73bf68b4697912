"""How fast a batch-1 CPU decode step could be: the bytes one step must read, at the rate this
machine reads that many bytes, against ``graphdelta``'s compiled step.

    python benchmarks/decode_limit.py [--config embedded|mid] [--window 128] [--rounds 7]

A batch-1 step does about two flops per weight it reads, so it is bound by reading its weights,
not by arithmetic. This counts the bytes one step reads (``step_bytes``): every weight once,
the MoE experts' stacked weights for the ``num_experts_per_tok`` of ``num_experts`` a token
picks, one row of an embedding not tied to the head, and one sequence's cache for the window
(its key and value rows, and the convolution and recurrent states, read and written). The
*read floor* sums a float32 buffer of the same size (``torch.sum``, the same threads): a
reference rate at which this machine reads that many bytes from where it holds them (from
memory at the mid size, from cache for the tiny model), not a proof that no step can be
faster; it varies between runs as the machine does. It and the compiled step (its replay, as
``common.compare_step_variants`` times it: inductor's function alone, no runner bookkeeping)
take turns over ``--rounds`` rounds of ``--steps`` steps, which one goes first alternating.
The table gives both medians, the read rate each reaches, and ``step_vs_floor``, the floor
over the step: the share of the reference rate the step reaches. The per-token work around
the step (``benchmarks/token_overhead.py``) is not in either figure.
Writes decode_limit_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from common import add_step_arguments, parse_step_arguments, replayed_step, write_results


def weight_bytes(model) -> int:
    """Bytes of the weights one batch-1 step of ``model`` reads (the module docstring's rule);
    tied weights count once."""
    config = getattr(model.config, "text_config", model.config)
    experts, top_k = getattr(config, "num_experts", None), getattr(config, "num_experts_per_tok", None)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    seen, total = set(), 0.0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        share = 1.0
        if p is embedding and not tied:
            share = 1 / p.shape[0]  # one token's row
        elif experts and top_k and p.dim() == 3 and p.shape[0] == experts:
            share = top_k / experts  # the experts a token picks
        total += share * p.numel() * p.element_size()
    return int(total)


def cache_bytes(cache) -> int:
    """Bytes of one sequence's cache a step reads and writes, for a cache whose length is the
    window: the key and value rows read, the conv and recurrent states read and written. One
    row of each pool (a slot's; every pool also holds a sentinel row for padded steps)."""
    size = lambda ts: sum(t[0].numel() * t.element_size() for t in ts)  # noqa: E731
    return size([*cache.k, *cache.v]) + 2 * size([*cache.conv, *cache.state])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=128, help="attention window of the step (its cache length)")
    add_step_arguments(parser, pairs=None)
    parser.set_defaults(rounds=7)

    def check(args) -> None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: must be at least 1")
        if args.window < 2:
            parser.error(f"--window {args.window}: must be at least 2")

    warnings.filterwarnings("ignore", message=".*flash-linear-attention.*")
    args, model = parse_step_arguments(parser, argv, check)
    with torch.no_grad():
        runner, replay, inputs = replayed_step(model, args.window)
        weights, cache = weight_bytes(model), cache_bytes(runner.cache)
        buffer = torch.ones((weights + cache) // 4)
        systems = {"step": lambda: replay(*inputs), "read floor": lambda: buffer.sum()}
        times: dict[str, list[float]] = {name: [] for name in systems}
        for fn in systems.values():
            fn()
        for rnd in range(args.rounds):  # in turns (a b b a ...): this machine's speed drifts
            for name in (list(systems) if rnd % 2 == 0 else list(systems)[::-1]):
                fn = systems[name]
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[name].append((time.perf_counter() - start) / args.steps)
    step_bytes = weights + cache
    floor = statistics.median(times["read floor"])
    rows = []
    for name in systems:
        took = statistics.median(times[name])
        rows.append({"config": args.config, "window": args.window, "what": name, "ms": took * 1e3,
                     "step_MB": step_bytes / 1e6, "weights_MB": weights / 1e6, "GB_per_s": step_bytes / took / 1e9,
                     "step_vs_floor": floor / took})
    for row in rows:
        print(row, flush=True)

    def plot(path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([r["what"] for r in rows], [r["ms"] for r in rows])
        ax.set_ylabel("ms per step")
        ax.set_title(f"{args.config}: batch-1 step, {step_bytes / 1e6:.0f} MB read")
        fig.tight_layout()
        fig.savefig(path)

    command = "python benchmarks/decode_limit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "window", "what", "ms", "step_MB", "weights_MB", "GB_per_s", "step_vs_floor"]
    print(write_results(f"decode_limit_{args.config}", rows, columns, command.strip(), plot))


if __name__ == "__main__":
    main()
