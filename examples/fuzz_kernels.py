"""Fuzz graphdelta's kernels, and fla's when installed, against the float64 reference.

    python examples/fuzz_kernels.py [--examples 50] [--seed 0]

Each implementation gets hypothesis-drawn problems (odd lengths, GVA ratios, both layouts,
varlen, initial states, gates from 0 to -30, fp32/bf16/fp16) and is checked by relative error
against ``graphdelta.reference``. Without a GPU the Triton kernels run under
``TRITON_INTERPRET=1``, slowly, on small shapes. A failure prints the smallest failing case as
a snippet that reproduces it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50, help="problems per implementation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
    from graphdelta import fuzz

    names = ["chunk", "recurrent", "decode", "chunk-triton", "recurrent-triton", "decode-triton"]
    if importlib.util.find_spec("fla") is not None and torch.cuda.is_available():
        names.append("fla")
    failed = []
    for name in names:
        # Interpreted kernels cost milliseconds per program: fewer problems for them.
        n = args.examples if torch.cuda.is_available() or "triton" not in name else max(args.examples // 5, 3)
        if not fuzz.run(name, n, args.seed):
            failed.append(name)
    print("all implementations agree with the reference" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
