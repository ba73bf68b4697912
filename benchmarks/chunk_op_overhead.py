"""The CPU chunk op at the shipped model's shapes: how much of its time is page faults, and how
much inductor would save by fusing it.

    python benchmarks/chunk_op_overhead.py [--lengths 512 2048] [--rounds 6] [--compile] [--forward]

The op (``lowering/torch_chunk.py``, B=1, H=2, HV=4, K=V=64, steep gates) allocates a few dozen
buffers of 0.25-1 MB per call. Whether each call page-faults them in again depends on glibc's
malloc thresholds, which it moves as the process runs. So the op is timed under three
allocator states of this one process:
- ``untouched``: glibc's own state, measured first (nothing below can restore it);
- ``faulting``: the thresholds fixed at glibc's static defaults (128 KiB mmap, trim and top
  pad), then trimmed: fresh buffers come from the kernel and are faulted in each call;
- ``mapped``: raised (32 MiB mmap threshold, 128 MiB trim threshold, 64 MiB top pad): freed
  memory stays mapped, and a call faults in nothing.
``--compile`` adds the whole op compiled by inductor (fixed shapes, so the scan over chunks is
unrolled: an upper bound on what fusing its elementwise work could save), under ``mapped``.
``--forward`` adds the shipped model's compiled forward (``graphdelta.compile``) under each
state, to see whether the op's faults matter in a forward.

Each round times every variant in turn (the allocator states' order reversed every other
round), each the median of ``--calls`` calls. The table gives the median round, minor page
faults per call, and ``vs_mapped``: the variant's time over the same round's ``mapped`` time
of the eager op (or of the forward), the median of the rounds' ratios (this machine's speed
drifts between rounds, not within one; ``untouched`` is timed once, before the rounds, and has
none). Linux with glibc only. Writes
chunk_op_overhead.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from common import write_results

ROOT = Path(__file__).resolve().parents[1]
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
STATES = {"faulting": (128 << 10, 128 << 10, 128 << 10), "mapped": (32 << 20, 128 << 20, 64 << 20)}


def glibc():
    """glibc's ``mallopt`` and ``malloc_trim``, or exit with the reason."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise SystemExit(f"needs Linux with glibc (this is {platform.system()} {platform.libc_ver()})")
    return ctypes.CDLL(ctypes.util.find_library("c"))


def set_state(libc, name: str) -> None:
    mmap, trim, pad = STATES[name]
    for param, value in ((M_MMAP_THRESHOLD, mmap), (M_TRIM_THRESHOLD, trim), (M_TOP_PAD, pad)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) failed")
    libc.malloc_trim(0)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, calls: int) -> tuple[float, float]:
    """Median seconds of ``calls`` calls of ``fn`` (after 2 untimed), and page faults per call."""
    for _ in range(2):
        fn()
    start_faults, times = faults(), []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (faults() - start_faults) / calls


def op_inputs(T: int, H: int = 2, HV: int = 4, D: int = 64):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, H, D, generator=gen), torch.randn(1, T, H, D, generator=gen)
    v = torch.randn(1, T, HV, D, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, generator=gen)) * 10  # steep, as trained
    beta = torch.rand(1, T, HV, generator=gen)
    return q, k, v, g, beta, D ** -0.5, None, None, True, "kv"


def plot(rows: list[dict], path: Path) -> None:
    """One panel per (op or forward, length): each variant's median round."""
    import matplotlib.pyplot as plt

    panels = sorted({(row["variant"].split(",")[0], row["T"]) for row in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (what, T) in zip(axes[0], panels):
        mine = [row for row in rows if row["T"] == T and row["variant"].split(",")[0] == what]
        ax.barh([row["variant"] for row in mine], [row["ms"] for row in mine])
        ax.set_xlabel("ms per call (median round)")
        ax.set_title(f"{what}, T={T}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per variant and round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="add the op compiled whole by inductor")
    parser.add_argument("--forward", action="store_true", help="add the shipped model's compiled forward")
    args = parser.parse_args(argv)
    for name in ("lengths", "rounds", "calls", "threads"):
        values = getattr(args, name) if name == "lengths" else [getattr(args, name)]
        if min(values) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    libc = glibc()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from lowering.torch_chunk import chunk_gated_delta_rule

    variants: dict[tuple[int, str], object] = {}  # (T, what) -> a call
    for T in args.lengths:
        inputs = op_inputs(T)
        variants[T, "op"] = lambda inputs=inputs: chunk_gated_delta_rule(*inputs)
    if args.compile:
        compiled_op = torch.compile(chunk_gated_delta_rule, dynamic=False, fullgraph=True)
        for T in args.lengths:
            inputs = op_inputs(T)
            want = chunk_gated_delta_rule(*inputs)[0]
            start = time.perf_counter()
            got = compiled_op(*inputs)[0]
            print(f"T={T}: op compiled in {time.perf_counter() - start:.0f} s, "
                  f"largest difference {(got - want).abs().max().item():.2e}", flush=True)
            variants[T, "op, inductor"] = lambda inputs=inputs: compiled_op(*inputs)
    if args.forward:
        import graphdelta

        model = graphdelta.assets.load_default_model()[0]
        compiled = graphdelta.compile(model)
        for T in args.lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
            variants[T, "forward"] = lambda ids=ids: compiled(ids)

    results: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    with torch.no_grad():
        for _ in range(2):  # warm-up: compiles, and lets glibc settle into its own state
            for fn in variants.values():
                fn()
        for (T, what), fn in variants.items():
            if what != "op, inductor":
                results[T, what, "untouched"] = [timed(fn, args.calls)]
        for r in range(args.rounds):
            states = list(STATES) if r % 2 == 0 else list(STATES)[::-1]
            for state in states:
                set_state(libc, state)
                for (T, what), fn in variants.items():
                    if what == "op, inductor" and state != "mapped":
                        continue
                    results.setdefault((T, what, state), []).append(timed(fn, args.calls))
            print(f"round {r + 1}/{args.rounds}", flush=True)

    rows = []
    for (T, what, state), runs in results.items():
        mapped = results[T, "op" if what == "op, inductor" else what, "mapped"]
        ratios = [s / m for (s, _), (m, _) in zip(runs, mapped)] if state != "untouched" else []
        variant = what if what == "op, inductor" else f"{what}, {state}"
        rows.append({"T": T, "variant": variant, "ms": statistics.median(s for s, _ in runs) * 1e3,
                     "faults_per_call": statistics.median(f for _, f in runs),
                     "vs_mapped": statistics.median(ratios) if ratios else "-",
                     "rounds": len(runs)})
        print(rows[-1], flush=True)
    rows.sort(key=lambda row: (row["T"], row["variant"]))

    command = "python benchmarks/chunk_op_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["T", "variant", "ms", "faults_per_call", "vs_mapped", "rounds"]
    print(write_results("chunk_op_overhead", rows, columns, command.strip(), lambda path: plot(rows, path)))


if __name__ == "__main__":
    main()
