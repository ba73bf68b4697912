"""Prefill of a hybrid model, transformers eager against ``graphdelta.compile(model)``, with
the two taking turns call by call in one process.

``compile.py`` runs each mode in its own process, one after the other: right for compile
times, but on a shared CPU whose speed drifts over minutes its prefill ratios drift too.
Here every round times each mode in turn at each length, so all see the same machine; the
table gives the median of the rounds and the ratios of medians. ``torch.compile`` joins with
``--modes eager,torch_compile,graphdelta``; it compiles a graph per chunk count (minutes each
on 2 cores) before its length's rounds start.

On a GPU the model runs there (in bf16 by default) and every call is timed to its
completion. ``--config realistic`` has Qwen3-Next's real layer dimensions (hidden 2048, GDN
heads of 128, its vocabulary), 8 layers, 64 experts: a GPU configuration.

Writes ``prefill_<family>_<config>.json``, ``.md`` and ``.png`` to the results folder
(``common.results_dir()``).

    python benchmarks/prefill.py --config tiny
    python benchmarks/prefill.py --config embedded --rounds 7   # the shipped trained checkpoint
    python benchmarks/prefill.py --config mid --lengths 512 --rounds 5
    python benchmarks/prefill.py --family olmo_hybrid --modes eager,torch_compile,graphdelta
    python benchmarks/prefill.py --config realistic --lengths 2048 8192 --modes eager,torch_compile,graphdelta
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_arguments, model_dtype, synchronizer, write_results  # noqa: E402

CONFIGS = {"tiny": dict(hidden=128, layers=4), "mid": dict(hidden=1024, layers=8),
           "realistic": dict(realistic=True, layers=8)}


@torch.no_grad()
def measure(family: str, config: str, lengths: list[int], rounds: int, names: list[str],
            device: str, dtype: torch.dtype) -> list[dict]:
    import graphdelta
    import models
    from graphdelta.runtime.layers import text_config

    if config == "embedded":  # the shipped trained checkpoint: its gates are steep, as trained models' are
        if family != "qwen3_next":
            raise SystemExit(f"--config embedded is the shipped Qwen3-Next; got --family {family}")
        model = graphdelta.assets.load_default_model(dtype, device)[0]
    elif family in models.NEWER_FAMILIES:  # hybrids graphdelta has no code for: the tiny size only
        if config != "tiny":
            raise SystemExit(f"--family {family} has the tiny config only")
        model = models.build_newer(family, layers=CONFIGS[config]["layers"]).to(device, dtype)
    else:
        model = models.build(family, **CONFIGS[config], device=device, dtype=dtype)
    vocab = text_config(model.config).vocab_size
    sync = synchronizer(device)
    modes = {"eager": model}
    if "torch_compile" in names:
        modes["torch_compile"] = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modes["graphdelta"] = graphdelta.compile(model)
    rows = []
    for length in lengths:
        ids = models.tokens(length, vocab=vocab).to(device)
        ref = model(ids, use_cache=False).logits
        row: dict = {"tokens": length}
        for name, fn in modes.items():  # compiles what this length needs, and checks the logits
            got = fn(ids, use_cache=False).logits
            row[f"{name}_rel_err"] = ((got - ref).float().abs().max() / ref.float().abs().max()).item()
            del got
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for name, fn in modes.items():
                sync()
                start = time.perf_counter()
                fn(ids, use_cache=False)
                sync()
                times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            row[f"{name}_s"] = statistics.median(t[1:])
        for name in modes:
            if name != "graphdelta":
                row[f"vs_{name}"] = row[f"{name}_s"] / row["graphdelta_s"]
        row.pop("eager_rel_err")
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen3_next",
                        help="a tests/models.py family; the later ones (NEWER_FAMILIES) at the tiny size")
    parser.add_argument("--config", default="tiny", choices=sorted([*CONFIGS, "embedded"]),
                        help="embedded: the shipped trained tiny Qwen3-Next (random weights otherwise)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--modes", default="eager,graphdelta",
                        help="eager and graphdelta always; add torch_compile to include it")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    dtype = model_dtype(args)
    names = ["eager", *(["torch_compile"] if "torch_compile" in args.modes.split(",") else []), "graphdelta"]

    rows = measure(args.family, args.config, args.lengths, args.rounds, names, args.device, dtype)

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        xs = [r["tokens"] for r in rows]
        for mode in names:
            ax.plot(xs, [r[f"{mode}_s"] for r in rows], marker="o", label=mode)
        ax.set(xlabel="prompt length", ylabel="prefill (s)", xscale="log", yscale="log",
               title=f"{args.family} {args.config}, {args.device} {dtype}, interleaved".replace("torch.", ""))
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)

    command = "python benchmarks/prefill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    columns = ["tokens", *(f"{n}_s" for n in names), *(f"vs_{n}" for n in names[:-1]),
               *(f"{n}_rel_err" for n in names[1:])]
    name = f"prefill_{args.family}_{args.config}" + ("_cuda" if args.device.startswith("cuda") else "")
    print(write_results(name, rows, columns, command.strip(), plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
