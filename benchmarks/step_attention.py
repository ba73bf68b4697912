"""Compiled CPU decode steps: attention through SDPA against attention as reductions.

    python benchmarks/step_attention.py [--config embedded|mid] [--windows 64 512] [--pairs 2]

A compiled CPU decode step writes its attention as reductions (``forward.one_query_attention``),
which inductor fuses into the step's C++; before, it called ``F.scaled_dot_product_attention``,
which stays an ATen call between two generated kernels. This compiles the batch-1 decode step
of each attention window both ways, "sdpa" (``one_query_attention`` swapped for the SDPA call
while that runner compiles) and "reductions" (the runtime as it is), checks that their logits
agree, and times their replays in turns (``common.compare_step_variants``: the method, the
table's columns).
Writes step_attention_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

from common import compare_step_variants, parse_window_step_arguments


def sdpa_attention(q, keys, values, mask, scale):
    """The runtime's attention before: ``F.scaled_dot_product_attention`` (same arguments as
    ``one_query_attention``)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask.unsqueeze(1),
        scale=scale, enable_gqa=q.shape[2] != keys.shape[1])
    return o.transpose(1, 2)


def main(argv=None) -> None:
    args, model = parse_window_step_arguments(__doc__, argv)

    from graphdelta.runtime import forward

    def sdpa():
        return mock.patch.object(forward, "one_query_attention", sdpa_attention)

    variants = {"sdpa": sdpa, "reductions": contextlib.nullcontext}
    print(compare_step_variants(args, model, args.windows, variants, "step_attention.py",
                                "compiled CPU decode step, batch 1", argv=argv))


if __name__ == "__main__":
    main()
