"""Every autotune config of every graphdelta kernel, compiled, run and checked: step 2 of
``tools/gpu_check.sh``.

A job is (case, kernel, config): the op of the case runs with that kernel pinned to that config
(the other tuned kernels at their first config), on NaN-poisoned allocations, and its output
and final state are compared with the PyTorch path on the same device; a second run on the same
inputs must give the same bits (a differing bit is a race). Each job also records the config's
shared-memory estimate (``lowering/triton_autotune.py``) against the device's limit and, on a
GPU, what the compiler made of it (shared memory, registers, spills), so that the estimate is
checked both ways: a config it keeps must launch, and a config it drops must not fit.

    python tools/gpu_configs.py --shard 0/12 --out configs-0.jsonl     # one of 12 processes
    python tools/gpu_configs.py --summary configs-*.jsonl              # the table
    python tools/gpu_configs.py --device cpu --tiny --shard 0/1 ...    # the interpreter (dry run)

Runs with ``GRAPHDELTA_AUTOTUNE=all`` (set here before graphdelta is imported): nothing pruned.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
import traceback
import zlib

os.environ["GRAPHDELTA_AUTOTUNE"] = "all"
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    """One op variant: which op, gate, packing, state layout, dtype and head size."""

    op: str  # "chunk", "recurrent" (the short prefill) or "conv"
    gate: str = "gdn"  # "gdn" (a gate per head) or "kda" (per key channel)
    packed: bool = False
    layout: str = "kv"
    dtype: str = "bfloat16"
    D: int = 128  # K = V (conv: channels / 2)

    @property
    def name(self) -> str:
        return f"{self.op} {self.gate} {'packed' if self.packed else 'dense'} {self.layout} {self.dtype} D={self.D}"


KERNELS = {
    "chunk": ["chunk_cumsum_kernel", "chunk_kkt_kernel", "solve_tril_kernel", "recompute_w_u_kernel",
              "chunk_state_scan_kernel", "chunk_output_kernel"],
    "recurrent": ["fused_recurrent_kernel"],
    "conv": ["causal_conv1d_kernel"],
}


def cases(tiny: bool) -> list[Case]:
    """bf16 everywhere (the models' dtype), fp32 (full-precision products) for a few."""
    if tiny:  # the interpreter: one of each op, small heads
        return [Case("chunk", "kda", True, "kv", "float32", 32), Case("recurrent", D=32, dtype="float32"),
                Case("conv", D=32, dtype="float32")]
    out = [Case("chunk", gate, packed, layout) for gate in ("gdn", "kda") for packed in (False, True)
           for layout in ("kv", "vk")]
    out += [Case("chunk", "gdn", False, "kv", "float32"), Case("chunk", "kda", True, "vk", "float32"),
            Case("chunk", "gdn", True, "kv", "bfloat16", 64)]
    out += [Case("recurrent", gate, packed, layout) for gate in ("gdn", "kda") for packed in (False, True)
            for layout in ("kv", "vk")]
    out += [Case("recurrent", "gdn", True, "vk", "float32")]
    out += [Case("conv", packed=packed, dtype=dtype) for packed in (False, True) for dtype in ("bfloat16", "float32")]
    return out


def inputs(case: Case, device: str) -> dict:
    """The op's keyword arguments, random (seeded), on ``device``; packed cases hold 3 sequences
    of 1, 69 and 130 tokens (recurrent: 1, 5, 6), dense ones 2 rows of 100 (recurrent: 12)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    dtype = getattr(torch, case.dtype)
    lengths = {"recurrent": [1, 5, 6]}.get(case.op, [1, 69, 130])
    B, T = (1, sum(lengths)) if case.packed else (2, 12 if case.op == "recurrent" else 100)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32) if case.packed else None
    N = len(lengths) if case.packed else B

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    if case.op == "conv":
        D = 2 * case.D
        return dict(x=randn(B, T, D).to(dtype), weight=randn(D, 4).to(dtype), bias=randn(D).to(dtype),
                    initial_state=randn(N, D, 3).to(dtype), cu_seqlens=None if cu is None else cu.to(device),
                    activation="silu")
    H, HV, K, V = 2, 4, case.D, case.D
    g_shape = (B, T, HV, K) if case.gate == "kda" else (B, T, HV)
    from graphdelta.lowering.contract import state_shape

    return dict(
        q=randn(B, T, H, K).to(dtype), k=randn(B, T, H, K).to(dtype), v=randn(B, T, HV, V).to(dtype),
        g=torch.nn.functional.logsigmoid(randn(*g_shape, scale=4.0)).to(dtype),
        beta=torch.rand(B, T, HV, generator=gen).to(device, dtype), scale=K ** -0.5,
        initial_state=randn(*state_shape(N, HV, K, V, case.layout), scale=0.5),
        cu_seqlens=None if cu is None else cu.to(device), use_qk_l2norm_in_kernel=True, state_layout=case.layout,
    )


def implementations(op: str):
    """(the Triton implementation, the PyTorch path) of ``op``: launchers on validated inputs."""
    from graphdelta.lowering import torch_chunk, torch_conv, torch_recurrent, triton_chunk, triton_conv, \
        triton_recurrent

    return {
        "chunk": (triton_chunk.chunk_gated_delta_rule, torch_chunk.chunk_gated_delta_rule),
        "recurrent": (triton_recurrent.recurrent_gated_delta_rule, torch_recurrent.recurrent_gated_delta_rule),
        "conv": (triton_conv.causal_conv1d, torch_conv.causal_conv1d),
    }[op]


class Compiled:
    """On a GPU, records the compiled kernel of each launch (shared memory, registers, spills)."""

    def __init__(self):
        self.last: dict[str, dict] = {}
        if not torch.cuda.is_available():
            return
        from triton.runtime import jit

        run = jit.JITFunction.run
        last = self.last

        def recording(fn, *args, **kwargs):
            kernel = run(fn, *args, **kwargs)
            meta = getattr(kernel, "metadata", None)
            last[fn.fn.__name__] = {"shared": getattr(meta, "shared", None),
                                    "registers": getattr(kernel, "n_regs", None),
                                    "spills": getattr(kernel, "n_spills", None)}
            return kernel

        jit.JITFunction.run = recording


def config_dict(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def run_job(case: Case, kernel: str, index: int, device: str, compiled: Compiled) -> dict:
    from graphdelta.lowering import triton_autotune
    from graphdelta.testing import TOLERANCES, poisoned_allocations, relative_error

    tuner, configs, shared_memory = triton_autotune.TUNED[kernel]
    config = configs[index]
    for name, (other, other_configs, _) in triton_autotune.TUNED.items():
        other.configs = [config] if name == kernel else other_configs[:1]  # one config: never timed
        other.cache.clear()
        other.best_config = None
    kwargs = inputs(case, device)
    record = {"case": case.name, "kernel": kernel, "index": index, "config": config_dict(config)}
    launches: list[dict] = []
    run = tuner.run

    def recording_run(*args, **kw):  # the launch's arguments, by name, as the estimate reads them
        launches.append({**dict(zip(tuner.arg_names, args)), **kw})
        return run(*args, **kw)

    tuner.run = recording_run
    triton_fn, torch_fn = implementations(case.op)
    compiled.last.clear()
    try:
        with poisoned_allocations():
            first = triton_fn(**kwargs)
        second = triton_fn(**kwargs)
    except Exception as err:  # noqa: BLE001 - recorded: out of resources is an answer here
        record.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        return record
    finally:
        del tuner.run
        if shared_memory is not None and launches:
            record["estimate"] = shared_memory(config, launches[0])
            record["limit"] = triton_autotune.shared_memory_limit()
    if tuner.best_config is not config:
        record.update(status="not launched", error="the launcher did not use the tuned kernel "
                      "(its interpreter or decode tile)")
        return record
    record.update(compiled.last.get(kernel, {}))
    reference = torch_fn(**kwargs)
    tol = TOLERANCES[getattr(torch, case.dtype)]
    errors = [relative_error(a, b) for a, b in zip(first, reference)]
    bitwise = all(torch.equal(a, b) for a, b in zip(first, second))
    finite = all(bool(torch.isfinite(a).all()) for a in first)
    ok = finite and bitwise and all(e <= tol for e in errors)
    record.update(status="ok" if ok else "FAIL", errors=errors, tolerance=tol, bitwise_repeat=bitwise,
                  finite=finite)
    return record


def jobs(tiny: bool) -> list[tuple[Case, str, int]]:
    from graphdelta.lowering import triton_autotune, triton_chunk, triton_conv, triton_recurrent  # noqa: F401

    out = []
    for case in cases(tiny):
        for kernel in KERNELS[case.op]:
            if case.op == "chunk" and case.layout == "vk" and kernel != "chunk_state_scan_kernel":
                continue  # of the chunk stages only the scan reads and writes states
            out += [(case, kernel, i) for i in range(len(triton_autotune.TUNED[kernel][1]))]
    # config #0 of every case and kernel first, then #1, ...: a run stopped at its time limit has
    # still checked every kernel (the first GPU run, in case order, never reached the recurrent
    # and conv kernels)
    return sorted(out, key=lambda job: job[2])


def summary(paths: list[str]) -> int:
    """Per kernel: configs run, passed, failed, out of resources, and the estimate's verdicts."""
    records = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    if not records:
        print("no records")
        return 1
    kernels = sorted({r["kernel"] for r in records})
    print("| kernel | jobs | ok | FAIL | error | not launched | estimate kept, did not fit | estimate dropped, "
          "fitted | max shared KB | max regs | spilling configs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for kernel in kernels:
        rs = [r for r in records if r["kernel"] == kernel]
        count = {s: sum(r["status"] == s for r in rs) for s in ("ok", "FAIL", "error", "not launched")}
        under = [r for r in rs if r.get("estimate") is not None and r["estimate"] <= r["limit"]]
        over = [r for r in rs if r.get("estimate") is not None and r["estimate"] > r["limit"]]
        kept_failed = sum(r["status"] == "error" and "OutOfResources" in r.get("error", "") for r in under)
        dropped_fit = sum(r["status"] == "ok" for r in over)
        shared = [r["shared"] for r in rs if r.get("shared") is not None]
        regs = [r["registers"] for r in rs if r.get("registers") is not None]
        spilling = sum(bool(r.get("spills")) for r in rs)
        # a problem: a wrong answer, or an error the estimate did not predict
        bad += count["FAIL"] + sum(r["status"] == "error" and r not in over for r in rs)
        print(f"| {kernel} | {len(rs)} | {count['ok']} | {count['FAIL']} | {count['error']} | "
              f"{count['not launched']} | {kept_failed} | {dropped_fit} | "
              f"{max(shared) / 1024 if shared else float('nan'):.0f} | {max(regs) if regs else '-'} | {spilling} |")
    for r in records:
        if r["status"] in ("FAIL", "error"):
            print(f"{r['status']}: {r['case']} {r['kernel']} {r['config']} est={r.get('estimate')} "
                  f"{r.get('errors', '')} {r.get('error', '')}")
    print(f"{len(records)} jobs, {sum(r['status'] == 'ok' for r in records)} ok; problems: {bad}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th job from the i-th")
    parser.add_argument("--tiny", action="store_true", help="small heads and one case per op (interpreter)")
    parser.add_argument("--out", help="JSON lines, one per job, appended as they finish")
    parser.add_argument("--summary", nargs="+", metavar="JSONL", help="print the table of these records")
    args = parser.parse_args(argv)
    if args.summary:
        return summary([p for pattern in args.summary for p in sorted(glob.glob(pattern))])
    i, n = (int(x) for x in args.shard.split("/"))
    todo = jobs(args.tiny)[i::n]
    compiled = Compiled()
    start = time.time()
    with open(args.out or os.devnull, "a") as out:
        for case, kernel, index in todo:
            try:
                record = run_job(case, kernel, index, args.device, compiled)
            except Exception:  # noqa: BLE001 - a broken job is reported, the others still run
                record = {"case": case.name, "kernel": kernel, "index": index, "status": "error",
                          "error": traceback.format_exc(limit=3)[-600:]}
            record["seconds"] = round(time.time() - start, 1)
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"[{i}/{n}] {record['status']:5} {case.name} {kernel} #{index} {record.get('errors', '')} "
                  f"{record.get('error', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
