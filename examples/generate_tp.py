"""Tensor parallel generation with graphdelta's Python API: load a checkpoint sharded over the
ranks (each reads only its slices), compile each rank's part, generate the same tokens on
every rank.

    python examples/generate_tp.py                         # 2 local CPU processes (gloo)
    torchrun --nproc-per-node 2 examples/generate_tp.py    # the same, started by torchrun
    torchrun --nproc-per-node 4 examples/generate_tp.py --model PATH --device cuda   # NCCL

The embedded tiny Qwen3-Next (2 key / 4 value GDN heads, 2 KV heads) splits over 2 ranks.
Every rank must run the same calls with the same prompts: each step ends its attention and
MLP blocks with an all-reduce, which all ranks enter together.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(args: argparse.Namespace) -> None:
    import graphdelta
    from graphdelta.assets import OFFLINE
    from transformers import AutoTokenizer

    lead = dist.get_rank() == 0
    model = graphdelta.load(args.model)  # sharded over every rank of the process group
    if args.device == "cuda":
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    tp = graphdelta.parallel.tensor_parallel(model)
    spec = tp.spec.linear
    print(f"rank {tp.rank} of {tp.size}: {spec.heads} GDN value heads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    compiled = model if args.no_compile else graphdelta.compile(model)
    if lead and not args.no_compile:  # this rank's heads, and what compile replaced in its layers
        print("\n".join(line for line in graphdelta.explain(compiled).splitlines()
                        if line.startswith(("tensor parallel", "replacements"))))
    tokenizer = AutoTokenizer.from_pretrained(args.model, **OFFLINE)
    ids = tokenizer(args.prompt).input_ids
    start = time.perf_counter()
    new = graphdelta.generate(compiled, [ids], max_new_tokens=args.max_new_tokens,
                              compile_steps=not args.no_compile and args.device == "cpu")[0]
    seconds = time.perf_counter() - start
    if lead:
        print(repr(args.prompt + tokenizer.decode(new)))
        note = "" if args.no_compile else " (compiling the decode step included)"
        print(f"{len(new)} tokens in {seconds:.2f} s on {tp.size} ranks{note}")


def _spawned(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from graphdelta.assets import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="local checkpoint folder")
    parser.add_argument("--prompt", default="import os\n\n\ndef ")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=2, help="processes to start without torchrun")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="graphdelta's runtime without compile")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # torchrun
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        try:
            run(args)
            dist.barrier()  # leave together (a rank whose peer is gone mid-teardown aborts)
        finally:
            dist.destroy_process_group()
    else:
        if args.device == "cuda":
            raise SystemExit("--device cuda: start it with torchrun --nproc-per-node N (one GPU per rank)")
        init = "file://" + os.path.join(tempfile.mkdtemp(), "rendezvous")
        mp.spawn(_spawned, args=(args.ranks, init, args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    sys.exit(main())
