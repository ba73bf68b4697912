"""CPU benchmark of the chunked gated delta rule: graphdelta's PyTorch path against transformers'
``torch_chunk_gated_delta_rule``, side by side in one run.

    python benchmarks/ops_cpu.py [--lengths 1024 2048 4096] [--repeats 5]

Qwen3-Next shapes: B=1, H=16, HV=32, K=V=128, fp32. Writes ops_cpu.{json,md,png} to the results folder.
"""
from __future__ import annotations

import argparse
import sys

import torch

import graphdelta as gd
from graphdelta.fuzz import transformers_chunk
from common import median_time, write_results


def inputs(T: int, H: int = 16, HV: int = 32, D: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, T, H, D, generator=gen), torch.randn(1, T, H, D, generator=gen)
    v = torch.randn(1, T, HV, D, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, generator=gen))
    beta = torch.rand(1, T, HV, generator=gen)
    return q, k, v, g, beta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for T in args.lengths:
        q, k, v, g, beta = inputs(T)
        kw = dict(initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
        ours = median_time(lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, **kw), args.repeats)
        theirs = median_time(lambda: transformers_chunk(q, k, v, g, beta, **kw), args.repeats)
        o1, s1 = gd.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
        o2, s2 = transformers_chunk(q, k, v, g, beta, **kw)
        err = ((o1 - o2).norm() / o2.norm()).item()
        rows.append({"T": T, "transformers_s": theirs, "graphdelta_s": ours, "speedup": theirs / ours,
                     "tokens_per_s": T / ours, "rel_diff": err})
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
    md = write_results("ops_cpu", rows, ["T", "transformers_s", "graphdelta_s", "speedup", "tokens_per_s",
                                         "rel_diff"], command.strip(), plot)
    print(md)


if __name__ == "__main__":
    main()
