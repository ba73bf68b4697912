"""Compiled CPU decode steps: attention through SDPA against attention as reductions.

    python benchmarks/step_attention.py [--config embedded|mid] [--windows 64 512] [--pairs 2]

A compiled CPU decode step writes its attention as reductions (``forward.one_query_attention``),
which inductor fuses into the step's C++; before, it called ``F.scaled_dot_product_attention``,
which stays an ATen call between two generated kernels. This compiles the batch-1 decode step
of each attention window both ways, "sdpa" (``one_query_attention`` swapped for the SDPA call
while that runner compiles) and "reductions" (the runtime as it is), and checks that their
logits agree (within ``AGREE``; else it stops before timing). Each pair compiles both after a
Dynamo reset (which one first alternates between pairs) and times them in turns (a b b a ...),
each through its replay (``Replay``: inductor's function called directly, the step alone
without the runner's checks) over ``--rounds`` rounds of ``--steps`` steps. The table gives,
per window, each variant's median round over all pairs, the speedup (the median over the pairs
of the ratio of their medians) and each pair's ratio.
Writes step_attention_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import add_step_arguments, paired_bars, parse_step_arguments, write_results


AGREE = 1e-4  # largest difference of the two steps' logits (float32) that counts as the same step


def sdpa_attention(q, keys, values, mask, scale):
    """The runtime's attention before: ``F.scaled_dot_product_attention`` (same arguments as
    ``one_query_attention``)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask.unsqueeze(1),
        scale=scale, enable_gqa=q.shape[2] != keys.shape[1])
    return o.transpose(1, 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 512])
    add_step_arguments(parser, pairs=2)

    def check(args) -> None:
        if any(w < 2 for w in args.windows):
            parser.error(f"--windows {args.windows}: each must be at least 2")

    args, model = parse_step_arguments(parser, argv, check)

    from graphdelta.runtime import forward
    from graphdelta.runtime.runner import Runner

    steps = args.steps
    reductions = forward.one_query_attention

    def time_pair(window: int, first: str) -> tuple[dict[str, list[float]], float]:
        """ms per step of each round of the window's step compiled both ways (``first`` first,
        after a Dynamo reset) and timed in turns, and the largest difference of their logits."""
        torch._dynamo.reset()
        order = (first, "reductions" if first == "sdpa" else "sdpa")
        tokens, slots, starts = torch.full((1, 1), 4), torch.zeros(1, dtype=torch.long), torch.full((1,), window - 1)
        replays, logits = {}, {}
        for variant in order:
            runner = Runner(model, max_seqs=1, max_len=window, compile_steps=True)
            forward.one_query_attention = sdpa_attention if variant == "sdpa" else reductions
            try:
                runner.prepare(1, window, window)  # compiles the step of this window
            finally:
                forward.one_query_attention = reductions
            if len(runner._replays) != 1:
                raise RuntimeError(f"the {variant} step of window {window} is not replayed: nothing to time")
            replays[variant] = next(iter(runner._replays.values()))
            logits[variant] = replays[variant](tokens, slots, starts).clone()
        diff = float((logits["sdpa"] - logits["reductions"]).abs().max())
        if not diff <= AGREE:
            raise RuntimeError(f"window {window}: the two steps' logits differ by {diff:.3g} (> {AGREE}): not timed")
        times: dict[str, list[float]] = {"sdpa": [], "reductions": []}
        for i in range(2 * args.rounds):
            variant = order[(i + i // 2) % 2]
            replay = replays[variant]
            start = time.perf_counter()
            for _ in range(steps):
                replay(tokens, slots, starts)
            times[variant].append((time.perf_counter() - start) / steps * 1e3)
        return times, diff

    rows = []
    with (torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        for window in args.windows:
            times: dict[str, list[float]] = {"sdpa": [], "reductions": []}
            ratios, diffs = [], []
            for pair in range(args.pairs):
                got, diff = time_pair(window, ("sdpa", "reductions")[pair % 2])
                for variant in times:
                    times[variant] += got[variant]
                s, r = statistics.median(got["sdpa"]), statistics.median(got["reductions"])
                ratios.append(s / r)
                diffs.append(diff)
                print(f"window {window} pair {pair}: sdpa {s:.3f} ms, reductions {r:.3f} ms per step, "
                      f"logits differ by {diff:.2e}", flush=True)
            rows.append({"config": args.config, "window": window,
                         "sdpa_ms": statistics.median(times["sdpa"]),
                         "reductions_ms": statistics.median(times["reductions"]),
                         "speedup": statistics.median(ratios),
                         "pair_speedups": " ".join(f"{r:.2f}" for r in ratios),
                         "max_logit_diff": max(diffs)})
    for row in rows:
        print(row, flush=True)

    plot = paired_bars(rows, {"sdpa_ms": "SDPA call", "reductions_ms": "reductions (runtime)"},
                       lambda r: f"window {r['window']}", f"{args.config}: compiled CPU decode step, batch 1")

    command = "python benchmarks/step_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "window", "sdpa_ms", "reductions_ms", "speedup", "pair_speedups", "max_logit_diff"]
    print(write_results(f"step_attention_{args.config}", rows, columns, command.strip(), plot))


if __name__ == "__main__":
    main()
