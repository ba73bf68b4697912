"""What atomic steps cost the runtime per step (issue 19): the step transaction's bookkeeping
alone (host-side slot check, begin / commit, the ``Writes`` of the held-back state writes), next
to a whole decode step, eager and compiled, on the tiny Qwen3-Next of benchmarks/decode.py.

    python benchmarks/atomic_steps.py [--batches 1 16] [--steps 200] [--skip-compiled]

Holding the new conv and recurrent states until after the model's head copies nothing more: the
same ``index_copy_`` calls run, later. So the bookkeeping is the whole per-step cost; a step's own
time is given to compare it with. Writes atomic_steps.{json,md} to the results folder
(``common.results_dir()``). Not a timed test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import write_results
from decode import build
from graphdelta.runtime import Runner
from graphdelta.runtime.forward import Writes


def bookkeeping_us(runner: Runner, slots: list[int], calls: int = 20000) -> float:
    """Best of 5: microseconds per step of the transaction around a step that writes nothing."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            checked = runner._slots(slots)
            writes = Writes()
            runner._atomic(checked, [1] * len(checked), "decode", writes, writes.apply)
            for slot in checked:
                runner.cache.lengths[slot] -= 1
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def step_ms(runner: Runner, slots: list[int], steps: int) -> tuple[float, float]:
    """Median and best decode step in ms (the slots are cut back to their prompt when full)."""
    prompt = runner.cache.length(slots[0])
    snaps = [runner.cache.snapshot(s) for s in slots]
    times = []
    for i in range(steps + 5):
        if runner.cache.length(slots[0]) + 1 > runner.cache.max_len:
            for snap in snaps:
                runner.cache.restore(snap)
        start = time.perf_counter()
        runner.decode(slots, [i % 500] * len(slots))
        times.append(time.perf_counter() - start)
    assert runner.cache.length(slots[0]) > prompt
    times = times[5:]
    return statistics.median(times) * 1e3, min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-compiled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build("tiny")
    rows = []
    for batch in args.batches:
        row = {"batch": batch}
        for compiled in (False,) if args.skip_compiled else (False, True):
            runner = Runner(model, max_seqs=batch, max_len=256, compile_steps=compiled)
            slots = [runner.allocate() for _ in range(batch)]
            runner.prefill(slots, [list(range(1, 33))] * batch)
            median, best = step_ms(runner, slots, args.steps)
            kind = "compiled" if compiled else "eager"
            row[f"{kind} step ms (median)"], row[f"{kind} step ms (best)"] = round(median, 3), round(best, 3)
            if not compiled:
                row["transaction us"] = round(bookkeeping_us(runner, slots), 1)
        rows.append(row)
        print(row, flush=True)
    columns = list(rows[0])
    md = write_results("atomic_steps", rows, columns, "python benchmarks/atomic_steps.py " + " ".join(sys.argv[1:]))
    print(md)


if __name__ == "__main__":
    main()
