"""Where a decoded token's time goes, end to end, CPU: ``graphdelta.generate`` per step after
the first token, ``Runner.decode`` per step (greedy argmax, no streaming), the same with the
step's inputs built per step (as before the runner kept them in place), the compiled step alone
(``Runner._run``: no validation, no cache bookkeeping), that step called through Dynamo
instead of replayed (graphdelta/runtime/replay.py), and ``Runner.decode`` with every replayed
step answered by its first result again (the runner's own Python per token: validation, the
replay's checks, kept inputs, cache bookkeeping; only each step shape's first step runs, and a
step that is not replayed runs every time). The differences are the
per-token overhead of generate, of the runner around the step, and of Dynamo.

    python benchmarks/token_overhead.py [--tokens 200] [--rounds 5] [--threads 2]
    python benchmarks/token_overhead.py --config mid --experts batched_mm
    python benchmarks/token_overhead.py --config mid --batch 4

``--batch``: sequences decoded together (the same prompt each); a step then makes one token for
each, and the table's ms_per_token is per step, tokens_per_s counts every sequence's tokens.

``--config``: ``embedded`` (the shipped trained tiny Qwen3-Next) or ``mid`` (hidden 1024, 8
layers, random weights, the dimensions of benchmarks/llamacpp.py's). ``--experts``: the MoE
dispatch of the compiled steps (default: the runner's own choice). Dispatches are compared in
separate runs, one after the other: two runners' compiled steps in one process share Dynamo's
frame, and a runner skips guard evaluation only while the frame's entries are its own. Each
round times the six in turn (the step-not-run row first); the table gives medians of the rounds. Writes
token_overhead.{json,md} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import write_results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--config", default="embedded", choices=["embedded", "mid"])
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--experts", default=None,
                        help="MoE dispatch of the compiled steps (default: the runner's choice)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: must be at least 1")
    if args.experts is not None:  # checked before the slow part
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        known = ["eager", *ALL_EXPERTS_FUNCTIONS]
        if args.experts not in known:
            parser.error(f"--experts {args.experts!r}: not one of transformers' experts functions {known}")
    torch.set_num_threads(args.threads)

    import graphdelta
    from graphdelta.runtime.generate import generate
    from graphdelta.runtime.replay import Replay
    from graphdelta.runtime.runner import Runner

    model, tokenizer = graphdelta.assets.load_default_model()
    ids = tokenizer("import os\n\n\ndef ", return_tensors="pt").input_ids
    if args.config == "mid":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import models

        model = models.build("qwen3_next", hidden=1024, layers=8)  # vocabulary 512: holds the prompt's ids
    compiled = graphdelta.compile(model)
    N, B = args.tokens, args.batch
    prompts = ids.expand(B, -1)
    runner = Runner(compiled, max_seqs=B, max_len=ids.shape[1] + N + 1, compile_steps=True, max_batch=B)
    runner.experts = args.experts or runner.experts
    generate(compiled, prompts, max_new_tokens=N, eos_token_id=[], runner=runner, max_batch=B)  # compiles the steps
    times: dict[str, list[float]] = {"generate": [], "Runner.decode": [], "Runner.decode, inputs built per step": [],
                                     "compiled step": [], "compiled step through Dynamo": [],
                                     "Runner.decode, step not run": []}
    with torch.no_grad():  # as the runner's steps run (Dynamo guards on grad mode)
        for rnd in range(args.rounds):
            firsts: list[float] = []  # when the first tokens came (the prompt's prefill is not timed)
            stream = lambda i, token: len(firsts) < B and firsts.append(time.perf_counter())  # noqa: E731
            generate(compiled, prompts, max_new_tokens=N, eos_token_id=[], runner=runner, max_batch=B, stream=stream)
            times["generate"].append((time.perf_counter() - firsts[-1]) / (N - 1))

            def decode() -> tuple[float, torch.Tensor, list[int], int]:
                """Greedy decode steps, as generate's (the experts a token picks change with
                it): seconds per step, the last logits, the (freed) slots and their length."""
                slots = [runner.allocate() for _ in range(B)]
                logits = runner.prefill(slots, [ids[0].tolist()] * B)
                start = time.perf_counter()
                for _ in range(N - 1):
                    logits = runner.decode(slots, logits.argmax(-1).tolist())
                took = (time.perf_counter() - start) / (N - 1)
                position = runner.cache.length(slots[0])
                for slot in slots:
                    runner.free(slot)
                return took, logits, slots, position

            def built() -> float:
                """The same with the step's inputs built per step, as before the runner kept
                them (runner._HostInputs): held inputs make each step build its own."""
                kept = [inputs for inputs in runner._host_inputs.values() if inputs is not None]
                for inputs in kept:
                    inputs._lock.acquire()
                try:
                    return decode()[0]
                finally:
                    for inputs in kept:
                        inputs._lock.release()

            def bookkeeping() -> float:
                """``decode`` with each replay answering its first result again (the same
                tokens each step: the Python around the step, not the step)."""
                answers: dict = {}
                call = Replay.__call__

                def answered(replay, *inputs):
                    if replay not in answers:
                        answers[replay] = call(replay, *inputs)
                    return answers[replay]

                Replay.__call__ = answered
                try:
                    return decode()[0]
                finally:
                    Replay.__call__ = call

            times["Runner.decode, step not run"].append(bookkeeping())
            if rnd % 2:  # which of the two goes first alternates between rounds
                times["Runner.decode, inputs built per step"].append(built())
            took, logits, slots, position = decode()
            times["Runner.decode"].append(took)
            if not rnd % 2:
                times["Runner.decode, inputs built per step"].append(built())

            # The step on free slots' rows, at the window of the last decode: what the runner
            # calls, without its checks and bookkeeping (the slots' states are scratch now). One
            # token over and over: its experts stay in cache, so this understates a real step.
            tokens, slots = logits.argmax(-1)[:, None], torch.tensor(slots)
            starts = torch.full((B,), position - 1)
            window = runner._window(position)
            start = time.perf_counter()
            for _ in range(N):
                runner._run(tokens, slots, starts, window, False)
            times["compiled step"].append((time.perf_counter() - start) / N)

            # The same step through Dynamo (guards skipped), as before replays (replay.py):
            # what calling inductor's compiled function directly saves.
            replays = dict(runner._replays)
            runner._replays.clear()
            try:
                start = time.perf_counter()
                for _ in range(N):
                    runner._run(tokens, slots, starts, window, False)
                times["compiled step through Dynamo"].append((time.perf_counter() - start) / N)
            finally:
                runner._replays.update(replays)
    rows = [{"config": args.config, "batch": B, "experts": runner.experts, "what": name,
             "ms_per_token": statistics.median(t) * 1e3, "tokens_per_s": B / statistics.median(t)}
            for name, t in times.items()]
    for row in rows:
        print(row, flush=True)
    command = "python benchmarks/token_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["config", "batch", "experts", "what", "ms_per_token", "tokens_per_s"]
    print(write_results("token_overhead", rows, columns, command.strip()))


if __name__ == "__main__":
    main()
