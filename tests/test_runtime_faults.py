"""The runtime under faults and misuse: a step that raises part-way commits nothing (or leaves
its slots refusing use until restored), verify's pending data does not outlive the slots it
was taken on, snapshots stay in their cache, plans past the model's positions or the free
memory are refused before allocating, a NaN request cannot reach another sequence, and the
MoE switch of compiled steps is safe across threads. Tiny fp32 Qwen3-Next on CPU."""
import os
import re
import threading
import time

import pytest
import torch

import graphdelta
from graphdelta.runtime import Runner
from graphdelta.runtime.cache import SlotFailedError
from graphdelta.runtime.forward import Writes, static_experts
from graphdelta.runtime.generate import generate

from models import build, tokens

ATOL = 2e-5


@pytest.fixture(scope="module")
def qwen():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build("qwen3_next")
    torch.set_num_threads(threads)  # (a serial run goes on to other files)


def reference(model, history: list[int]) -> torch.Tensor:
    """transformers' logits at the last token of ``history``, from scratch."""
    with torch.no_grad():
        return model(torch.tensor(history)[None], use_cache=False).logits[0, -1]


def buffers(runner: Runner) -> list[torch.Tensor]:
    return [t.clone() for t in runner.cache.conv + runner.cache.state]


class Boom(Exception):
    pass


def raise_in_layer(model, index: int, error: type[BaseException] = Boom):
    """A hook that makes layer ``index``'s MLP raise (after the layers before it ran)."""
    def hook(module, args):
        raise error(f"injected in layer {index}")

    return model.model.layers[index].mlp.register_forward_pre_hook(hook)


# ----------------------------------------------------------------------------- atomic steps


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("call", ["prefill", "decode", "verify"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_step_that_raises_part_way_changes_nothing_and_a_retry_matches_transformers(qwen, layer, call, error):
    """Layer 3 raises after three linear layers computed their new states: the eager step held
    them back (``Writes``), so the slots are as before, and the retried step gives
    transformers' logits."""
    runner = Runner(qwen, max_seqs=3, max_len=48)
    a, b = runner.allocate(), runner.allocate()
    prompts = [tokens(7, seed=1)[0].tolist(), tokens(9, seed=2)[0].tolist()]
    runner.prefill([a, b], prompts)
    before = buffers(runner)
    new = {"prefill": [[5, 6, 7], [8]], "decode": [[5], [8]], "verify": [[5, 6], [8, 9]]}[call]

    def run():
        if call == "prefill":
            return [x for x in runner.prefill([a, b], new)]
        if call == "decode":
            return list(runner.decode([a, b], [t[0] for t in new]))
        return [x[-1] for x in runner.verify([a, b], torch.tensor(new))]

    handle = raise_in_layer(qwen, layer, error)
    try:
        with pytest.raises(error, match=f"injected in layer {layer}"):
            run()
    finally:
        handle.remove()
    assert [runner.cache.length(s) for s in (a, b)] == [7, 9]
    assert runner.cache.failed(a) is None and runner.cache.failed(b) is None
    assert all(torch.equal(x, y) for x, y in zip(before, buffers(runner)))
    for logits, prompt, piece in zip(run(), prompts, new):
        torch.testing.assert_close(logits, reference(qwen, prompt + piece), atol=ATOL, rtol=0)


def test_a_step_that_fails_while_writing_marks_its_slots_until_restored_or_freed(qwen, monkeypatch):
    """Out of memory after the first layer's new state reached its pool: the step cannot be
    undone for free, so its slots refuse use with a clear error, until a snapshot is restored
    (then the retry matches transformers), the slot is truncated to 0 or freed."""
    runner = Runner(qwen, max_seqs=3, max_len=48)
    a, b, c = runner.allocate(), runner.allocate(), runner.allocate()
    prompt = tokens(7, seed=1)[0].tolist()
    runner.prefill([a, b, c], [prompt, prompt, prompt])
    snap = runner.cache.snapshot(a)
    apply = Writes.apply

    def apply_one_then_fail(self):
        self.started = True
        pool, rows, values = self.pending[0]
        pool.index_copy_(0, rows, values)
        raise torch.OutOfMemoryError("injected while writing")

    monkeypatch.setattr(Writes, "apply", apply_one_then_fail)
    with pytest.raises(torch.OutOfMemoryError):
        runner.decode([a, b, c], [5, 5, 5])
    monkeypatch.setattr(Writes, "apply", apply)
    assert runner.cache.length(a) == 7  # the attention part never advanced
    message = "slot 0 is unusable: a decode step on slots [0, 1, 2] raised OutOfMemoryError part-way"
    for use in (lambda: runner.decode([a], [5]), lambda: runner.prefill([a], [[5]]),
                lambda: runner.verify([a], torch.tensor([[5, 6]])), lambda: runner.cache.snapshot(a),
                lambda: runner.cache.fork(a)):
        with pytest.raises(SlotFailedError, match=re.escape(message)):
            use()
    runner.cache.restore(snap)
    torch.testing.assert_close(runner.decode([a], [5])[0], reference(qwen, prompt + [5]), atol=ATOL, rtol=0)
    runner.cache.truncate(b, 0)
    torch.testing.assert_close(runner.prefill([b], [prompt])[0], reference(qwen, prompt), atol=ATOL, rtol=0)
    runner.free(c)
    assert runner.allocate() == c


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels on CPU tensors")
def test_a_step_of_the_in_place_kernels_that_raises_marks_its_slots(qwen, monkeypatch):
    """The Triton step kernels update the pools as each layer runs: a step that raises in layer
    3 has advanced layers 0-2, so the slot refuses use until restored; then it is exact."""
    runner = Runner(qwen, max_seqs=2, max_len=32)
    a = runner.allocate()
    prompt = tokens(6, seed=5)[0].tolist()
    runner.prefill([a], [prompt])
    snap = runner.cache.snapshot(a)
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "triton")
    handle = raise_in_layer(qwen, 3)
    try:
        with pytest.raises(Boom):
            runner.decode([a], [5])
    finally:
        handle.remove()
    assert "a decode step on slots [0] raised Boom part-way" in runner.cache.failed(a)
    with pytest.raises(SlotFailedError):
        runner.decode([a], [5])
    runner.cache.restore(snap)
    torch.testing.assert_close(runner.decode([a], [5])[0], reference(qwen, prompt + [5]), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- accept


def verified(runner: Runner, prompt: list[int]) -> int:
    slot = runner.allocate()
    runner.prefill([slot], [prompt])
    runner.verify([slot], torch.tensor([[1, 2, 3]]))
    return slot


@pytest.mark.parametrize("action,why", [
    (lambda r, s: (r.cache.free(s), r.cache.allocate()), "slot 0 was freed since the verify"),
    (lambda r, s: r.cache.truncate(s, 0), "slot 0 was truncated since the verify"),
    (lambda r, s: r.cache.restore(r.cache.snapshots(s)[0]), "slot 0 was restored since the verify"),
    (lambda r, s: r.cache.fork(s), "slot 0 was forked since the verify"),
    (lambda r, s: r.decode([r.allocate()], [4]), "a decode step ran since"),
])
def test_a_stale_accept_is_refused(qwen, action, why):
    """A stale accept once wrote the old sequence into a freshly allocated slot, or undid a
    truncate: whatever touches a verified slot voids its pending verify."""
    runner = Runner(qwen, max_seqs=3, max_len=48)
    slot = runner.allocate()
    runner.prefill([slot], [[7, 8, 9]])
    runner.cache.snapshot(slot)
    runner.verify([slot], torch.tensor([[1, 2, 3]]))
    action(runner, slot)
    before = buffers(runner)
    with pytest.raises(RuntimeError, match=re.escape(f"accept() needs a verify() before it, and none is pending: {why}")):
        runner.accept([2])
    assert all(torch.equal(x, y) for x, y in zip(before, buffers(runner)))


@pytest.mark.parametrize("counts,message", [
    ([2.5], "accept's count for slot 0 must be an int, got 2.5"),
    ([True], "accept's count for slot 0 must be an int, got True"),
    ([0], "accept needs counts in [1, 3] for the verified slots [0], got [0]"),
    ([1, 1], "accept needs one count per verified slot [0], got [1, 1]"),
])
def test_accept_counts_are_ints_in_range(qwen, counts, message):
    runner = Runner(qwen, max_seqs=2, max_len=48)
    slot = verified(runner, [7, 8, 9])
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.accept(counts)
    assert runner.cache.length(slot) == 6
    runner.accept([2])  # the verify is still pending after a refused accept
    assert runner.cache.length(slot) == 5


# ----------------------------------------------------------------------------- snapshots


def test_another_caches_snapshot_is_refused(qwen):
    one, two = Runner(qwen, max_seqs=2, max_len=32), Runner(qwen, max_seqs=2, max_len=32)
    s1, s2 = one.allocate(), two.allocate()
    one.prefill([s1], [[1, 2, 3, 4]])
    two.prefill([s2], [[5, 6, 7, 8, 9]])
    snap = one.cache.snapshot(s1)
    for call in (two.cache.restore, two.cache.fork):
        with pytest.raises(ValueError, match=f"taken by another cache \\(cache {one.cache.id}; this is cache "
                                             f"{two.cache.id}\\)"):
            call(snap)
    assert two.cache.length(s2) == 5 and two.cache.allocator.available == 1


# ----------------------------------------------------------------------------- slots


@pytest.mark.parametrize("slots,message", [
    ([0, 0], "slots holds slot 0 twice ([0, 0])"),
    ([3], "slots[0] = 3 is not a slot of the pool of 3"),
    ([-1], "slots[0] must be an int >= 0, got -1"),
    ([0.5], "slots[0] must be an int >= 0, got 0.5"),
    ([1], "slot 1 is not an allocated sequence"),
    ([], "slots must be a non-empty list of slot ints, got []"),
])
def test_runner_slots_are_validated_on_the_host(qwen, slots, message):
    runner = Runner(qwen, max_seqs=3, max_len=16)
    runner.allocate()
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.decode(slots, [1] * len(slots))


# ----------------------------------------------------------------------------- bounds


def test_plans_past_the_models_positions_or_the_free_memory_are_refused_before_allocating(qwen):
    positions = qwen.config.max_position_embeddings
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(
            f"a prompt of 3 tokens + max_new_tokens=100000000 is 100000003 positions, past the model's "
            f"max_position_embeddings={positions}")):
        graphdelta.generate(qwen, [[1, 2, 3]], max_new_tokens=10**8)
    with pytest.raises(ValueError, match=f"max_len={positions + 1} tokens per sequence exceeds the model's "
                                         f"max_position_embeddings={positions}"):
        Runner(qwen, max_seqs=1, max_len=positions + 1)
    with pytest.raises(MemoryError, match=r"a cache of 1000000000 sequences x 4096 tokens needs [\d.]+ GiB \(\d+ "
                                          r"bytes\), more than the [\d.]+ GiB free on cpu"):
        Runner(qwen, max_seqs=10**9, max_len=4096)
    assert time.perf_counter() - start < 10  # nothing was allocated


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(max_batch=0), "max_batch must be an int >= 1, got 0"),
    (dict(top_k=0), "top_k must be an int >= 1, got 0"),
    (dict(max_len=2.5), "max_len must be an int >= 1, got 2.5"),
])
def test_generate_arguments_are_checked_first(qwen, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(qwen, [[1, 2, 3]], max_new_tokens=2, **kwargs)


def test_runner_sizes_are_checked(qwen):
    with pytest.raises(ValueError, match=re.escape("max_batch must be an int >= 1, got 0")):
        Runner(qwen, max_seqs=2, max_batch=0)
    with pytest.raises(ValueError, match=re.escape("max_seqs must be an int >= 1, got 0")):
        Runner(qwen, max_seqs=0)


# ----------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("reuse", ["free", "truncate"])
def test_a_nan_request_reaches_no_other_sequence(qwen, reuse):
    """A token whose embedding is NaN poisons its own sequence only: in a packed prefill next to
    a clean prompt, and in the slot's next sequence, after free + allocate or truncate to 0
    (attention reads masked positions past a sequence's length, and a masked NaN still turns
    the softmax into NaN)."""
    clean = tokens(9, seed=3)[0].tolist()
    embedding = qwen.get_input_embeddings().weight
    saved = embedding[0].clone()
    runner = Runner(qwen, max_seqs=2, max_len=32)
    try:
        with torch.no_grad():
            embedding[0] = float("nan")
        bad, good = runner.allocate(), runner.allocate()
        logits = runner.prefill([bad, good], [[0] + clean, clean])
        assert logits[0].isnan().all()
        runner.decode([bad, good], [1, 2])
        if reuse == "free":
            runner.free(bad)
        else:
            runner.cache.truncate(bad, 0)
    finally:
        with torch.no_grad():
            embedding[0] = saved
    torch.testing.assert_close(logits[1], reference(qwen, clean), atol=ATOL, rtol=0)
    reused = runner.allocate() if reuse == "free" else bad
    assert reused == bad
    short = clean[:4]
    torch.testing.assert_close(runner.prefill([reused], [short])[0], reference(qwen, short), atol=ATOL, rtol=0)
    torch.testing.assert_close(runner.decode([reused], [7])[0], reference(qwen, short + [7]), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- threads


def test_static_experts_restores_the_users_config_across_threads(qwen):
    """Compiled steps switch transformers' MoE dispatch to batched_mm for their duration;
    unlocked, two threads saved each other's switched value and left the model on it."""
    configs = [qwen.config]
    original = qwen.config._experts_implementation
    seen = []

    def step():
        for _ in range(20):
            with static_experts(configs):
                seen.append(qwen.config._experts_implementation)
                time.sleep(0.0005)

    threads = [threading.Thread(target=step) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {"batched_mm"} and len(seen) == 80
    assert qwen.config._experts_implementation == original


def test_static_steps_dispatch_experts_per_device(qwen):
    """batched_mm off Hopper's bf16 (grouped_mm's fallback there syncs with the host, which a
    CUDA graph cannot hold; inductor compiles batched_mm whole on CPU); the runner's choice is
    what its static steps switch to."""
    from graphdelta.runtime.forward import experts_implementation

    for dtype in (torch.float32, torch.bfloat16):
        assert experts_implementation(torch.device("cpu"), dtype) == "batched_mm"
    runner = Runner(qwen, max_seqs=1, max_len=16)
    assert runner.experts == "batched_mm"
    with static_experts([qwen.config], "grouped_mm"):
        assert qwen.config._experts_implementation == "grouped_mm"


def test_the_dispatch_switch_finds_experts_without_the_expert_parallel_flag(qwen, monkeypatch):
    """transformers 5.17 (the GPU image's) marks no experts module ``_is_expert_parallel``: a
    search for that flag alone found none, the switch did nothing, and the CUDA graph of the
    fp32 step captured grouped_mm's host copy (the first GPU check kit run, 2026-12-04)."""
    from graphdelta.runtime.forward import experts_configs

    experts = [m for m in qwen.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]
    assert experts, "the tiny Qwen3-Next has MoE experts"
    for m in experts:
        if "_is_expert_parallel" in vars(m):  # (transformers 5.2x)
            monkeypatch.delattr(m, "_is_expert_parallel")
    configs = experts_configs(qwen)
    assert configs
    with static_experts(configs, "batched_mm"):
        assert all(m.config._experts_implementation == "batched_mm" for m in experts)
    assert all(m.config._experts_implementation != "batched_mm" for m in experts)
