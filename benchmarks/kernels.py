"""Kernel benchmark: chunked prefill (GDN and KDA) and the decode step, against the measured
roofline of the device, side by side with transformers' reference and fla (when installed).

    python benchmarks/kernels.py                 # GPU: Qwen3-Next / Kimi Linear shapes, bf16
    python benchmarks/kernels.py --quick         # small shapes (the CPU smoke run)
    python benchmarks/kernels.py --sweep         # also the decode tile sweep (BV x warps)

Prefill: H=16, HV=32, K=V=128 (Qwen3-Next, Qwen3.5) for T = 4096 .. 32768 and varlen 8x4096;
KDA at H=HV=32. Decode: batch 1, 64, 256 over a float32 state pool, in both layouts, timed as
the replay of a captured CUDA graph of the unchecked op (a runtime step's cost: no launch gaps,
no input checks), with the tile sweep at each batch. The roofline (copy bandwidth, bf16 matmul
on random data) is measured in the same run. GPU timings are CUDA-event medians
(``triton.testing.do_bench``). Writes kernels.{json,md,png} to the results folder
(``common.results_dir()``, which GRAPHDELTA_BENCH_RESULTS moves).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass

import torch

import graphdelta  # noqa: F401 (registers torch.ops.graphdelta)
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


def seconds(fn, repeats: int) -> float:
    """Median time of ``fn()``: CUDA events on a GPU (``do_bench``, after its warm-up), else
    the host clock."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(repeats * 5, 50), return_mode="median") / 1e3
    return median_time(fn, repeats=repeats)


def measure_roofline(dtype: torch.dtype) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and matmul rate, on
    random data (zeros multiply faster)."""
    n = (1 << 30) if CUDA else (1 << 24)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_s = seconds(lambda: dst.copy_(src), repeats=10)
    m = 8192 if CUDA else 1024
    a, b = (torch.randn(m, m, dtype=dtype, device=DEVICE) for _ in range(2))
    mm_s = seconds(lambda: a @ b, repeats=10)
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
    # the unchecked op, as the runtime calls it (the public function reads cu_seqlens on the host)
    out = {"graphdelta": lambda q, k, v, g, b, cu: torch.ops.graphdelta.chunk_gated_delta_rule(
        q, k, v, g, b, q.shape[-1] ** -0.5, None, cu, True, "kv")}
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
            s = seconds(lambda: fn(*args), repeats=repeats)
            rows.append({"kind": "prefill", "case": case.name, "system": system, "T": case.T, "ms": s * 1e3,
                         "TFLOPs": flops / s / 1e12, "GBps": bytes_ / s / 1e9,
                         "roofline_frac": max(flops / s / 1e12 / roof["matmul_TFLOPs"],
                                              bytes_ / s / 1e9 / roof["copy_GBps"])})
            print(rows[-1], flush=True)
    return rows


def replayed(step, graphs: bool):
    """``step`` as a callable to time: the replay of a CUDA graph capturing it (after two
    warm-up calls that compile its kernels) on a GPU; itself elsewhere."""
    if not graphs:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def decode_inputs(B: int, dtype, H: int = 16, HV: int = 32, D: int = 128):
    gen = torch.Generator(device=DEVICE).manual_seed(B)
    q, k = (torch.randn(B, 1, H, D, generator=gen, device=DEVICE, dtype=dtype) for _ in range(2))
    v = torch.randn(B, 1, HV, D, generator=gen, device=DEVICE, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, 1, HV, generator=gen, device=DEVICE) + 3).to(dtype)
    beta = torch.rand(B, 1, HV, generator=gen, device=DEVICE, dtype=dtype)
    return q, k, v, g, beta


def decode_tiles(sweep: bool, layout: str) -> list[tuple[int, int]]:
    """(BV, warps) of the decode kernel in ``layout``: the default, or the sweep's grid."""
    from graphdelta.lowering import triton_recurrent as tr

    if not sweep:
        return [tr.DECODE_TILE[layout]]
    return [(bv, w) for bv in (8, 16, 32, 64) for w in (1, 2, 4, 8)]


def bench_decode(batches: list[int], dtype, roof: dict, repeats: int, sweep: bool, HV=32, H=16, D=128) -> list[dict]:
    """The decode op on a pool (slots spread over twice the batch), replayed from a CUDA graph."""
    from graphdelta.lowering import triton_recurrent as tr

    rows = []
    for B in batches:
        q, k, v, g, beta = decode_inputs(B, dtype, H, HV, D)
        el = torch.finfo(dtype).bits // 8
        bytes_ = 2 * B * HV * D * D * 4 + el * B * (2 * H * D + 2 * HV * D + 2 * HV)
        for layout in ("kv", "vk"):
            pool = 0.1 * torch.randn(2 * B, HV, D, D, device=DEVICE)
            slots = torch.arange(0, 2 * B, 2, device=DEVICE, dtype=torch.int32)
            default = tr.DECODE_TILE[layout]
            for bv, warps in decode_tiles(sweep, layout):
                tr.DECODE_TILE[layout] = (bv, warps)  # read at each launch
                try:
                    step = replayed(lambda: torch.ops.graphdelta.gated_delta_rule_decode(
                        q, k, v, g, beta, pool, slots, D ** -0.5, True, layout, False), CUDA)
                    s = seconds(step, repeats)
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row too
                    print(f"decode B={B} {layout} BV={bv} warps={warps}: {type(e).__name__}: {e}", flush=True)
                    continue
                finally:
                    tr.DECODE_TILE[layout] = default
                tag = "" if (bv, warps) == default else f" BV={bv} w={warps}"
                rows.append({"kind": "decode", "case": f"decode B={B} {layout}{tag}",
                             "system": f"graphdelta-{layout}", "T": B, "BV": bv, "warps": warps,
                             "ms": s * 1e3, "TFLOPs": 0.0, "GBps": bytes_ / s / 1e9,
                             "roofline_frac": bytes_ / s / 1e9 / roof["copy_GBps"]})
                print(rows[-1], flush=True)
        if importlib.util.find_spec("fla") is not None and CUDA:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            h0 = 0.1 * torch.randn(B, HV, D, D, device=DEVICE)
            try:
                step = replayed(lambda: fused_recurrent_gated_delta_rule(
                    q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True), CUDA)
                s = seconds(step, repeats)
                rows.append({"kind": "decode", "case": f"decode B={B} kv", "system": "fla", "T": B, "ms": s * 1e3,
                             "TFLOPs": 0.0, "GBps": bytes_ / s / 1e9,
                             "roofline_frac": bytes_ / s / 1e9 / roof["copy_GBps"]})
                print(rows[-1], flush=True)
            except Exception as e:  # noqa: BLE001 - fla's version may not fit this torch
                print(f"fla decode B={B}: {type(e).__name__}: {e}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (default without a GPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="decode tile sweep: BV in 8..64 x warps in 1..8")
    parser.add_argument("--max-T", type=int, default=32768, help="longest prefill")
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
        cases = [Case(f"GDN T={T}", T, 16, 32) for T in (4096, 8192, 16384, 32768) if T <= args.max_T]
        cases += [Case("GDN varlen 8x4096", 8 * 4096, 16, 32, seqs=8), Case("KDA T=8192", 8192, 32, 32, per_channel=True)]
        batches = [1, 64, 256]
    # decode first: it is quick, and a run cut short (the GPU kit's time cap) keeps it
    decode = bench_decode(batches, dtype, roof, repeats, args.sweep)
    rows = bench_prefill(cases, dtype, roof, repeats) + decode
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
    for row in rows:
        row.setdefault("BV", "")
        row.setdefault("warps", "")
    md = write_results("kernels", rows, ["case", "system", "ms", "TFLOPs", "GBps", "roofline_frac",
                                         "vs_transformers", "vs_fla"], command.strip(), plot)
    print(f"\nroofline: copy {roof['copy_GBps']:.1f} GB/s, matmul {roof['matmul_TFLOPs']:.2f} TFLOP/s\n")
    print(md)


if __name__ == "__main__":
    main()
