"""Shared benchmark plumbing: timing by median of repeats, the run's environment, and the
JSON / Markdown / PNG outputs every benchmark writes."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from graphdelta.cli import default_bench_out  # noqa: E402



def results_dir() -> Path:
    """Where outputs go: GRAPHDELTA_BENCH_RESULTS (``graphdelta bench --out``, read at each
    write), else outside the checkout: benchmarks/results/ holds the measurements
    BENCHMARKS.md cites, copied there on purpose."""
    return Path(os.environ.get("GRAPHDELTA_BENCH_RESULTS") or default_bench_out())


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for ``device``'s queued work: ``torch.cuda.synchronize`` on CUDA, else nothing."""
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def add_device_arguments(parser) -> None:
    """``--device`` (default: the GPU if there is one) and ``--dtype`` of a model benchmark."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on a GPU, float32 on CPU")


def model_dtype(args) -> torch.dtype:
    """The dtype ``add_device_arguments``' options ask for."""
    return getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))


def add_step_arguments(parser, pairs: int | None) -> None:
    """The options of a benchmark that compiles a decode step and times it in turns (two ways,
    or against another reference): ``--config`` (the shipped tiny model or the mid-size one),
    ``--pairs`` (unless ``pairs`` is None: one compile only), ``--rounds``, ``--steps`` and
    ``--threads``; ``parse_step_arguments`` reads them."""
    parser.add_argument("--config", default="embedded", choices=["embedded", "mid"])
    if pairs is not None:
        parser.add_argument("--pairs", type=int, default=pairs, help="compiles of each variant per shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: 200 tiny, 20 mid)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def parse_step_arguments(parser, argv=None, check: Callable = lambda args: None):
    """``add_step_arguments``' options, checked (with ``check(args)`` for the benchmark's own,
    before anything slow), with the torch threads set and ``args.steps`` filled in: returns
    (args, model), the model of ``--config`` (``config_model``)."""
    args = parser.parse_args(argv)
    for name in ("pairs", "rounds", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be at least 1")
    check(args)
    torch.set_num_threads(args.threads)
    args.steps = args.steps or (20 if args.config == "mid" else 200)
    return args, config_model(args.config)


def config_model(config: str):
    """The model of a ``--config``: ``embedded``, the shipped trained Qwen3-Next; ``mid``, a
    random-weight one of hidden 1024 and 8 layers."""
    if config == "mid":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import models

        return models.build("qwen3_next", hidden=1024, layers=8)
    import graphdelta

    return graphdelta.assets.load_default_model()[0]


def parse_window_step_arguments(doc: str, argv=None):
    """The options of a ``compare_step_variants`` benchmark (``--windows`` and
    ``add_step_arguments``'), checked: returns (args, model) as ``parse_step_arguments``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 512])
    add_step_arguments(parser, pairs=2)

    def check(args) -> None:
        if any(w < 2 for w in args.windows):
            parser.error(f"--windows {args.windows}: each must be at least 2")

    return parse_step_arguments(parser, argv, check)


def compare_step_variants(args, model, windows: list[int], variants: dict[str, Callable], script: str,
                          title: str, agree: float = 1e-4, argv=None) -> str:
    """Compile the batch-1 decode step of each attention window two ways and time them in turns.

    ``variants`` maps each variant's name to a function returning the context its runner is made
    and compiled under (two entries; the runtime as it is should be the second). Each of
    ``args.pairs`` pairs compiles both after a Dynamo reset (which one first alternates between
    pairs), with inductor's caches off, checks that their logits agree within ``agree`` (else it
    stops before timing), then times each step's replay (``Replay``: inductor's function called
    directly, without the runner's checks) in turns (a b b a ...) over ``args.rounds`` rounds of
    ``args.steps`` steps. A row per window: each variant's median round over all pairs (ms per
    step), the speedup of the second over the first (the median over the pairs of the ratio of
    their medians) and each pair's ratio. Writes ``<name>.{json,md,png}``; returns the Markdown.
    """
    import sys

    a, b = variants
    steps = args.steps

    def time_pair(window: int, order: tuple[str, str]) -> tuple[dict[str, list[float]], float]:
        torch._dynamo.reset()
        replays, logits = {}, {}
        for variant in order:
            with variants[variant]():
                _, replays[variant], (tokens, slots, starts) = replayed_step(model, window, variant)
            logits[variant] = replays[variant](tokens, slots, starts).clone()
        if replays[a].fn is replays[b].fn:
            raise RuntimeError(f"the two variants share one compiled step (window {window}): nothing to compare")
        diff = float((logits[a] - logits[b]).abs().max())
        if not diff <= agree:
            raise RuntimeError(f"window {window}: the two steps' logits differ by {diff:.3g} (> {agree}): not timed")
        times: dict[str, list[float]] = {a: [], b: []}
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
        for window in windows:
            times: dict[str, list[float]] = {a: [], b: []}
            ratios, diffs = [], []
            for pair in range(args.pairs):
                got, diff = time_pair(window, (a, b) if pair % 2 == 0 else (b, a))
                for variant in times:
                    times[variant] += got[variant]
                ma, mb = statistics.median(got[a]), statistics.median(got[b])
                ratios.append(ma / mb)
                diffs.append(diff)
                print(f"window {window} pair {pair}: {a} {ma:.3f} ms, {b} {mb:.3f} ms per step, "
                      f"logits differ by {diff:.2e}", flush=True)
            rows.append({"config": args.config, "window": window,
                         f"{a}_ms": statistics.median(times[a]), f"{b}_ms": statistics.median(times[b]),
                         "speedup": statistics.median(ratios),
                         "pair_speedups": " ".join(f"{r:.2f}" for r in ratios),
                         "max_logit_diff": max(diffs)})
    for row in rows:
        print(row, flush=True)
    plot = paired_bars(rows, {f"{a}_ms": a, f"{b}_ms": f"{b} (runtime)"}, lambda r: f"window {r['window']}",
                       f"{args.config}: {title}")
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "window", f"{a}_ms", f"{b}_ms", "speedup", "pair_speedups", "max_logit_diff"]
    return write_results(f"{Path(script).stem}_{args.config}", rows, columns, command.strip(), plot)


def replayed_step(model, window: int, what: str = "") -> tuple:
    """A runner of one sequence of ``window`` positions with the batch-1 decode step of that
    window compiled, the step's ``Replay`` (inductor's function called directly) and inputs
    for it (a token, slot 0, the window's last position); raises if the step is not replayed
    (``what`` names it in the message)."""
    from graphdelta.runtime.runner import Runner

    runner = Runner(model, max_seqs=1, max_len=window, compile_steps=True)
    runner.prepare(1, window, window)  # compiles the step of this window
    if len(runner._replays) != 1:
        raise RuntimeError(f"the {what + ' ' if what else ''}step of window {window} is not replayed: nothing to time")
    inputs = torch.full((1, 1), 4), torch.zeros(1, dtype=torch.long), torch.full((1,), window - 1)
    return runner, next(iter(runner._replays.values())), inputs


def paired_bars(rows: list[dict], bars: dict[str, str], label: Callable[[dict], str], title: str) -> Callable:
    """A ``write_results`` plot of two variants per row: ``bars`` maps each row key (ms per
    step) to its legend, ``label(row)`` names the row's group."""
    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        x = range(len(rows))
        for offset, (key, legend) in zip((-0.2, 0.2), bars.items()):
            ax.bar([i + offset for i in x], [r[key] for r in rows], 0.4, label=legend)
        ax.set_xticks(list(x), [label(r) for r in rows])
        ax.set_ylabel("ms per compiled step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)

    return plot


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronized when a GPU is in use)."""
    sync = synchronizer("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_model() -> str:
    """The CPU's model name (CPU timings differ by vendor: MKL's GEMV runs at half inductor's
    reduction rate on AMD EPYC), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown"


def environment() -> dict:
    import transformers
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    try:  # transformers' GDN layers call fla's kernels when it is installed
        from importlib.metadata import version

        env["fla"] = version("fla-core")
    except Exception:
        pass
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], columns: list[str], command: str,
                  plot: Callable[[Path], None] | None = None) -> str:
    """Write ``<results_dir()>/<name>.json``, ``.md`` (and ``.png`` via ``plot``); return the Markdown."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    (folder / f"{name}.json").write_text(json.dumps({"env": env, "command": command, "rows": rows}, indent=2))
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    md = f"`{command}`\n\n{header}\n\n{markdown_table(rows, columns)}\n"
    (folder / f"{name}.md").write_text(md)
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            plot(folder / f"{name}.png")
        except ImportError:
            print("matplotlib is not installed: no plot written")
    print(f"wrote {folder / name}.json, .md")
    return md
