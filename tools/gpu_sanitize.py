"""Every graphdelta kernel once, on small shapes that reach its edges: step 6 of
``tools/gpu_check.sh``, run under ``compute-sanitizer --tool memcheck`` so that an access past
a tensor is reported (with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, each tensor is its own
allocation, so memcheck sees its bounds).

The shapes: odd lengths, a length-1 sequence and a chunk-size multiple packed together, GVA 2,
head dims that are not powers of two (48, 80), both layouts, padded decode rows (slot -1) and a
speculative width. Each output is also compared with the PyTorch path, so that the run is
checked even where the sanitizer is absent (the dry run: ``--device cpu``, the interpreter).

    compute-sanitizer --tool memcheck python tools/gpu_sanitize.py
"""
from __future__ import annotations

import argparse
import os
import sys

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
os.environ.setdefault("GRAPHDELTA_AUTOTUNE", "0")  # one config per kernel: the sanitizer is slow

import torch  # noqa: E402


def problems(device: str):
    """(name, Triton call, PyTorch call) for each kernel family."""
    from graphdelta.lowering import torch_chunk, torch_conv, torch_norm, torch_recurrent, triton_chunk, \
        triton_conv, triton_norm, triton_recurrent
    from graphdelta.lowering.contract import state_shape

    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)

    lengths = [1, 64, 37]
    cu = torch.tensor([0, 1, 65, 102], dtype=torch.int32, device=device)
    T, H, HV, K, V = 102, 1, 2, 48, 80
    for gate in ("gdn", "kda"):
        for layout in ("kv", "vk"):
            g_shape = (1, T, HV, K) if gate == "kda" else (1, T, HV)
            kw = dict(q=randn(1, T, H, K), k=randn(1, T, H, K), v=randn(1, T, HV, V),
                      g=torch.nn.functional.logsigmoid(randn(*g_shape, scale=4.0)),
                      beta=torch.rand(1, T, HV, generator=gen).to(device, torch.bfloat16), scale=K ** -0.5,
                      initial_state=randn(*state_shape(len(lengths), HV, K, V, layout), dtype=torch.float32),
                      cu_seqlens=cu, use_qk_l2norm_in_kernel=True, state_layout=layout)
            yield (f"chunk {gate} {layout}", lambda kw=kw: triton_chunk.chunk_gated_delta_rule(**kw),
                   lambda kw=kw: torch_chunk.chunk_gated_delta_rule(**kw))
            yield (f"recurrent {gate} {layout}", lambda kw=kw: triton_recurrent.recurrent_gated_delta_rule(**kw),
                   lambda kw=kw: torch_recurrent.recurrent_gated_delta_rule(**kw))
            B, W = 3, 2  # decode rows: a padded one in the middle, two tokens each (verify)
            step = dict(q=randn(B, W, H, K), k=randn(B, W, H, K), v=randn(B, W, HV, V),
                        g=torch.nn.functional.logsigmoid(randn(B, W, *g_shape[2:], scale=4.0)),
                        beta=torch.rand(B, W, HV, generator=gen).to(device, torch.bfloat16),
                        state_indices=torch.tensor([4, -1, 0], dtype=torch.int32, device=device),
                        scale=K ** -0.5, use_qk_l2norm_in_kernel=True, state_layout=layout,
                        output_intermediate_states=True)
            pool = randn(5, *state_shape(1, HV, K, V, layout)[1:], dtype=torch.float32)
            yield (f"decode {gate} {layout}",
                   lambda step=step, pool=pool: triton_recurrent.gated_delta_rule_decode(state_pool=pool.clone(), **step),
                   lambda step=step, pool=pool: torch_recurrent.gated_delta_rule_decode(state_pool=pool.clone(), **step))
    D = 200
    conv = dict(x=randn(1, T, D), weight=randn(D, 4), bias=randn(D), initial_state=randn(3, D, 3),
                cu_seqlens=cu, activation="silu")
    yield ("conv packed", lambda: triton_conv.causal_conv1d(**conv), lambda: torch_conv.causal_conv1d(**conv))
    x, states = randn(3, 2, D), randn(5, D, 3)
    slots = torch.tensor([4, -1, 0], device=device)
    yield ("conv update", lambda: triton_conv.causal_conv1d_update(x, states.clone(), conv["weight"], conv["bias"], slots, "silu"),
           lambda: torch_conv.causal_conv1d_update(x, states.clone(), conv["weight"], conv["bias"], slots, "silu"))
    o, z, w = randn(7, 3, 80), randn(7, 3, 80), randn(80)
    yield ("gated norm", lambda: triton_norm.gated_rms_norm(o, z, w, 1e-6, "silu", True),
           lambda: torch_norm.gated_rms_norm(o, z, w, 1e-6, "silu", True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from graphdelta.testing import relative_error

    failures = 0
    for name, triton_call, torch_call in problems(args.device):
        out, ref = triton_call(), torch_call()
        out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
        errors = [relative_error(a, b) for a, b in zip(out, ref)]
        ok = all(e <= 2e-2 for e in errors)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: relative errors {', '.join(f'{e:.1e}' for e in errors)}", flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
