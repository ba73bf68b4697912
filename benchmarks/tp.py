"""Tensor parallelism on CPU: one process against two (gloo), on the same checkpoint.

The model (tests/models.py's Qwen3-Next at ``--config``; mid: hidden 1024, 8 layers, 144M
parameters) is saved once, then each setup loads it with ``graphdelta.load`` (two processes:
each reads only its slices) and runs ``graphdelta``'s runtime on it (``Runner``, batch 1):
- prefill: one ``--length``-token prompt into an empty slot (the step's logits included);
- decode: ``--tokens`` single-token steps after it, per token;
- memory: each rank's parameter bytes, the bytes it read from the checkpoint, and the growth of
  its peak resident memory during the load (Linux's VmHWM, reset before it).

Setups, with this machine's 2 cores in each: 1 process x 2 threads, 1 process x 1 thread,
2 processes x 1 thread. The setups run one after another (each in fresh processes), so
compare them within one run only. On CPU gloo's all-reduce goes through the host's TCP stack:
two per layer per step, which is what the decode figures measure; the point of the CPU run
is correctness (the greedy tokens of every setup are compared) and per-rank memory.

Writes ``tp_<config>.json``, ``.md`` and ``.png`` to the results folder (``common.results_dir()``).

    python benchmarks/tp.py --config mid
    python benchmarks/tp.py --config tiny --length 256 --tokens 16     # a quick look
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402
from graphdelta.testing import peak_memory_growth  # noqa: E402

CONFIGS = {"tiny": dict(hidden=128, layers=4), "mid": dict(hidden=1024, layers=8)}
SETUPS = [(1, 2), (1, 1), (2, 1)]  # (processes, threads each)


@torch.no_grad()
def _rank(rank: int, world: int, threads: int, init: str, path: str, args, out: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import graphdelta
    from graphdelta.parallel.plan import local_bytes
    from graphdelta.runtime import Runner

    from graphdelta.assets import auto_model_class, load_config

    config = load_config(path)
    with torch.device("meta"):  # transformers' modules imported before the measurement
        auto_model_class(config).from_config(config)
    model, growth = peak_memory_growth(lambda: graphdelta.load(path))
    runner = Runner(model, max_seqs=1, max_len=args.length + args.tokens + 1)
    prompt = torch.randint(0, model.config.vocab_size, (args.length,), generator=torch.Generator().manual_seed(1))
    prefill, decode, tokens = [], [], None
    for _ in range(args.rounds):
        slot = runner.allocate()
        start = time.perf_counter()
        token = int(runner.prefill([slot], [prompt]).argmax(-1))
        prefill.append(time.perf_counter() - start)
        got = [token]
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = int(runner.decode([slot], [token]).argmax(-1))
            got.append(token)
        decode.append((time.perf_counter() - start) / args.tokens)
        runner.free(slot)
        tokens = got
    record = dict(prefill_s=statistics.median(prefill), decode_ms=1e3 * statistics.median(decode),
                  param_mib=local_bytes(model) / 2**20, read_mib=model._graphdelta_bytes_read / 2**20,
                  load_peak_mib=None if growth is None else growth / 2**20, tokens=tokens)
    records = [None] * world
    if world > 1:
        dist.all_gather_object(records, record)
        dist.destroy_process_group()
    else:
        records = [record]
    if rank == 0:
        import json

        Path(out).write_text(json.dumps(records))


def run_setup(world: int, threads: int, path: str, args) -> list[dict]:
    import json

    with tempfile.TemporaryDirectory() as scratch:
        out, init = os.path.join(scratch, "records.json"), "file://" + os.path.join(scratch, "rendezvous")
        mp.spawn(_rank, args=(world, threads, init, path, args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    parser.add_argument("--length", type=int, default=512, help="prompt tokens of the prefill")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    args.command = "python benchmarks/tp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    folder = tempfile.mkdtemp()
    try:
        return _run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # (549 MiB at --config mid)


def _run(args, folder: str) -> int:
    import models

    torch.manual_seed(0)
    model = models.build("qwen3_next", **CONFIGS[args.config])
    model.save_pretrained(folder)
    checkpoint = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    del model
    rows, reference = [], None
    for world, threads in SETUPS:
        records = run_setup(world, threads, folder, args)
        first = records[0]
        reference = reference or first["tokens"]
        rows.append(dict(
            setup=f"{world} process{'es' if world > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
            prefill_s=first["prefill_s"], decode_ms=first["decode_ms"],
            param_mib_per_rank=max(r["param_mib"] for r in records),
            read_mib_per_rank=max(r["read_mib"] for r in records),
            load_peak_mib_per_rank=None if any(r["load_peak_mib"] is None for r in records)
            else max(r["load_peak_mib"] for r in records),
            checkpoint_mib=checkpoint / 2**20,
            same_tokens=all(r["tokens"] == reference for r in records)))
        print(rows[-1], flush=True)

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
        names = [r["setup"].replace(" x ", "\nx ") for r in rows]
        for ax, key, label in zip(axes, ("prefill_s", "decode_ms", "load_peak_mib_per_rank"),
                                  (f"prefill {args.length} tokens (s)", "decode (ms/token)", "load peak per rank (MiB)")):
            ax.bar(names, [r[key] or 0.0 for r in rows])
            ax.set_title(label, fontsize=9)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"qwen3_next {args.config}, CPU, gloo", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)

    command = args.command
    columns = ["setup", "prefill_s", "decode_ms", "param_mib_per_rank", "read_mib_per_rank",
               "load_peak_mib_per_rank", "checkpoint_mib", "same_tokens"]
    print(write_results(f"tp_{args.config}", rows, columns, command.strip(), plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
