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


def add_step_arguments(parser, pairs: int) -> None:
    """The options of a benchmark that compiles a decode step two ways and times them in turns:
    ``--config`` (the shipped tiny model or the mid-size one), ``--pairs``, ``--rounds``,
    ``--steps`` and ``--threads``; ``parse_step_arguments`` reads them."""
    parser.add_argument("--config", default="embedded", choices=["embedded", "mid"])
    parser.add_argument("--pairs", type=int, default=pairs, help="compiles of each variant per shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: 200 tiny, 20 mid)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def parse_step_arguments(parser, argv=None, check: Callable = lambda args: None):
    """``add_step_arguments``' options, checked (with ``check(args)`` for the benchmark's own,
    before anything slow), with the torch threads set and ``args.steps`` filled in: returns
    (args, model), the model of ``--config`` (``embedded``: the shipped trained Qwen3-Next;
    ``mid``: a random-weight one of hidden 1024 and 8 layers)."""
    import sys

    args = parser.parse_args(argv)
    for name in ("pairs", "rounds", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be at least 1")
    check(args)
    torch.set_num_threads(args.threads)
    args.steps = args.steps or (20 if args.config == "mid" else 200)
    if args.config == "mid":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import models

        return args, models.build("qwen3_next", hidden=1024, layers=8)
    import graphdelta

    return args, graphdelta.assets.load_default_model()[0]


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
