"""CPU benchmark of the chunked gated delta rule: graphdelta's PyTorch path against transformers'
``torch_chunk_gated_delta_rule``, side by side in one run.

    python benchmarks/ops_cpu.py [--lengths 1024 2048 4096] [--repeats 5] [--gate-scale 10]

Qwen3-Next shapes: B=1, H=16, HV=32, K=V=128, fp32. The gates are logsigmoid(N(0, 1)) (about
-0.8 per token) times ``--gate-scale``: 10 gives the steep gates of trained models (Qwen3-Next's
A = exp(A_log) of ~7, g ~ -10 per token), whose decays reach far below float32's normal range.
Writes ops_cpu.{json,md,png} (ops_cpu_gate<scale> for another scale) to the results folder.
"""
from __future__ import annotations

import argparse
import sys

import torch

import graphdelta as gd
from graphdelta.fuzz import transformers_chunk
from common import median_time, write_results


def inputs(T: int, H: int = 16, HV: int = 32, D: int = 128, seed: int = 0, gate_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, T, H, D, generator=gen), torch.randn(1, T, H, D, generator=gen)
    v = torch.randn(1, T, HV, D, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, generator=gen)) * gate_scale
    beta = torch.rand(1, T, HV, generator=gen)
    return q, k, v, g, beta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gate-scale", type=float, default=1.0, help="multiplies the log-decays (10: steep)")
    args = parser.parse_args(argv)
    rows = []
    for T in args.lengths:
        q, k, v, g, beta = inputs(T, gate_scale=args.gate_scale)
        kw = dict(initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
        ours = median_time(lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, **kw), args.repeats)
        theirs = median_time(lambda: transformers_chunk(q, k, v, g, beta, **kw), args.repeats)
        o1, s1 = gd.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
        o2, s2 = transformers_chunk(q, k, v, g, beta, **kw)
        err = ((o1 - o2).norm() / o2.norm()).item()
        rows.append({"T": T, "gate_scale": args.gate_scale, "transformers_s": theirs, "graphdelta_s": ours,
                     "speedup": theirs / ours, "tokens_per_s": T / ours, "rel_diff": err})
        print(rows[-1], flush=True)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("graphdelta_s", "graphdelta (torch path)"), ("transformers_s", "transformers reference")):
            ax.plot([r["T"] for r in rows], [r["T"] / r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("tokens / s")
        ax.set_title("chunk_gated_delta_rule, CPU fp32, H=16 HV=32 K=V=128")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    command = "python benchmarks/ops_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = "ops_cpu" if args.gate_scale == 1 else f"ops_cpu_gate{args.gate_scale:g}"
    md = write_results(name, rows, ["T", "gate_scale", "transformers_s", "graphdelta_s", "speedup",
                                    "tokens_per_s", "rel_diff"], command.strip(), plot)
    print(md)


if __name__ == "__main__":
    main()
