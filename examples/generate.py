"""graphdelta's main demo: compile a hybrid linear-attention model, show what was fused, stream
a generation, and compare speed and greedy tokens with transformers eager.

    python examples/generate.py                                  # the embedded tiny Qwen3-Next
    python examples/generate.py --model PATH --prompt "def " --max-new-tokens 64

PATH is any local transformers checkpoint of a supported hybrid model (Qwen3-Next, Qwen3.5,
Kimi Linear); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import graphdelta
from graphdelta.assets import DEFAULT_MODEL_DIR, load_model


def eager_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float]:
    """transformers eager: (greedy tokens, prefill seconds, decode seconds)."""
    start = time.perf_counter()
    model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    total = time.perf_counter() - start
    return out[0, ids.shape[1]:].tolist(), prefill, max(total - prefill, 1e-9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="local checkpoint folder "
                        "(default: the embedded tiny Qwen3-Next)")
    parser.add_argument("--prompt", default="import os\n\n\ndef ", help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--state-layout", choices=["auto", "kv", "vk"], default="auto")
    parser.add_argument("--backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
                        help="what compiles the rewritten graph (aot_eager compiles in seconds)")
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
        graphdelta.generate(compiled, [ids[0]], max_new_tokens=4, eos_token_id=[])  # warm-up
        stamps.clear()
        start = time.perf_counter()
        ours = graphdelta.generate(compiled, [ids[0]], max_new_tokens=args.max_new_tokens, eos_token_id=[],
                                   stream=stream)[0]
    print("\n")
    our_prefill = stamps[0] - start
    our_decode = stamps[-1] - stamps[0]

    with torch.no_grad():
        model.generation_config.eos_token_id = None
        eager_generate(model, ids, 4)  # warm-up, as for graphdelta
        theirs, hf_prefill, hf_decode = eager_generate(model, ids, args.max_new_tokens)
    steps = max(len(ours) - 1, 1)
    print("== speed on this machine (same prompt, greedy)")
    print(f"{'':22s}{'prefill tok/s':>15s}{'decode tok/s':>15s}")
    print(f"{'transformers eager':22s}{ids.shape[1] / hf_prefill:15.0f}{steps / hf_decode:15.1f}")
    print(f"{'graphdelta':22s}{ids.shape[1] / our_prefill:15.0f}{steps / our_decode:15.1f}"
          f"   ({hf_prefill / our_prefill:.2f}x, {hf_decode / our_decode:.2f}x)")
    match = ours == theirs
    print(f"greedy tokens match transformers eager: {'yes' if match else 'NO'} ({len(ours)} tokens)")
    if not match:
        sys.exit(1)


if __name__ == "__main__":
    main()
