"""Compile every Triton kernel variant graphdelta's ops launch, for a GPU architecture, on a
machine without a GPU: Triton's real compiler (down to ptxas' cubin) runs, nothing launches.

GPU time is scarce; this finds kernels that a Triton release refuses to compile, that need
more shared memory than the GPU has, or that spill registers, before a GPU session does. It
needs a Triton with its CUDA backend (the PyPI wheels carry ptxas). How: a stand-in driver
names the target, every launch becomes a warmup (compile only), every autotune config that the
shared-memory estimate keeps is compiled (``--all-configs``: every config), and the launchers
are made to believe their tensors live on CUDA so that they pick their GPU tiles. The outputs
are garbage; only compilation is checked.

The table gives, per kernel: the variants compiled, the largest shared memory the compiler
gave one (against the device limit, and against ``lowering/triton_autotune.py``'s estimate:
an estimate under the limit for a kernel over it is a miss), and with ``--ptxas`` the
registers and spills ptxas reports (``ptxas -v``).

    python examples/compile_kernels_offline.py --arch 90
    python examples/compile_kernels_offline.py --all-configs --ptxas --cases chunk --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel is defined
os.environ["GRAPHDELTA_BACKEND"] = "triton"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner, driver, jit  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 100: 232448}  # bytes per block, opt-in maximum


def install(arch: int, dtype_of: dict) -> list[dict]:
    """Compile instead of launching; returns the list that collects one record per compile."""
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
    records: list[dict] = []
    estimate: dict = {"bytes": None}  # of the autotune config being compiled
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        constants = {n: v for n, v in named.items() if n.isupper() and isinstance(v, (int, bool, str))}
        records.append({"kernel": self.fn.__name__, "dtype": dtype_of["name"], **constants,
                        "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
                        "shared": kernel.metadata.shared, "estimate": estimate["bytes"],
                        "ptx": kernel.asm.get("ptx")})
        estimate["bytes"] = None
        return kernel

    from graphdelta.lowering import triton_autotune

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        shared_memory = next((sm for tuner, _, sm in triton_autotune.TUNED.values() if tuner is self), None)
        for config in self.prune_configs(kwargs):
            if shared_memory is not None:
                estimate["bytes"] = shared_memory(config, {**self.nargs, **kwargs, **config.all_kwargs()})
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    jit.JITFunction.run = compile_only
    autotuner.Autotuner.run = every_config
    triton_autotune.shared_memory_limit = lambda: SHARED_LIMIT.get(arch, triton_autotune.HOPPER_SHARED_LIMIT)
    torch.Tensor.is_cuda = property(lambda self: True)
    import graphdelta.lowering as lowering  # the tensors' device is still "cpu": force the kernels

    lowering.backend_for = lambda t: "triton"
    torch.cuda.is_current_stream_capturing = lambda: False
    return records


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes that ``ptxas -v`` reports for one kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, f"--gpu-name=sm_{arch}{suffix}", "-v", path,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    numbers = {key: int(m.group(1)) for key, pattern in (("registers", r"Used (\d+) registers"),
                                                         ("spill_stores", r"(\d+) bytes spill stores"),
                                                         ("spill_loads", r"(\d+) bytes spill loads"))
               if (m := re.search(pattern, text))}
    return numbers or {"ptxas_error": text[-300:]}


def table(records: list[dict], limit: int | None) -> str:
    """Per kernel: variants compiled, shared memory against the limit and the estimate, and
    registers and spills where ptxas was asked."""
    lines = ["| kernel | compiled | max shared KB | over the limit | estimate misses | max registers | "
             "spilling | max spill stores B |", "|---|---|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in records}):
        rs = [r for r in records if r["kernel"] == kernel]
        over = [r for r in rs if limit and r["shared"] > limit]
        missed = [r for r in over if r["estimate"] is not None and r["estimate"] <= limit]
        regs = [r["registers"] for r in rs if "registers" in r]
        spills = [r.get("spill_stores", 0) for r in rs if "registers" in r]
        lines.append(f"| {kernel} | {len(rs)} | {max(r['shared'] for r in rs) / 1024:.0f} | {len(over)} | "
                     f"{len(missed)} | {max(regs) if regs else '-'} | {sum(s > 0 for s in spills) if regs else '-'} | "
                     f"{max(spills) if spills else '-'} |")
    return "\n".join(lines)


def cases(dtype: torch.dtype):
    """(name, thunk) for each op variant: GDN and KDA gates, kv and vk, dense and packed."""
    from graphdelta import ops
    from graphdelta.lowering.contract import state_shape

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
                h0 = torch.zeros(state_shape(N, HV, K, V, layout))
                tag = f"{'kda' if per_channel else 'gdn'} {'packed' if packed else 'dense'} {layout}"
                yield f"chunk {tag}", lambda q=q, k=k, v=v, g=g, b=beta, h0=h0, cu=cu if packed else None, layout=layout: (
                    ops.chunk_gated_delta_rule(q, k, v, g, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                               use_qk_l2norm_in_kernel=True, state_layout=layout))
                if per_channel:
                    continue
                yield f"recurrent {tag}", lambda q=q, k=k, v=v, g=g, b=beta, h0=h0, layout=layout: (
                    torch.ops.graphdelta.recurrent_gated_delta_rule(
                        q[:, :5], k[:, :5], v[:, :5], g[:, :5], b[:, :5], K**-0.5, h0[:1], None, True, layout))
                pool = torch.zeros(state_shape(8, HV, K, V, layout))
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
    parser.add_argument("--cases", default="", help="only the cases whose name holds this, e.g. 'chunk gdn'")
    parser.add_argument("--all-configs", action="store_true", help="compile every config, none pruned")
    parser.add_argument("--ptxas", action="store_true", help="registers and spills from ptxas -v")
    parser.add_argument("--json", help="write every compile's record here")
    args = parser.parse_args(argv)
    if args.all_configs:
        os.environ["GRAPHDELTA_AUTOTUNE"] = "all"  # read when the kernels are imported (below)
    dtype_of = {"name": None}
    records = install(args.arch, dtype_of)
    failures = []
    for name in args.dtypes.split(","):
        dtype_of["name"] = name
        for case, thunk in cases(getattr(torch, name)):
            if args.cases not in case:
                continue
            try:
                thunk()
                print(f"ok    {name} {case}", flush=True)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{name} {case}")
                print(f"FAIL  {name} {case}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                if len(failures) == 1:
                    traceback.print_exc()
    if args.ptxas:
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            for record, numbers in zip(records, pool.map(lambda r: ptxas_report(r["ptx"], args.arch), records)):
                record.update(numbers)
    limit = SHARED_LIMIT.get(args.arch)
    print(f"\ntriton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}, shared-memory limit {limit} B, "
          f"{'every config' if args.all_configs else 'configs the estimate keeps'}:")
    print(table(records, limit))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "ptx"} for r in records], f, indent=1)
    print("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
