"""How fast a CPU prefill could be: the model's projections' matmuls timed alone against
transformers eager's and ``graphdelta.compile``'s whole forward.

    python benchmarks/prefill_limit.py [--config embedded|mid] [--length 512] [--rounds 5]

Where a prefill is matmul-bound, no fusion of the rest makes it faster than its matmuls. This
records every ``aten::mm`` / ``aten::addmm`` of one eager forward (the projections, the MoE
experts' groups and the head: the same products ``graphdelta.compile`` leaves to the same ATen
call), times each distinct shape alone (``torch.mm`` of the activation and a transposed weight,
as ``F.linear`` calls it) and runs them back to back, as many of each as a forward has: the
*matmul floor*. It, eager and the compiled forward take turns over ``--rounds`` rounds. The table gives each
forward's median, the floor, the time left beside it, and ``bound_vs_eager``: eager's forward
over the floor, the most any system doing the same matmuls at this machine's rate can gain on
eager. The chunked delta rule's own small batched matmuls count as "the rest".
Writes prefill_limit_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

from common import config_model, write_results

MATMULS = ("aten::mm", "aten::addmm")


def matmul_shapes(model, ids) -> collections.Counter:
    """(M, K, N) -> calls, of the matmuls of one eager forward of ``ids``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(ids)
    shapes: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.name in MATMULS:
            a, b = event.input_shapes[1:3] if event.name == "aten::addmm" else event.input_shapes[:2]
            shapes[a[0], a[1], b[1]] += 1
    return shapes


def matmul_floor(shapes: collections.Counter) -> Callable[[], None]:
    """A function that runs the forward's matmuls back to back: for each (M, K, N), its calls of
    ``torch.mm`` of an [M, K] activation by a transposed [N, K] weight, as a linear layer."""
    operands = [(torch.randn(M, K), torch.randn(N, K).t(), calls) for (M, K, N), calls in shapes.items()]

    def run() -> None:
        for a, w, calls in operands:
            for _ in range(calls):
                torch.mm(a, w)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded", choices=["embedded", "mid"])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    for name in ("length", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*flash-linear-attention.*")

    import graphdelta

    model = config_model(args.config)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    compiled = graphdelta.compile(model, warn=False)

    shapes = matmul_shapes(model, ids)
    flops = sum(calls * 2 * M * K * N for (M, K, N), calls in shapes.items())
    floor_fn = matmul_floor(shapes)
    systems = {"eager": lambda: model(ids), "graphdelta": lambda: compiled(ids), "floor": floor_fn}
    times: dict[str, list[float]] = {name: [] for name in systems}
    with torch.no_grad():
        for fn in systems.values():  # warm: graphdelta compiles here
            fn()
            fn()
        for _ in range(args.rounds):  # in turns: this machine's speed drifts over minutes
            for name, fn in systems.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    eager, floor = statistics.median(times["eager"]), statistics.median(times["floor"])
    rows = []
    for name in ("eager", "graphdelta"):
        forward = statistics.median(times[name])
        rows.append({"config": args.config, "tokens": args.length, "system": name, "forward_ms": forward * 1e3,
                     "matmul_floor_ms": floor * 1e3, "rest_ms": (forward - floor) * 1e3,
                     "vs_eager": eager / forward, "bound_vs_eager": eager / floor})
    print(f"{sum(shapes.values())} matmuls of {len(shapes)} shapes per forward, {flops / 1e9:.1f} GFLOP, "
          f"{flops / floor / 1e9:.0f} GFLOP/s timed alone", flush=True)
    for row in rows:
        print(row, flush=True)

    def plot(path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = [r["system"] for r in rows]
        ax.bar(names, [r["matmul_floor_ms"] for r in rows], label="matmuls timed alone")
        ax.bar(names, [r["rest_ms"] for r in rows], bottom=[r["matmul_floor_ms"] for r in rows], label="the rest")
        ax.set_ylabel("ms per forward")
        ax.set_title(f"{args.config}: prefill of {args.length} tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)

    command = "python benchmarks/prefill_limit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "tokens", "system", "forward_ms", "matmul_floor_ms", "rest_ms", "vs_eager", "bound_vs_eager"]
    print(write_results(f"prefill_limit_{args.config}", rows, columns, command.strip(), plot))


if __name__ == "__main__":
    main()
