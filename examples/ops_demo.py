"""Op-level demo: graphdelta's gated delta rule on a Qwen3-Next-shaped layer, checked against
the float64 reference and timed next to transformers' PyTorch implementation.

    python examples/ops_demo.py [--T 2048]
"""
from __future__ import annotations

import argparse
import time

import torch

import graphdelta as gd
from graphdelta.testing import ProblemSpec, relative_error


def timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=2048, help="tokens in the timed prompt")
    args = parser.parse_args(argv)

    print("1. correctness against the float64 reference (GDN and KDA, GVA 2, varlen, both layouts)")
    for spec in (
        ProblemSpec(B=2, T=130, H=2, group=2, K=32, V=32, initial_state=True),
        ProblemSpec(B=1, T=130, H=2, group=2, K=32, V=32, seqlens=(1, 64, 65), per_channel_gate=True,
                    state_layout="vk", initial_state=True, l2norm_in_kernel=True),
        ProblemSpec(B=2, T=65, H=1, group=4, K=64, V=32, dtype="bfloat16", gate="steep"),
    ):
        p = spec.build()
        o, s = gd.chunk_gated_delta_rule(**p.kwargs())
        ref_o, ref_s = p.reference()
        gate = "KDA" if spec.per_channel_gate else "GDN"
        print(f"   {gate} {spec.dtype:8s} T={spec.T} seqlens={spec.seqlens} layout={spec.state_layout}: "
              f"relative error output {relative_error(o, ref_o):.1e}, state {relative_error(s, ref_s):.1e}")

    print(f"\n2. one Qwen3-Next linear-attention layer's recurrence, T={args.T} (H=16, HV=32, K=V=128, fp32)")
    from graphdelta.fuzz import transformers_chunk  # transformers' torch_chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(0)
    T = args.T
    q, k = torch.randn(1, T, 16, 128, generator=gen), torch.randn(1, T, 16, 128, generator=gen)
    v = torch.randn(1, T, 32, 128, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, 32, generator=gen))
    beta = torch.rand(1, T, 32, generator=gen)
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    ours = timed(lambda: gd.chunk_gated_delta_rule(q, k, v, g, beta, **kw))
    theirs = timed(lambda: transformers_chunk(q, k, v, g, beta, **kw))
    diff = relative_error(gd.chunk_gated_delta_rule(q, k, v, g, beta, **kw)[0],
                          transformers_chunk(q, k, v, g, beta, **kw)[0])
    print(f"   transformers torch_chunk_gated_delta_rule: {theirs * 1e3:8.1f} ms")
    print(f"   graphdelta chunk_gated_delta_rule:         {ours * 1e3:8.1f} ms  ({theirs / ours:.2f}x)")
    print(f"   outputs agree to {diff:.1e} (relative)")

    print("\n3. under torch.compile the op is one graph node, for every prompt length")
    graphs = []

    def backend(gm, _):
        graphs.append(gm)
        return gm.forward

    layer = torch.compile(lambda *a: gd.chunk_gated_delta_rule(*a, use_qk_l2norm_in_kernel=True)[0],
                          backend=backend, dynamic=True, fullgraph=True)
    for length in (100, 130, 200, 250):
        layer(q[:, :length], k[:, :length], v[:, :length], g[:, :length], beta[:, :length])
    ops = [str(n.target) for n in graphs[0].graph.nodes if str(n.target).startswith("graphdelta.")]
    print(f"   4 prompt lengths -> {len(graphs)} graph(s), holding {ops}")


if __name__ == "__main__":
    main()
