"""The runtime's CUDA-graph decode on a GPU: step 4 of ``tools/gpu_check.sh``.

On the shipped tiny Qwen3-Next (a MoE model):

1. **Replay equals eager.** A ``Runner`` replaying CUDA graphs against one running the same steps
   eagerly: greedy tokens equal, logits close, while sequences join and leave and the longest
   one crosses the 64 -> 128 attention-window bucket (one capture per (batch, window) bucket
   used, cache addresses unchanged).
2. **MoE dispatch per device.** In bf16, the captured step with ``grouped_mm`` and with
   ``batched_mm`` (``experts_implementation`` picks the first on Hopper): logits against the
   eager step, and the time per replayed step.
3. **Time per step**, replay against eager, at batch 1, 8 and 32.
4. **Sampling on the device**: seeded ``graphdelta.generate`` repeats itself.
5. **A second GPU** (``cuda:1``), when there is one: the same steps, on that device.

    python tools/gpu_replay.py                  # a GPU
    python tools/gpu_replay.py --device cpu     # the dry run: eager steps only, no timing claims

Prints one line per check (``ok`` / ``FAIL``) and a count last (``--json``: the numbers); exits 1 on a
failure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from graphdelta.assets import load_default_model
from graphdelta.runtime import Runner
from graphdelta.runtime.generate import generate

PROMPTS = [40, 9, 60]  # tokens; the first crosses 64 after 24 steps, into the 128 bucket
STEPS = 30
ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy_run(runner: Runner, lengths: list[int], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Prefill the prompts (the third joins after 5 steps), decode greedily; the first sequence
    leaves 5 steps before the end. Returns each sequence's tokens and every step's logits."""
    texts = prompts(lengths, runner.vocab)
    slots = [runner.allocate() for _ in texts]
    logits = runner.prefill(slots[:2], texts[:2])
    live, out, seen = slots[:2], [[] for _ in texts], []
    for step in range(steps):
        if step == 5:
            live = live + slots[2:]
            logits = torch.cat([logits, runner.prefill(slots[2:], texts[2:])])
        if step == steps - 5:
            runner.free(live[0])
            live, logits = live[1:], logits[1:]
        nxt = logits.argmax(-1)
        for slot, token in zip(live, nxt.tolist()):
            out[slots.index(slot)].append(token)
        logits = runner.decode(live, nxt)
        seen.append(torch.nn.functional.pad(logits.float(), (0, 0, 3 - len(live), 0)))
    for slot in live:
        runner.free(slot)
    return out, torch.stack(seen)


def report(name: str, ok: bool, detail: str, results: dict) -> None:
    results[name] = {"ok": ok, "detail": detail}
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def replay_equals_eager(model, device: torch.device, results: dict) -> None:
    graphs = device.type == "cuda"
    static = Runner(model, max_seqs=4, max_len=256, cuda_graphs=graphs)
    eager = Runner(model, max_seqs=4, max_len=256, cuda_graphs=False)
    addresses = static.cache.addresses()
    tokens_s, logits_s = greedy_run(static, PROMPTS, STEPS)
    tokens_e, logits_e = greedy_run(eager, PROMPTS, STEPS)
    err = (logits_s - logits_e).abs().max().item()
    tol = ATOL[next(model.parameters()).dtype]
    windows = sorted({key[3] for key in static._graphs})
    detail = f"max |logit diff| {err:.2e} (tol {tol:g}), graphs {sorted(static._graphs)}"
    ok = tokens_s == tokens_e and err <= tol and static.cache.addresses() == addresses
    if graphs:
        ok = ok and windows == [64, 128]
    report(f"replay equals eager ({device})", ok, detail, results)


def time_steps(runner: Runner, batch: int, steps: int = 20) -> float:
    """Median seconds per decode step of ``batch`` sequences (after a warm-up step)."""
    slots = [runner.allocate() for _ in range(batch)]
    logits = runner.prefill(slots, prompts([8] * batch, runner.vocab, seed=batch))
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 1):
        nxt = logits.argmax(-1)
        sync()
        start = time.perf_counter()
        logits = runner.decode(slots, nxt)
        sync()
        if i:
            times.append(time.perf_counter() - start)
    for slot in slots:
        runner.free(slot)
    return statistics.median(times)


def step_times(model, device: torch.device, results: dict) -> None:
    rows = []
    for batch in (1, 8, 32):
        static = Runner(model, max_seqs=batch, max_len=128, cuda_graphs=device.type == "cuda")
        eager = Runner(model, max_seqs=batch, max_len=128, cuda_graphs=False)
        t_static, t_eager = time_steps(static, batch), time_steps(eager, batch)
        rows.append({"batch": batch, "replay_us": t_static * 1e6, "eager_us": t_eager * 1e6})
    static = "replayed" if device.type == "cuda" else "eager (no CUDA graphs here)"
    detail = ", ".join(f"B={r['batch']}: {r['replay_us']:.0f} us {static} / {r['eager_us']:.0f} us eager" for r in rows)
    report(f"step time ({device})", True, detail, results)
    results["step_times"] = rows


def sampling_on_device(model, device: torch.device, results: dict) -> None:
    """``graphdelta.generate`` samples on the model's device with a seeded generator there:
    the same seed gives the same tokens, every token in the vocabulary."""
    texts = prompts([5, 11], model.config.vocab_size, seed=7)
    runs = [generate(model, texts, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3, max_batch=2)
            for _ in range(2)]
    vocab = model.config.vocab_size
    ok = runs[0] == runs[1] and all(0 <= t < vocab for seq in runs[0] for t in seq)
    report(f"sampling on the device ({device})", ok, f"tokens {runs[0][0][:6]}..., repeatable {runs[0] == runs[1]}",
           results)


def first_step(runner: Runner, texts: list[list[int]]) -> torch.Tensor:
    """The logits of one decode step after prefilling ``texts`` (slots freed after)."""
    slots = [runner.allocate() for _ in texts]
    logits = runner.decode(slots, runner.prefill(slots, texts).argmax(-1)).float()
    for slot in slots:
        runner.free(slot)
    return logits


def moe_dispatch(device: torch.device, results: dict) -> None:
    """The captured bf16 step under each MoE dispatch, against the eager step."""
    model, _ = load_default_model(torch.bfloat16, device)
    texts = prompts([12] * 8, model.config.vocab_size, seed=3)
    eager = first_step(Runner(model, max_seqs=8, max_len=128, cuda_graphs=False), texts)
    chosen = Runner(model, max_seqs=8, max_len=128).experts
    rows = []
    for impl in ("batched_mm", "grouped_mm"):
        static = Runner(model, max_seqs=8, max_len=128, cuda_graphs=device.type == "cuda")
        static.experts = impl
        how = "captured step" if device.type == "cuda" else "step (eager here: the switch is unused)"
        name = f"MoE {impl} {how} ({device}, bf16{', chosen' if impl == chosen else ''})"
        try:
            err = (first_step(static, texts) - eager).abs().max().item()
            seconds = time_steps(static, 8)
        except Exception as e:  # noqa: BLE001 - a dispatch that cannot be captured is an answer
            report(name, impl != chosen, f"{type(e).__name__}: {e}"[:300], results)
            continue
        rows.append({"experts": impl, "max_abs_diff": err, "step_us": seconds * 1e6})
        report(name, err <= ATOL[torch.bfloat16], f"max |logit diff| {err:.2e}, {seconds * 1e6:.0f} us per "
               "step at batch 8", results)
    results["moe"] = {"chosen": chosen, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results: dict = {}
    start = time.perf_counter()
    model, _ = load_default_model(torch.float32, device)
    # in the docstring's order, each announced with the seconds so far, so that a run stopped at
    # the kit's cap shows where its time went
    with torch.no_grad():
        steps = [("replay equals eager", lambda: replay_equals_eager(model, device, results)),
                  ("MoE dispatch", lambda: moe_dispatch(device, results)),
                  ("step time", lambda: step_times(model, device, results)),
                  ("sampling", lambda: sampling_on_device(model, device, results))]
        for name, check in steps:
            print(f"-- {name}, at +{time.perf_counter() - start:.0f} s", flush=True)
            check()
        if device.type == "cuda" and torch.cuda.device_count() > 1:
            second = torch.device("cuda", 1)
            replay_equals_eager(model.to(second), second, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    checks = {name: r for name, r in results.items() if isinstance(r, dict) and "ok" in r}
    failed = [name for name, r in checks.items() if not r["ok"]]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks ok" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
