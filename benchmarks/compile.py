"""Prefill time and compile time of a hybrid model: transformers eager, ``torch.compile(model)``
(default settings) and ``graphdelta.compile(model)``, side by side.

For each mode, in its own process (so that Dynamo caches and threads do not leak between
modes), on CPU or, with ``--device cuda``, on a GPU (bf16 by default there, calls timed to
their completion):

1. compile time: the first call at each of ``--compile-lengths`` (different chunk-count
   classes) minus a second, warm call at the same length, summed;
2. prefill time: the median of ``--reps`` warm calls at each of ``--prefill`` lengths (a
   compile these lengths trigger is not counted);
3. the largest relative logit error against eager.

Writes ``compile_<family>_<config>.json`` (into ``common.results_dir()``) and ``.md`` (and ``.png`` with
matplotlib); ``_cuda`` is added to GPU runs' names.

    python benchmarks/compile.py --config tiny
    python benchmarks/compile.py --config mid --prefill 512 --timeout 1800
    python benchmarks/compile.py --config realistic --device cuda --prefill 2048,8192
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_arguments, model_dtype, results_dir, synchronizer  # noqa: E402

CONFIGS = {"tiny": dict(hidden=128, layers=4), "mid": dict(hidden=1024, layers=8),
           "realistic": dict(realistic=True, layers=8)}  # Qwen3-Next's dimensions (tests/models.py)
MODES = ("eager", "torch_compile", "graphdelta")


def _build(family: str, config: str, mode: str, device: str, dtype: torch.dtype):
    import models

    model = models.build(family, **CONFIGS[config], device=device, dtype=dtype)
    if mode == "eager":
        return model, model
    if mode == "torch_compile":
        return model, torch.compile(model)
    import graphdelta

    return model, graphdelta.compile(model)


@torch.no_grad()
def _call(fn, model, length: int, seed: int = 0) -> tuple[float, torch.Tensor]:
    """(seconds, logits) of ``fn`` (``model`` or a compiled form of it) on random tokens."""
    import models

    ids = models.tokens(length, seed=seed, vocab=model.config.vocab_size).to(model.device)
    sync = synchronizer(ids.device.type)
    sync()
    start = time.perf_counter()
    logits = fn(ids, use_cache=False).logits
    sync()
    return time.perf_counter() - start, logits.float()


def run_mode(args, mode: str) -> dict:
    """Measure one mode in this process; results are written after every step."""
    torch.manual_seed(0)
    out_path = Path(args.partial)
    result: dict = {"mode": mode, "compile_s": {}, "prefill_s": {}, "rel_err": 0.0}

    def save():
        out_path.write_text(json.dumps(result))

    model, fn = _build(args.family, args.config, mode, args.device, model_dtype(args))
    start = time.perf_counter()
    passes_s = fn.plan.seconds if mode == "graphdelta" else 0.0  # recognition, counted as compile time
    result["passes_s"] = passes_s
    for length in args.compile_lengths:
        first, _ = _call(fn, model, length)
        warm, logits = _call(fn, model, length)
        result["compile_s"][length] = max(0.0, first - warm)
        if mode != "eager":
            _, ref = _call(model, model, length)
            result["rel_err"] = max(result["rel_err"], ((logits - ref).abs().max() / ref.abs().max()).item())
        save()
    result["compile_total_s"] = sum(result["compile_s"].values()) + passes_s
    for length in args.prefill:
        _call(fn, model, length)  # compile (if the mode needs it) and warm up
        times = [_call(fn, model, length, seed=r)[0] for r in range(args.reps)]
        result["prefill_s"][length] = statistics.median(times)
        save()
    if mode == "graphdelta":
        result["graphs"] = len(fn.graph_log.graphs)
    elif mode == "torch_compile":
        result["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    result["wall_s"] = time.perf_counter() - start
    save()
    return result


def table(results: list[dict], args) -> str:
    by = {r["mode"]: r for r in results}
    lines = [
        f"family {args.family}, config {args.config} {CONFIGS[args.config]}, {args.device}, "
        f"{model_dtype(args)}, CPU threads {torch.get_num_threads()}, torch {torch.__version__}",
        "",
        "| mode | " + " | ".join(f"prefill {n} (s)" for n in args.prefill)
        + f" | compile, lengths {','.join(map(str, args.compile_lengths))} (s) | graphs | max rel err |",
        "|---" * (len(args.prefill) + 4) + "|",
    ]
    for mode in MODES:
        r = by.get(mode)
        if r is None:
            continue
        cells = [f"{r['prefill_s'][str(n)]:.3f}" if str(n) in r["prefill_s"] else r.get("error", "-") for n in args.prefill]
        total = r.get("compile_total_s")
        lines.append(
            f"| {mode} | " + " | ".join(cells)
            + f" | {'-' if total is None else f'{total:.1f}'} | {r.get('graphs', '-')} | {r.get('rel_err', 0):.1e} |"
        )
    g, t, e = by.get("graphdelta", {}), by.get("torch_compile", {}), by.get("eager", {})
    lines.append("")
    for n in args.prefill:
        n = str(n)
        if n in g.get("prefill_s", {}):
            parts = []
            for name, other in (("torch.compile", t), ("eager", e)):
                if n in other.get("prefill_s", {}):
                    parts.append(f"{other['prefill_s'][n] / g['prefill_s'][n]:.2f}x vs {name}")
            lines.append(f"- prefill {n}: graphdelta " + ", ".join(parts))
    if g.get("compile_total_s") and t.get("compile_total_s"):
        lines.append(f"- compile total: graphdelta {g['compile_total_s'] / t['compile_total_s']:.2f} of torch.compile's")
    return "\n".join(lines)


def plot(results: list[dict], args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        xs = [int(n) for n in r["prefill_s"]]
        axes[0].plot(xs, list(r["prefill_s"].values()), marker="o", label=r["mode"])
    axes[0].set(xlabel="prompt length", ylabel="prefill (s)", title="prefill", xscale="log", yscale="log")
    axes[0].legend()
    modes = [r["mode"] for r in results if r.get("compile_total_s") is not None]
    axes[1].bar(modes, [r["compile_total_s"] for r in results if r.get("compile_total_s") is not None])
    axes[1].set(ylabel="s", title=f"compile, {len(args.compile_lengths)} lengths")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen3_next")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    # chunk counts 2, 4, 6, 8 at chunk size 64
    parser.add_argument("--compile-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[100, 250, 350, 500])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per mode")
    parser.add_argument("--warm-caches", action="store_true", help="let inductor reuse kernels it cached on disk")
    add_device_arguments(parser)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--partial", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.only:
        run_mode(args, args.only)
        return 0

    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        partial = folder / f".partial_{mode}.json"
        partial.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--only", mode, "--partial", str(partial), "--family", args.family,
               "--config", args.config, "--prefill", ",".join(map(str, args.prefill)),
               "--compile-lengths", ",".join(map(str, args.compile_lengths)), "--reps", str(args.reps),
               "--device", args.device, *(["--dtype", args.dtype] if args.dtype else [])]
        print(f"[{time.strftime('%H:%M:%S')}] {mode} ...", flush=True)
        try:
            # Cold compiles for every mode: inductor's on-disk caches would otherwise serve a
            # mode the kernels an earlier run compiled.
            env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0" if args.warm_caches else "1"}
            subprocess.run(cmd, timeout=args.timeout, check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            error = None
        except subprocess.TimeoutExpired:
            error = f"timeout {args.timeout:.0f}s"
        except subprocess.CalledProcessError as e:
            error = f"failed ({e.returncode})"
        r = json.loads(partial.read_text()) if partial.exists() else {"mode": mode, "compile_s": {}, "prefill_s": {}}
        partial.unlink(missing_ok=True)
        if error:
            r["error"] = error
            r.pop("compile_total_s", None) if len(r["compile_s"]) < len(args.compile_lengths) else None
        results.append(r)
        print(json.dumps(r), flush=True)
    stem = folder / (f"compile_{args.family}_{args.config}" + ("_cuda" if args.device.startswith("cuda") else ""))
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    text = table(results, args)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(results, args, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
