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
from graphdelta import progress
from graphdelta.assets import DEFAULT_MODEL_DIR, load_model
from graphdelta.runtime.generate import runner_for
from graphdelta.runtime.streamer import TokenPrinter


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
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--state-layout", choices=["auto", "kv", "vk"], default="auto")
    parser.add_argument("--backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
                        help="what compiles the rewritten graph (aot_eager compiles in seconds)")
    parser.add_argument("--eager-steps", action="store_true",
                        help="run decode steps eagerly instead of compiling them (saves ~15 s of compiling)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.prefill_tokens < 0:
        raise SystemExit(f"--max-new-tokens must be >= 1 and --prefill-tokens >= 0, got "
                         f"{args.max_new_tokens} and {args.prefill_tokens}")
    torch.manual_seed(0)
    progress.show(True)  # the slow phases say what they are doing (on stderr)
    spent: dict[str, float] = {}  # where the time went, printed at the end
    clock = time.perf_counter()

    try:
        model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    except FileNotFoundError as err:
        raise SystemExit(f"--model: {err}")
    spent["loading"] = time.perf_counter() - clock
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    print(f"model: {type(model).__name__} from {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters), prompt of {ids.shape[1]} tokens\n")

    start = time.perf_counter()
    compiled = graphdelta.compile(model, state_layout=args.state_layout, backend=args.backend)
    spent["graphdelta.compile (probe, recognition)"] = time.perf_counter() - start
    print(f"== graphdelta.compile ({spent['graphdelta.compile (probe, recognition)']:.1f} s)")
    with torch.no_grad():
        start = time.perf_counter()
        logits = compiled(ids).logits
        first_call = spent[f"first compiled forward ({args.backend})"] = time.perf_counter() - start
        reference = model(ids).logits
    error = ((logits - reference).norm() / reference.norm()).item()
    print(graphdelta.explain(compiled))
    print(f"first compiled forward (includes compiling): {first_call:.1f} s; logits vs eager: "
          f"relative error {error:.1e}\n")

    print("== graphdelta.generate, streaming:")
    with torch.no_grad():
        # One max_len for both calls: the warm-up's cache, and its compiled steps, serve the run.
        options = dict(eos_token_id=[], compile_steps=not args.eager_steps, max_batch=1,
                       max_len=ids.shape[1] + args.max_new_tokens)
        warm = time.perf_counter()
        graphdelta.generate(compiled, [ids[0]], max_new_tokens=4, **options)  # warms up the runtime
        # the decode step of every attention window the run reaches (generate's runner)
        runner_for(compiled, 1, options["max_len"], options["compile_steps"]).prepare(
            1, ids.shape[1] + 1, options["max_len"] - 1)
        spent["decode-step warm-up (compiling)"] = time.perf_counter() - warm
        print(f"(warm-up, compiling the decode step: {spent['decode-step warm-up (compiling)']:.1f} s)")
        printer = TokenPrinter(tokenizer, args.prompt)
        start = time.perf_counter()
        ours = graphdelta.generate(compiled, [ids[0]], max_new_tokens=args.max_new_tokens, stream=printer,
                                   **options)[0]
        printer.close()
    print()
    stamps = printer.stamps
    spent["graphdelta.generate"] = stamps[-1] - start
    our_prefill = stamps[0] - start
    our_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    with torch.no_grad():
        start = time.perf_counter()
        model.generation_config.eos_token_id = None
        eager_generate(model, ids, 4)  # warm-up, as for graphdelta
        theirs, hf_prefill, hf_step = eager_generate(model, ids, args.max_new_tokens)
        spent["transformers eager generate (twice)"] = time.perf_counter() - start
    print(f"== speed on this machine (end to end, batch 1, {torch.get_num_threads()} threads)")
    print(f"{'':22s}{'first token (ms)':>17s}{'decode tok/s':>15s}   (greedy, the prompt above)")
    print(f"{'transformers eager':22s}{hf_prefill * 1e3:17.1f}{1 / hf_step:15.1f}")
    print(f"{'graphdelta':22s}{our_prefill * 1e3:17.1f}{1 / our_step:15.1f}   (decode {hf_step / our_step:.2f}x)")
    if args.prefill_tokens > 0:
        # A few-token prompt times little but call overhead; a long one times the prefill itself.
        text = inspect.getsource(os)[: 4 * args.prefill_tokens]  # >= 1 token per 4 characters
        long_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prefill_tokens]
        start = time.perf_counter()
        eager_s, compiled_s = prefill_seconds(model, compiled, long_ids)
        spent[f"prefill timing ({long_ids.shape[1]} tokens, both, 6 rounds)"] = time.perf_counter() - start
        print(f"prefill of {long_ids.shape[1]} tokens (os.py): transformers eager {eager_s * 1e3:.1f} ms, "
              f"graphdelta.compile {compiled_s * 1e3:.1f} ms ({eager_s / compiled_s:.2f}x)")
    match = ours == theirs
    print(f"greedy tokens match transformers eager: {'yes' if match else 'NO'} ({len(ours)} tokens)")
    total = time.perf_counter() - clock
    print(f"\n== where the {total:.0f} s went")
    for what, seconds in spent.items():
        print(f"{seconds:8.1f} s  {what}")
    print(f"{total - sum(spent.values()):8.1f} s  the rest (checks, explain)")
    if not match:
        sys.exit(1)


if __name__ == "__main__":
    main()
