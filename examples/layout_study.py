"""kv vs vk: time the decode step in both recurrent-state layouts on this device.

    python examples/layout_study.py [--batches 1 8 64 256] [--repeats 50]

The state of a GDN/KDA layer is ``[HV, K, V]`` (kv, transformers' layout) or ``[HV, V, K]`` (vk,
which makes a decode tile's loads contiguous along K). Which is faster depends on the device
and the kernel; ``graphdelta.compile(state_layout="auto")`` measures one shape the same way.
Qwen3-Next shapes on a GPU (H=16, HV=32, K=V=128, bf16); smaller ones on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import graphdelta as gd


def step_time(B: int, H: int, HV: int, D: int, layout: str, dtype, device, repeats: int) -> float:
    """Median seconds of one decode step for B sequences of a pool of 2B slots."""
    q, k = (torch.randn(B, 1, H, D, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, 1, HV, D, device=device, dtype=dtype)
    g = -torch.rand(B, 1, HV, device=device).to(dtype)
    beta = torch.rand(B, 1, HV, device=device, dtype=dtype)
    pool = torch.zeros(2 * B, HV, D, D, device=device)
    slots = torch.arange(0, 2 * B, 2, device=device, dtype=torch.int32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 3):
        sync()
        start = time.perf_counter()
        gd.gated_delta_rule_decode(q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=True, state_layout=layout)
        sync()
        if i >= 3:  # warm-up (and Triton compilation) first
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    H, HV, D, dtype = (16, 32, 128, torch.bfloat16) if cuda else (4, 8, 64, torch.float32)
    batches = args.batches or ([1, 8, 64, 256] if cuda else [1, 8, 32])
    name = torch.cuda.get_device_name() if cuda else "CPU (PyTorch path)"
    print(f"decode step on {name}: H={H} HV={HV} K=V={D} {str(dtype).split('.')[1]}, median of {args.repeats}")
    print(f"{'batch':>6s} {'kv (us)':>10s} {'vk (us)':>10s} {'vk speedup':>11s}")
    for B in batches:
        kv, vk = (step_time(B, H, HV, D, layout, dtype, device, args.repeats) for layout in ("kv", "vk"))
        print(f"{B:6d} {kv * 1e6:10.1f} {vk * 1e6:10.1f} {kv / vk:10.2f}x")


if __name__ == "__main__":
    main()
