"""Compiled CPU code on two threads. Under pytest-xdist each worker runs one torch thread
(conftest.py), and inductor then generates C++ without OpenMP's parallel loops; what users run on
several cores has them. This compiles a tiny Qwen3-Next's prefill and decode step for two
threads and checks both against eager: a race between the parallel loops that write the cache
pools and those that read them would show here."""
import pytest
import torch

import graphdelta
from graphdelta.runtime import Runner
from graphdelta.runtime.runner import _compiled_entries

from models import build, tokens

ATOL = 2e-5


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def test_prefill_and_steps_compiled_for_two_threads_match_eager(two_threads):
    # Dynamo's entries do not depend on the thread count, and a step entry compiled by an earlier
    # test of this process (for one thread) could serve these shapes: start from none. (Runners
    # and compiled models handle a reset; inductor's on-disk cache keys CPU code on the count.)
    torch._dynamo.reset()
    model = build("qwen3_next", seed=5)
    compiled = graphdelta.compile(model)
    ids = tokens(150, seed=4)
    torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                               atol=ATOL, rtol=0)

    runners = [Runner(model, max_seqs=2, max_len=128, compile_steps=c) for c in (False, True)]
    logits = []
    for runner in runners:
        slots = [runner.allocate() for _ in range(2)]
        last = runner.prefill(slots, [tokens(40, seed=6)[0], tokens(57, seed=7)[0]])
        seen = []
        for _ in range(12):  # past position 64: two attention windows, each compiled
            last = runner.decode(slots, last.argmax(-1).tolist())
            seen.append(last)
        logits.append(torch.stack(seen))
    assert {key[:3] for key in runners[1]._replays} == {(2, 1, False)}  # the later steps replayed
    assert _compiled_entries() in (None, 2)  # compiled here: windows 64 and 128
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)
    for a, b in zip(runners[0].cache.buffers(), runners[1].cache.buffers()):
        torch.testing.assert_close(a[:2], b[:2], atol=ATOL, rtol=0)
