"""Compiled CPU decode steps of a few rows: matmuls as MKL's GEMM against inductor's reductions.

    python benchmarks/step_reductions.py [--config embedded|mid] [--batches 2 4] [--pairs 3]

A runner's compiled CPU step computes its matmuls of up to ``_LIFTED_ROWS`` rows (batch x
tokens) as inductor's reductions (``Runner._reduction_rows``). This times the step of each
batch compiled both ways: "gemm" with the row limit at 1 (every matmul of 2 rows and up goes to
MKL), "reductions" with the runner's own choice. Both compile the same frame, and a second
runner of the same shapes and compile options would reuse the first one's compiled entry: the
gemm runner compiles with its row limit in its options, which keeps the two entries apart.
Each pair compiles both after a Dynamo reset, with inductor's caches off (which one compiles
first alternates between pairs), then times them in turns (a b b a ...: a drift of the machine
falls on both), each ``Runner._run`` (the step alone, guards evaluated for both) over
``--rounds`` rounds of ``--steps`` steps. The table gives, per batch, each variant's median
round over all pairs, the speedup (the median over the pairs of the ratio of their medians:
the machine's speed can drift between pairs, not within one), and each pair's ratio and
medians (gemm/reductions ms). Batches of more than ``_LIFTED_ROWS`` rows (and batch 1)
compile the same way in both: a control. Writes
step_reductions_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import add_step_arguments, paired_bars, parse_step_arguments, write_results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    add_step_arguments(parser, pairs=3)

    def check(args) -> None:
        if any(b < 1 for b in args.batches):
            parser.error(f"--batches {args.batches}: each must be at least 1")

    args, model = parse_step_arguments(parser, argv, check)

    from graphdelta.runtime.runner import Runner, _cpu_step_options

    steps = args.steps

    def time_pair(batch: int, first: str) -> tuple[dict[str, list[float]], int]:
        """ms per step of each round of ``batch``'s step compiled both ways (``first`` first,
        after a Dynamo reset) and timed in turns (a b b a ...), and the row limit the runner
        chose."""
        torch._dynamo.reset()
        order = (first, "reductions" if first == "gemm" else "gemm")
        runners = {}
        tokens, slots = torch.full((batch, 1), 4), torch.arange(batch)
        starts = torch.full((batch,), 10)  # free slots' rows: scratch state
        for variant in order:
            runner = Runner(model, max_seqs=batch, max_len=64, compile_steps=True, skip_guards=False,
                            max_batch=batch)
            if variant == "gemm":
                options = _cpu_step_options()
                options["post_grad_fusion_options"]["decompose_mm_pass"]["cpu_max_first_dimension_decomposition"] = 1
                runner._forward = torch.compile(runner.forward, dynamic=False, options=options)
                runner._reduction_rows = lambda rows: 1
            runner._run(tokens, slots, starts, 64, False)  # compiles
            runners[variant] = runner
        times: dict[str, list[float]] = {"gemm": [], "reductions": []}
        for i in range(2 * args.rounds):
            variant = order[(i + i // 2) % 2]
            start = time.perf_counter()
            for _ in range(steps):
                runners[variant]._run(tokens, slots, starts, 64, False)
            times[variant].append((time.perf_counter() - start) / steps * 1e3)
        return times, runners["reductions"]._reduction_rows(batch)

    rows = []
    with (torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        for batch in args.batches:
            times: dict[str, list[float]] = {"gemm": [], "reductions": []}
            ratios, pair_ms = [], []
            for pair in range(args.pairs):
                got, limit = time_pair(batch, ("gemm", "reductions")[pair % 2])
                for variant in times:
                    times[variant] += got[variant]
                g, r = statistics.median(got["gemm"]), statistics.median(got["reductions"])
                ratios.append(g / r)
                pair_ms.append(f"{g:.3f}/{r:.3f}")
                print(f"batch {batch} pair {pair}: gemm {g:.3f} ms, reductions {r:.3f} ms per step", flush=True)
            gemm, reductions = (statistics.median(times[v]) for v in ("gemm", "reductions"))
            rows.append({"config": args.config, "batch": batch, "row_limit": limit,
                         "gemm_ms": gemm, "reductions_ms": reductions, "speedup": statistics.median(ratios),
                         "pair_speedups": " ".join(f"{r:.2f}" for r in ratios),
                         "pair_ms": " ".join(pair_ms)})
    for row in rows:
        print(row, flush=True)

    plot = paired_bars(rows, {"gemm_ms": "GEMM (row limit 1)", "reductions_ms": "reductions (runner)"},
                       lambda r: f"batch {r['batch']}", f"{args.config}: compiled CPU decode step")

    command = "python benchmarks/step_reductions.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "batch", "row_limit", "gemm_ms", "reductions_ms", "speedup", "pair_speedups", "pair_ms"]
    print(write_results(f"step_reductions_{args.config}", rows, columns, command.strip(), plot))


if __name__ == "__main__":
    main()
