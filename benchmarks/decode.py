"""CPU decode benchmark: per-step latency and tokens/s of graphdelta's runtime against
transformers eager (DynamicCache) and transformers StaticCache + torch.compile, side by side in
one run, at batch 1 and 16, on a tiny and a mid-size Qwen3-Next (random weights, fp32).

    python benchmarks/decode.py [--sizes tiny mid] [--batches 1 16] [--steps 8] [--rounds 4]
                                [--threads 1] [--skip-static]

The systems take turns (``--rounds`` of ``--steps`` steps each) so that a shared machine's load
hits them alike; the table gives the median and the best step. Writes
decode.{json,md,png} in the results folder (``common.results_dir()``). Not a timed test: the numbers
depend on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import transformers as tf

from common import write_results
from graphdelta.runtime import Runner

PROMPT = 32
WARMUP = 3
SIZES = {
    # The test models (tests/models.py): hidden 128, 4 layers, 4 experts.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=32, linear_value_head_dim=32, intermediate_size=256, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128),
    "mid": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                linear_key_head_dim=64, linear_value_head_dim=64, intermediate_size=1024, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256),
}


def build(size: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.Qwen3NextConfig(**SIZES[size], full_attention_interval=4, max_position_embeddings=4096)
    return tf.Qwen3NextForCausalLM(config).float().eval()


@torch.no_grad()
def transformers_eager(model, ids: torch.Tensor, steps: int) -> Callable[[], None]:
    cache = tf.DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    return lambda: model(token, past_key_values=cache, use_cache=True)


@torch.no_grad()
def transformers_static_compiled(model, ids: torch.Tensor, steps: int) -> Callable[[], None]:
    B, P = ids.shape
    cache = tf.StaticCache(config=model.config, max_cache_len=P + steps + 8)
    positions = torch.arange(P)
    out = model(ids, past_key_values=cache, use_cache=True, cache_position=positions,
                position_ids=positions[None].expand(B, -1))
    token = out.logits[:, -1:].argmax(-1)
    compiled = torch.compile(model, dynamic=False)
    pos = [P]

    def step():
        cache_position = torch.tensor([pos[0]])
        compiled(token, past_key_values=cache, use_cache=True, cache_position=cache_position,
                 position_ids=cache_position[None].expand(B, -1))
        pos[0] += 1

    return step


@torch.no_grad()
def graphdelta_runner(model, ids: torch.Tensor, steps: int, compile_steps: bool) -> Callable[[], None]:
    B, P = ids.shape
    runner = Runner(model, max_seqs=B, max_len=P + steps + 8, compile_steps=compile_steps)
    slots = [runner.allocate() for _ in range(B)]
    logits = runner.prefill(slots, list(ids))
    tokens = logits.argmax(-1).tolist()
    return lambda: runner.decode(slots, tokens)


SYSTEMS = {
    "transformers eager (DynamicCache)": transformers_eager,
    "transformers StaticCache + torch.compile": transformers_static_compiled,
    "graphdelta runtime (eager step)": lambda m, ids, n: graphdelta_runner(m, ids, n, False),
    "graphdelta runtime (compiled step)": lambda m, ids, n: graphdelta_runner(m, ids, n, True),
}


def timed(steps: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds of each decode step, the systems taking turns round by round so that a change in
    the machine's load hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=8, help="steps per system per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-static", action="store_true", help="leave out StaticCache + torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # every system runs inference only
    rows = []
    for size in args.sizes:
        model = build(size)
        params = sum(p.numel() for p in model.parameters())
        for batch in args.batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
            total = WARMUP + args.rounds * args.steps
            steps = {}
            for name, setup in SYSTEMS.items():
                if args.skip_static and "StaticCache" in name:
                    continue
                try:
                    step = setup(model, ids, total)
                    for _ in range(WARMUP):  # compiles, if it does
                        step()
                    steps[name] = step
                except Exception as e:  # a system that cannot run this model is reported, not fatal
                    print(f"{size} b{batch} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            times = timed(steps, args.rounds, args.steps)
            eager = statistics.median(times[next(iter(times))])
            for name, ts in times.items():
                median = statistics.median(ts)
                rows.append({"model": size, "params_M": round(params / 1e6, 2), "batch": batch, "system": name,
                             "step_ms": median * 1e3, "best_step_ms": min(ts) * 1e3,
                             "tokens_per_s": batch / median, "vs_eager": eager / median})
                print(rows[-1], flush=True)

    def plot(path):
        import matplotlib.pyplot as plt

        groups = [(r["model"], r["batch"]) for r in rows]
        groups = list(dict.fromkeys(groups))
        names = list(dict.fromkeys(r["system"] for r in rows))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            values = [next((r["tokens_per_s"] for r in rows if (r["model"], r["batch"]) == g and r["system"] == name),
                           0.0) for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m} b{b}" for m, b in groups])
        ax.set_ylabel("decode tokens / s")
        ax.set_yscale("log")
        ax.set_title("Qwen3-Next decode on CPU, fp32")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    command = "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = write_results("decode", rows, ["model", "params_M", "batch", "system", "step_ms", "best_step_ms",
                                        "tokens_per_s", "vs_eager"], command.strip(), plot)
    print(md)


if __name__ == "__main__":
    main()
