"""A what-if study: the batch-1 CPU decode step per token, if one compiled call made K tokens.

    python benchmarks/step_tokens_per_call.py [--config embedded|mid] [--per-call 1 2 4] [--window 64]

Multi-step decoding (vLLM's ``--num-scheduler-steps``) runs K greedy steps per call, each
feeding its argmax to the next inside the compiled graph, so that what a call costs once (the
runner's Python, the call into inductor's function, waking the OpenMP workers) is paid once per
K tokens. The runtime does not do this; this measures what it would save on the step itself.
For each K it compiles the batch-1 decode step of one attention window with
``HybridForward.forward`` unrolled K times (Dynamo reset, inductor's caches off and its C++
builds in a new temporary folder, so that ``compile_s`` is a first compile, as on a new
machine), checks its K tokens and logits against K single steps of the runtime's own step from
the same (zeroed) cache, stopping before any timing if they differ, then times the replays
(inductor's function called directly, as ``common.compare_step_variants`` does) in turns over
``--rounds`` rounds of ``--steps`` calls, after one untimed round.

Columns: ``ms_per_call``, ``ms_per_token`` (a call over K), ``vs_single`` (K=1's time per
token over this one's, the median over rounds), ``compile_s`` (the runner's construction
included), ``max_logit_diff`` (against the single steps; K=1 is that reference) and
``tokens_equal``. What a step costs for each of its ops (kernels, the buffers and views of each
op, barriers) does not shrink with K; only the per-call part does. Writes
step_tokens_per_call_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from common import add_step_arguments, parse_step_arguments, replayed_step, write_results


def unrolled(k: int):
    """The context in which a runner's decode steps make ``k`` greedy tokens per call: its
    forward runs the model ``k`` times on one-token steps, position by position, each on the
    previous one's argmax, and returns the ``k`` logits ``[N, k, V]``. Prefill is unchanged."""
    from graphdelta.runtime.forward import HybridForward

    if k == 1:
        return contextlib.nullcontext()
    base = HybridForward.forward

    def forward(self, tokens, batch, aux=None, last_only=False, writes=None):
        if batch.packed or tokens.shape[1] != 1:
            return base(self, tokens, batch, aux, last_only, writes)
        logits = []
        for j in range(k):  # each step's state writes land before the next step reads them
            logits.append(base(self, tokens, dataclasses.replace(batch, starts=batch.starts + j), aux))
            tokens = logits[-1][:, -1:].argmax(-1)
        return torch.cat(logits, 1)

    return mock.patch.object(HybridForward, "forward", forward)


def agree(k: int, got: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Raise, before anything is timed, unless a ``k``-token call's logits ``[1, k, V]`` give the
    single steps' tokens and logits (``reference`` ``[1, >= k, V]``) within ``tolerance``."""
    want = reference[:, :k]
    if got.shape != want.shape:
        raise RuntimeError(f"K={k}: the call gave logits of shape {tuple(got.shape)}, not {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not (diff <= tolerance and torch.equal(got.argmax(-1), want.argmax(-1))):
        raise RuntimeError(f"K={k}: the call's tokens {got.argmax(-1).tolist()} or logits (off by {diff:.3g}) "
                           f"differ from the single steps' {want.argmax(-1).tolist()}: not timed")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-call", type=int, nargs="+", default=[1, 2, 4], help="tokens per compiled call (K)")
    parser.add_argument("--window", type=int, default=64, help="the attention window of the compiled step")
    add_step_arguments(parser, pairs=None)

    def check(args) -> None:
        if any(k < 1 for k in args.per_call) or 1 not in args.per_call:
            parser.error(f"--per-call {args.per_call}: each must be at least 1, and 1 (the runtime's step) among them")
        if args.window <= max(args.per_call):
            parser.error(f"--window {args.window}: must exceed the largest --per-call {max(args.per_call)}")

    args, model = parse_step_arguments(parser, argv, check)
    from graphdelta.runtime.layers import ModelSpec

    limit = ModelSpec.of_model(model).max_positions
    if limit is not None and args.window > limit:
        parser.error(f"--window {args.window}: past the model's max_position_embeddings={limit}")
    ks = sorted(set(args.per_call))
    # every K's tokens lie inside the window: positions start .. start + K - 1
    start = torch.full((1,), args.window - max(ks))
    replays, compile_s, logits, reference = {}, {}, {}, None
    with (tempfile.TemporaryDirectory(prefix="graphdelta-step-k-") as builds,
          mock.patch.dict(os.environ, TORCHINDUCTOR_CACHE_DIR=builds), torch.no_grad(),
          torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        for k in ks:
            torch._dynamo.reset()
            began = time.perf_counter()
            with unrolled(k):
                _, replay, (token, slot, _) = replayed_step(model, args.window, f"{k}-token")
            compile_s[k] = time.perf_counter() - began
            replays[k] = replay
            if k == 1:  # the reference: max(ks) single steps from the zeroed cache
                rows, t = [], token
                for j in range(max(ks)):
                    rows.append(replay(t, slot, start + j)[:, -1].clone())
                    t = rows[-1].argmax(-1, keepdim=True)
                reference = torch.stack(rows, 1)
                logits[k] = reference[:, :1]
            else:
                logits[k] = replay(token, slot, start).clone()
                agree(k, logits[k], reference)
            print(f"K={k}: compiled in {compile_s[k]:.1f} s", flush=True)
        times: dict[int, list[float]] = {k: [] for k in ks}
        for replay in replays.values():  # warm, untimed
            for _ in range(args.steps):
                replay(token, slot, start)
        for r in range(args.rounds):
            for k in ks if r % 2 == 0 else ks[::-1]:
                replay = replays[k]
                began = time.perf_counter()
                for _ in range(args.steps):
                    replay(token, slot, start)
                times[k].append((time.perf_counter() - began) / args.steps * 1e3)
    rows = []
    for k in ks:
        ref = reference[:, :k]
        per_token = [t / k for t in times[k]]
        rows.append({"config": args.config, "window": args.window, "per_call": k,
                     "ms_per_call": statistics.median(times[k]), "ms_per_token": statistics.median(per_token),
                     "vs_single": statistics.median(a / b for a, b in zip(times[1], per_token)),
                     "compile_s": compile_s[k], "max_logit_diff": float((logits[k] - ref).abs().max()),
                     "tokens_equal": bool(torch.equal(logits[k].argmax(-1), ref.argmax(-1)))})
        print(rows[-1], flush=True)

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        bars = ax.bar([str(r["per_call"]) for r in rows], [r["ms_per_token"] for r in rows])
        for bar, row in zip(bars, rows):
            ax.annotate(f"compile {row['compile_s']:.0f} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("tokens per compiled call (K)")
        ax.set_ylabel("ms per token (the step alone)")
        ax.set_title(f"{args.config}: batch-1 decode step, window {args.window}")
        fig.tight_layout()
        fig.savefig(path)

    command = "python benchmarks/step_tokens_per_call.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "window", "per_call", "ms_per_call", "ms_per_token", "vs_single", "compile_s",
               "max_logit_diff", "tokens_equal"]
    print(write_results(f"step_tokens_per_call_{args.config}", rows, columns, command.strip(), plot))


if __name__ == "__main__":
    main()
