"""Kernel benchmark: chunked prefill (GDN and KDA) and the decode step, against the measured
roofline of the device, side by side with transformers' reference and fla (when installed).

    python benchmarks/kernels.py                 # GPU: Qwen3-Next / Kimi Linear shapes, bf16
    python benchmarks/kernels.py --quick         # small shapes (the CPU smoke run)

Prefill: H=16, HV=32, K=V=128 (Qwen3-Next, Qwen3.5) for T = 4096 .. 32768 and varlen 8x4096;
KDA at H=HV=32. Decode: batch 1, 8, 64, 256 over a float32 state pool. The roofline (copy
bandwidth, matmul rate) is measured in the same run. Writes results/kernels.{json,md,png}.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass

import torch

import graphdelta as gd
from common import median_time, write_results

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@dataclass
class Case:
    name: str
    T: int  # total tokens
    H: int
    HV: int
    seqs: int = 1  # > 1: packed varlen of equal lengths
    per_channel: bool = False
    D: int = 128  # K = V


def measure_roofline(dtype: torch.dtype) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and matmul rate."""
    n = (1 << 28) if CUDA else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_s = median_time(lambda: dst.copy_(src), repeats=10)
    m = 8192 if CUDA else 1024
    a = torch.randn(m, m, dtype=dtype, device=DEVICE)
    mm_s = median_time(lambda: a @ a, repeats=10)
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_TFLOPs": 2 * m**3 / mm_s / 1e12}


def prefill_inputs(case: Case, dtype: torch.dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    T, H, HV, D = case.T, case.H, case.HV, case.D
    q = torch.randn(1, T, H, D, generator=gen, device=DEVICE, dtype=dtype)
    k = torch.randn(1, T, H, D, generator=gen, device=DEVICE, dtype=dtype)
    v = torch.randn(1, T, HV, D, generator=gen, device=DEVICE, dtype=dtype)
    g_shape = (1, T, HV, D) if case.per_channel else (1, T, HV)
    g = torch.nn.functional.logsigmoid(torch.randn(*g_shape, generator=gen, device=DEVICE)).to(dtype)
    beta = torch.rand(1, T, HV, generator=gen, device=DEVICE, dtype=dtype)
    cu = None
    if case.seqs > 1:
        cu = torch.arange(0, T + 1, T // case.seqs, device=DEVICE, dtype=torch.int32)
    return q, k, v, g, beta, cu


def prefill_cost(case: Case, dtype: torch.dtype, C: int = 64) -> tuple[float, float]:
    """(flops, bytes) of the chunked algorithm: the intra-chunk grams and solve, the WY
    products, the state scan and the output, and the bytes of its inputs, output and states."""
    T, HV, D = case.T, case.HV, case.D
    per_token = 2 * HV * (2 * C * D + C * C / 2 + 2 * C * D + 3 * D * D + C * D)
    el = torch.finfo(dtype).bits // 8
    g_el = D if case.per_channel else 1
    bytes_ = el * T * (2 * case.H * D + HV * D + HV * g_el + HV + HV * D) + 2 * 4 * case.seqs * HV * D * D
    return per_token * T, bytes_


def systems_prefill(case: Case):
    """name -> callable(q, k, v, g, beta, cu) for every system that runs this case here."""
    out = {"graphdelta": lambda q, k, v, g, b, cu: gd.chunk_gated_delta_rule(
        q, k, v, g, b, cu_seqlens=cu, output_final_state=True, use_qk_l2norm_in_kernel=True)}
    if importlib.util.find_spec("fla") is not None and CUDA:
        if case.per_channel:
            from fla.ops.kda import chunk_kda as fla_fn
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fn
        out["fla"] = lambda q, k, v, g, b, cu: fla_fn(q, k, v, g, b, cu_seqlens=cu, output_final_state=True,
                                                       use_qk_l2norm_in_kernel=True)
    if case.seqs == 1:
        if case.per_channel:
            from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention as ref
        else:
            from graphdelta.fuzz import transformers_chunk as ref
        out["transformers"] = lambda q, k, v, g, b, cu: ref(q, k, v, g, b, output_final_state=True,
                                                             use_qk_l2norm_in_kernel=True)
    return out


def bench_prefill(cases: list[Case], dtype, roof: dict, repeats: int) -> list[dict]:
    rows = []
    for case in cases:
        args = prefill_inputs(case, dtype)
        flops, bytes_ = prefill_cost(case, dtype)
        for system, fn in systems_prefill(case).items():
            s = median_time(lambda: fn(*args), repeats=repeats)
            rows.append({"kind": "prefill", "case": case.name, "system": system, "T": case.T, "ms": s * 1e3,
                         "TFLOPs": flops / s / 1e12, "GBps": bytes_ / s / 1e9,
                         "roofline_frac": max(flops / s / 1e12 / roof["matmul_TFLOPs"],
                                              bytes_ / s / 1e9 / roof["copy_GBps"])})
            print(rows[-1], flush=True)
    return rows


def bench_decode(batches: list[int], dtype, roof: dict, repeats: int, HV=32, H=16, D=128) -> list[dict]:
    rows = []
    for B in batches:
        gen = torch.Generator(device=DEVICE).manual_seed(B)
        q, k = (torch.randn(B, 1, H, D, generator=gen, device=DEVICE, dtype=dtype) for _ in range(2))
        v = torch.randn(B, 1, HV, D, generator=gen, device=DEVICE, dtype=dtype)
        g = -torch.rand(B, 1, HV, generator=gen, device=DEVICE).to(dtype)
        beta = torch.rand(B, 1, HV, generator=gen, device=DEVICE, dtype=dtype)
        el = torch.finfo(dtype).bits // 8
        bytes_ = 2 * B * HV * D * D * 4 + el * B * (2 * H * D + 2 * HV * D + 2 * HV)
        for layout in ("kv", "vk"):
            pool = torch.zeros(2 * B, HV, D, D, device=DEVICE)
            slots = torch.arange(0, 2 * B, 2, device=DEVICE, dtype=torch.int32)
            s = median_time(lambda: gd.gated_delta_rule_decode(q, k, v, g, beta, pool, slots,
                                                               use_qk_l2norm_in_kernel=True,
                                                               state_layout=layout), repeats=repeats)
            rows.append({"kind": "decode", "case": f"decode B={B} {layout}", "system": f"graphdelta-{layout}",
                         "T": B, "ms": s * 1e3, "TFLOPs": 0.0, "GBps": bytes_ / s / 1e9,
                         "roofline_frac": bytes_ / s / 1e9 / roof["copy_GBps"]})
            print(rows[-1], flush=True)
        if importlib.util.find_spec("fla") is not None and CUDA:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            h0 = torch.zeros(B, HV, D, D, device=DEVICE)
            s = median_time(lambda: fused_recurrent_gated_delta_rule(
                q, k, v, g, beta, initial_state=h0, output_final_state=True,
                use_qk_l2norm_in_kernel=True), repeats=repeats)
            rows.append({"kind": "decode", "case": f"decode B={B}", "system": "fla", "T": B, "ms": s * 1e3,
                         "TFLOPs": 0.0, "GBps": bytes_ / s / 1e9,
                         "roofline_frac": bytes_ / s / 1e9 / roof["copy_GBps"]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (default without a GPU)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    quick = args.quick or not CUDA
    dtype = torch.bfloat16 if CUDA else torch.float32
    repeats = args.repeats or (3 if quick else 20)
    roof = measure_roofline(dtype)
    print("roofline:", roof)
    if quick:
        cases = [Case("GDN T=512", 512, 2, 4), Case("GDN varlen 4x128", 512, 2, 4, seqs=4),
                 Case("KDA T=512", 512, 4, 4, per_channel=True)]
        batches = [1, 8]
    else:
        cases = [Case(f"GDN T={T}", T, 16, 32) for T in (4096, 8192, 16384, 32768)]
        cases += [Case("GDN varlen 8x4096", 8 * 4096, 16, 32, seqs=8), Case("KDA T=8192", 8192, 32, 32, per_channel=True)]
        batches = [1, 8, 64, 256]
    rows = bench_prefill(cases, dtype, roof, repeats) + bench_decode(batches, dtype, roof, repeats)
    for row in rows:  # ratios against the anchors measured in this run
        anchors = {r["system"]: r["ms"] for r in rows if r["case"] == row["case"]}
        row["vs_transformers"] = anchors["transformers"] / row["ms"] if "transformers" in anchors else float("nan")
        row["vs_fla"] = anchors["fla"] / row["ms"] if "fla" in anchors else float("nan")

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for system in sorted({r["system"] for r in rows if r["kind"] == "prefill"}):
            pts = [r for r in rows if r["system"] == system and r["kind"] == "prefill" and "varlen" not in r["case"]
                   and "KDA" not in r["case"]]
            ax.plot([r["T"] for r in pts], [r["T"] / r["ms"] * 1e3 for r in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"GDN chunked prefill ({torch.cuda.get_device_name() if CUDA else 'CPU'})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    command = "python benchmarks/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = write_results("kernels", rows, ["case", "system", "ms", "TFLOPs", "GBps", "roofline_frac",
                                         "vs_transformers", "vs_fla"], command.strip(), plot)
    print(f"\nroofline: copy {roof['copy_GBps']:.1f} GB/s, matmul {roof['matmul_TFLOPs']:.2f} TFLOP/s\n")
    print(md)


if __name__ == "__main__":
    main()
