"""graphdelta's main demo: compile a hybrid linear-attention model, show what was fused, stream
a generation, and compare speed and greedy tokens with transformers eager.

    python examples/generate.py                                  # the embedded tiny Qwen3-Next
    python examples/generate.py --model PATH --prompt "def " --max-new-tokens 64

PATH is any local transformers checkpoint of a supported hybrid model (Qwen3-Next, Qwen3.5,
Kimi Linear); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import graphdelta
from graphdelta.assets import DEFAULT_MODEL_DIR, load_model


def eager_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float]:
    """transformers eager: (greedy tokens, prefill seconds, seconds per decode step), the step
    time from the difference between generating ``new_tokens`` and generating one."""
    def timed(n: int):
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start

    _, prefill = timed(1)
    tokens, total = timed(new_tokens)
    return tokens, prefill, max(total - prefill, 1e-9) / max(new_tokens - 1, 1)


@torch.no_grad()
def prefill_seconds(model, compiled, ids: torch.Tensor, rounds: int = 5) -> tuple[float, float]:
    """Median seconds of one forward over ``ids`` for eager and compiled, taking turns."""
    times: dict = {model: [], compiled: []}
    for _ in range(rounds + 1):  # the first round warms up (and compiles, if this length needs it)
        for fn in times:
            start = time.perf_counter()
            fn(ids)
            times[fn].append(time.perf_counter() - start)
    return statistics.median(times[model][1:]), statistics.median(times[compiled][1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="local checkpoint folder "
                        "(default: the embedded tiny Qwen3-Next)")
    parser.add_argument("--prompt", default="import os\n\n\ndef ", help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prefill-tokens", type=int, default=512,
                        help="prompt length of the prefill timing (text of Python's os.py; 0: skip)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--state-layout", choices=["auto", "kv", "vk"], default="auto")
    parser.add_argument("--backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
                        help="what compiles the rewritten graph (aot_eager compiles in seconds)")
    parser.add_argument("--eager-steps", action="store_true",
                        help="run decode steps eagerly instead of compiling them (saves ~15 s of compiling)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    try:
        model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    except FileNotFoundError as err:
        raise SystemExit(f"--model: {err}")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    print(f"model: {type(model).__name__} from {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters), prompt of {ids.shape[1]} tokens\n")

    start = time.perf_counter()
    compiled = graphdelta.compile(model, state_layout=args.state_layout, backend=args.backend)
    print(f"== graphdelta.compile ({time.perf_counter() - start:.1f} s)")
    with torch.no_grad():
        start = time.perf_counter()
        logits = compiled(ids).logits
        first_call = time.perf_counter() - start
        reference = model(ids).logits
    error = ((logits - reference).norm() / reference.norm()).item()
    print(graphdelta.explain(compiled))
    print(f"first compiled forward (includes compiling): {first_call:.1f} s; logits vs eager: "
          f"relative error {error:.1e}\n")

    print("== graphdelta.generate, streaming:")
    print(args.prompt, end="", flush=True)
    stamps: list[float] = []

    def stream(_: int, token: int) -> None:
        stamps.append(time.perf_counter())
        print(tokenizer.decode([token]), end="", flush=True)

    with torch.no_grad():
        # One max_len for both calls: the warm-up's cache, and its compiled step, serve the run.
        options = dict(eos_token_id=[], compile_steps=not args.eager_steps,
                       max_len=ids.shape[1] + args.max_new_tokens)
        warm = time.perf_counter()
        graphdelta.generate(compiled, [ids[0]], max_new_tokens=4, **options)  # compiles the decode step
        print(f"(warm-up, compiling the decode step: {time.perf_counter() - warm:.1f} s)")
        stamps.clear()
        start = time.perf_counter()
        ours = graphdelta.generate(compiled, [ids[0]], max_new_tokens=args.max_new_tokens, stream=stream,
                                   **options)[0]
    print("\n")
    our_prefill = stamps[0] - start
    our_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    with torch.no_grad():
        model.generation_config.eos_token_id = None
        eager_generate(model, ids, 4)  # warm-up, as for graphdelta
        theirs, hf_prefill, hf_step = eager_generate(model, ids, args.max_new_tokens)
    print("== speed on this machine")
    print(f"{'':22s}{'first token (ms)':>17s}{'decode tok/s':>15s}   (greedy, the prompt above)")
    print(f"{'transformers eager':22s}{hf_prefill * 1e3:17.1f}{1 / hf_step:15.1f}")
    print(f"{'graphdelta':22s}{our_prefill * 1e3:17.1f}{1 / our_step:15.1f}   (decode {hf_step / our_step:.2f}x)")
    if args.prefill_tokens > 0:
        # A few-token prompt times little but call overhead; a long one times the prefill itself.
        text = inspect.getsource(os)[: 4 * args.prefill_tokens]  # >= 1 token per 4 characters
        long_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prefill_tokens]
        eager_s, compiled_s = prefill_seconds(model, compiled, long_ids)
        print(f"prefill of {long_ids.shape[1]} tokens (os.py): transformers eager {eager_s * 1e3:.1f} ms, "
              f"graphdelta.compile {compiled_s * 1e3:.1f} ms ({eager_s / compiled_s:.2f}x)")
    match = ours == theirs
    print(f"greedy tokens match transformers eager: {'yes' if match else 'NO'} ({len(ours)} tokens)")
    if not match:
        sys.exit(1)


if __name__ == "__main__":
    main()
