"""Compile every Triton kernel variant graphdelta's ops launch, for a GPU architecture, on a
machine without a GPU: Triton's real compiler (down to ptxas' cubin) runs, nothing launches.

GPU time is scarce; this finds kernels that a Triton release refuses to compile (or that need
more shared memory than the GPU has) before a GPU session does. It needs a Triton with its CUDA
backend (the PyPI wheels carry ptxas). How: a stand-in driver names the target, every launch
becomes a warmup (compile only), every autotune config is compiled, and the launchers are made
to believe their tensors live on CUDA so that they pick their GPU tiles. The outputs are
garbage; only compilation is checked.

    python examples/compile_kernels_offline.py --arch 90
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel is defined
os.environ["GRAPHDELTA_BACKEND"] = "triton"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner, driver, jit  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 100: 232448}  # bytes per block, opt-in maximum


def install(arch: int) -> collections.Counter:
    class OfflineDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise RuntimeError("nothing is timed offline")

    driver.set_active(OfflineDriver())
    compiled: collections.Counter = collections.Counter()
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled[self.fn.__name__] += 1
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    jit.JITFunction.run = compile_only
    autotuner.Autotuner.run = every_config
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.is_current_stream_capturing = lambda: False
    return compiled


def cases(dtype: torch.dtype):
    """(name, thunk) for each op variant: GDN and KDA gates, kv and vk, dense and packed."""
    from graphdelta import ops

    H, HV, K, V, T = 2, 4, 128, 128, 200
    cu = torch.tensor([0, 70, T], dtype=torch.int32)
    for per_channel in (False, True):
        for packed in (False, True):
            for layout in ("kv", "vk"):
                q, k = torch.randn(1, T, H, K, dtype=dtype), torch.randn(1, T, H, K, dtype=dtype)
                v = torch.randn(1, T, HV, V, dtype=dtype)
                g = -torch.rand(1, T, HV, *((K,) if per_channel else ()), dtype=dtype)
                beta = torch.rand(1, T, HV, dtype=dtype)
                N = 2 if packed else 1
                h0 = torch.zeros((N, HV, K, V) if layout == "kv" else (N, HV, V, K))
                tag = f"{'kda' if per_channel else 'gdn'} {'packed' if packed else 'dense'} {layout}"
                yield f"chunk {tag}", lambda q=q, k=k, v=v, g=g, b=beta, h0=h0, cu=cu if packed else None, layout=layout: (
                    ops.chunk_gated_delta_rule(q, k, v, g, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                               use_qk_l2norm_in_kernel=True, state_layout=layout))
                if per_channel:
                    continue
                yield f"recurrent {tag}", lambda q=q, k=k, v=v, g=g, b=beta, h0=h0, layout=layout: (
                    torch.ops.graphdelta.recurrent_gated_delta_rule(
                        q[:, :5], k[:, :5], v[:, :5], g[:, :5], b[:, :5], K**-0.5, h0[:1], None, True, layout))
                pool = torch.zeros((8, HV, K, V) if layout == "kv" else (8, HV, V, K))
                one = [x[:, :1].expand(2, *x.shape[1:]).clone() for x in (q, k, v, g, beta)]
                yield f"decode {tag}", lambda one=one, pool=pool, layout=layout: (
                    ops.gated_delta_rule_decode(*one, pool, torch.tensor([3, 5], dtype=torch.int32), state_layout=layout))
    D = 512
    x, w, bias = torch.randn(1, T, D, dtype=dtype), torch.randn(D, 4, dtype=dtype), torch.randn(D, dtype=dtype)
    yield "conv dense", lambda: ops.causal_conv1d(x, w, bias, output_final_state=True)
    yield "conv packed", lambda: ops.causal_conv1d(x, w, bias, cu_seqlens=cu)
    state = torch.zeros(4, D, 3, dtype=dtype)
    yield "conv update", lambda: ops.causal_conv1d_update(
        x[:, :1].expand(2, 1, D).clone(), state, w, bias, torch.tensor([1, 2], dtype=torch.int32))
    o, z = torch.randn(2, 7, 4, 128, dtype=dtype), torch.randn(2, 7, 4, 128, dtype=dtype)
    yield "gated norm", lambda: ops.gated_rms_norm(o, z, torch.randn(128, dtype=dtype), eps=1e-6, activation="silu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args(argv)
    compiled = install(args.arch)
    failures = []
    for name in args.dtypes.split(","):
        for case, thunk in cases(getattr(torch, name)):
            try:
                thunk()
                print(f"ok    {name} {case}", flush=True)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{name} {case}")
                print(f"FAIL  {name} {case}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                if len(failures) == 1:
                    traceback.print_exc()
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}; launches compiled:",
          dict(compiled))
    # Configs that need more shared memory than the GPU has fail at launch; autotune skips them.
    limit = SHARED_LIMIT.get(args.arch)
    over = collections.Counter()
    for path in glob.glob(os.path.join(triton.knobs.cache.dir, "*", "*.json")):
        try:
            meta = json.load(open(path))
        except (OSError, ValueError):
            continue
        if meta.get("target", {}).get("arch") == args.arch and meta.get("triton_version") == triton.__version__ \
                and limit and meta.get("shared", 0) > limit:
            over[meta["name"]] += 1
    if over:
        print(f"compiled configs over the {limit}-byte shared-memory limit (skipped by autotune):", dict(over))
    print("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
