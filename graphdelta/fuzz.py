"""Fuzz an implementation of the gated delta rule against the float64 reference.

    python -m graphdelta.fuzz --impl chunk --examples 200 [--seed 0]
    python -m graphdelta.fuzz --list

Implementations are graphdelta's ops (through the PyTorch or the Triton backend; the Triton
kernels run on CPU under ``TRITON_INTERPRET=1`` when there is no GPU), transformers' torch
reference, and fla's kernels when fla is installed, each through a small adapter to the fla
signature. On a failure, hypothesis shrinks the case and the smallest one is printed as a
snippet that reproduces it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from graphdelta.lowering.contract import state_shape
from graphdelta.testing import Capabilities, ProblemSpec, check, problem_specs


@contextlib.contextmanager
def _backend(name: str | None):
    old = os.environ.get("GRAPHDELTA_BACKEND")
    if name is not None:
        os.environ["GRAPHDELTA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GRAPHDELTA_BACKEND", None)
        else:
            os.environ["GRAPHDELTA_BACKEND"] = old


def _with_backend(fn: Callable, backend: str | None) -> Callable:
    def run(**kw):
        with _backend(backend):
            return fn(**kw)

    return run


def _decode_adapter(backend: str | None) -> Callable:
    """Run the decode op on a pool whose slots are a permutation of the batch, plus spare slots."""
    from graphdelta.ops import gated_delta_rule_decode

    def run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, state_layout):
        B, _, _, K = q.shape
        HV, V = v.shape[2:]
        pool = torch.full(state_shape(B + 2, HV, K, V, state_layout), 7.0, device=q.device)
        slots = torch.arange(B + 1, 1, -1, device=q.device, dtype=torch.int32)
        pool[slots.long()] = 0.0 if initial_state is None else initial_state.float()
        with _backend(backend):
            o, _ = gated_delta_rule_decode(q, k, v, g, beta, pool, slots, scale,
                                           use_qk_l2norm_in_kernel, state_layout)
        return o, pool[slots.long()]

    return run


def transformers_chunk(q, k, v, g, beta, **kwargs):
    """transformers' ``torch_chunk_gated_delta_rule`` on graphdelta's shapes (q, k
    ``[B, T, H, K]``, v ``[B, T, HV, V]``): each key head is repeated for its value heads, as the
    transformers layers do before the call (transformers 5.17's function takes H == HV only;
    newer ones repeat inside it, at the same cost)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    r = v.shape[2] // q.shape[2]
    return torch_chunk_gated_delta_rule(q.repeat_interleave(r, 2), k.repeat_interleave(r, 2), v, g, beta, **kwargs)


def _transformers_adapter(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                          use_qk_l2norm_in_kernel, state_layout):
    return transformers_chunk(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def _fla_adapter(module: str, name: str) -> Callable:
    def run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, state_layout):
        fn = getattr(importlib.import_module(module), name)
        return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                  output_final_state=True, cu_seqlens=cu_seqlens,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    return run


@dataclass
class Implementation:
    fn: Callable
    caps: Capabilities
    device: str = "cpu"
    needs: str | None = None  # a module that must be importable


def implementations() -> dict[str, Implementation]:
    import graphdelta.ops as ops

    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    # Under the Triton interpreter every program costs milliseconds: keep problems small.
    small = Capabilities(max_T=130, max_dim=32) if cuda == "cpu" else Capabilities()
    return {
        "chunk": Implementation(ops.chunk_gated_delta_rule, Capabilities()),
        "recurrent": Implementation(ops.recurrent_gated_delta_rule, Capabilities()),
        "decode": Implementation(_decode_adapter(None), Capabilities(varlen=False)),
        "chunk-triton": Implementation(_with_backend(ops.chunk_gated_delta_rule, "triton"), small, cuda),
        "recurrent-triton": Implementation(_with_backend(ops.recurrent_gated_delta_rule, "triton"), small, cuda),
        "decode-triton": Implementation(_decode_adapter("triton"), Capabilities(
            varlen=False, max_T=small.max_T, max_dim=small.max_dim), cuda),
        "transformers": Implementation(_transformers_adapter, Capabilities(
            per_channel_gate=False, varlen=False, vk_layout=False, custom_scale=False),
            needs="transformers"),
        "fla": Implementation(_fla_adapter("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                              Capabilities(per_channel_gate=False, vk_layout=False, max_dim=128),
                              "cuda", needs="fla"),
    }


def run(name: str, examples: int, seed: int | None, out=sys.stdout) -> bool:
    """Fuzz implementation ``name`` on ``examples`` problems; True when every check passed."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hyp_seed

    impl = implementations()[name]
    if impl.needs and importlib.util.find_spec(impl.needs) is None:
        raise SystemExit(f"--impl {name} needs the {impl.needs!r} package, which is not installed")
    if impl.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--impl {name} needs a CUDA GPU; none is visible")

    worst: dict[str, float] = {}
    count = 0
    start = time.perf_counter()

    @settings(max_examples=examples, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(problem_specs(impl.caps))
    def prop(spec: ProblemSpec) -> None:
        nonlocal count
        count += 1
        result = check(impl.fn, spec.build(impl.device))
        key = f"{spec.dtype}"
        worst[key] = max(worst.get(key, 0.0), result.output_error, result.state_error)
        if count % 10 == 0:
            print(f"\r[{name}] {count} problems checked ({time.perf_counter() - start:.0f} s)",
                  end="", file=out, flush=True)

    if seed is not None:
        prop = hyp_seed(seed)(prop)
    try:
        prop()
    except AssertionError as err:
        print(f"\n[{name}] FAILED after {count} problems (hypothesis shrank it to the smallest):",
              file=out)
        print(str(err).replace("IMPL", f"graphdelta.fuzz.implementations()[{name!r}].fn"), file=out)
        return False
    print(f"\n[{name}] OK: {count} problems in {time.perf_counter() - start:.1f} s; worst relative "
          "error per dtype: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items())), file=out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphdelta.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="chunk",
                        help="implementation to fuzz (see --list); default: chunk")
    parser.add_argument("--examples", type=int, default=100, help="number of problems (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed, for a repeatable run")
    parser.add_argument("--list", action="store_true", help="list the implementations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, impl in implementations().items():
            print(f"{name:18s} device={impl.device} needs={impl.needs or '-'}")
        return 0
    if args.examples < 1:
        parser.error(f"--examples must be at least 1, got {args.examples}")
    if args.impl not in implementations():
        parser.error(f"unknown --impl {args.impl!r}; choose from {', '.join(implementations())}")
    if args.impl.endswith("triton") and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
    return 0 if run(args.impl, args.examples, args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
