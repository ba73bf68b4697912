"""Replaying a compiled step without Dynamo (graphdelta/runtime/replay.py): built only where
the compiled function is the whole step. Look-alikes that must not replay: a step that mutates
a list or an attribute, one with a graph break, one that reads a tensor made per call, one
whose result is not the function's output. The runner's own replayed steps are compared with
eager and guarded steps in test_runtime.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graphdelta.runtime.replay import capture, recorded


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.seen: list[int] = []
        self.count = 0
        self.fresh = torch.ones(4)

    def forward(self, x):
        return torch.tanh(x @ self.w) + 1


class Appends(Toy):
    def forward(self, x):
        self.seen.append(1)
        return torch.tanh(x @ self.w) + 1


class Counts(Toy):
    def forward(self, x):
        self.count = self.count + 1
        return torch.tanh(x @ self.w) + 1


class Breaks(Toy):
    def forward(self, x):
        y = torch.tanh(x @ self.w)
        torch._dynamo.graph_break()
        return y + 1


class ReadsFresh(Toy):
    def forward(self, x):
        return torch.tanh(x @ self.w) + self.fresh


class Wraps(Toy):
    def forward(self, x):
        return [torch.tanh(x @ self.w) + 1]


def _first_call(toy: Toy, x: torch.Tensor):
    """Compile ``toy`` (a backend that records what Dynamo's compiled function is called with)
    and call it once, as a runner's first step call is: the replay it would build, or None."""
    torch._dynamo.reset()
    step = torch.compile(toy, backend=lambda gm, example: recorded(gm.forward), dynamic=False)
    with torch.no_grad(), capture() as seen:
        result = step(x)
    return seen.replay([x], [*toy.parameters(), *toy.buffers()], result, [], type(toy).forward.__code__), result


def test_a_pure_step_replays_with_the_same_result():
    toy, x = Toy(), torch.randn(2, 4)
    replay, result = _first_call(toy, x)
    assert replay is not None
    torch.testing.assert_close(result, toy(x))
    other = torch.randn(2, 4)
    assert replay.fits(other)
    with torch.no_grad():
        torch.testing.assert_close(replay(other), toy(other), rtol=0, atol=0)
        toy.w.mul_(2)  # weights changed in place are the same tensor: the replay reads them
        torch.testing.assert_close(replay(other), toy(other), rtol=0, atol=0)
    assert not replay.fits(torch.randn(4, 2).t())  # another layout in memory
    assert not replay.fits(torch.randn(3, 4))
    assert not replay.fits(other.double())


@pytest.mark.parametrize("kind", [Appends, Counts, Breaks, ReadsFresh, Wraps])
def test_steps_that_do_more_than_the_compiled_function_never_replay(kind):
    toy = kind()
    replay, result = _first_call(toy, torch.randn(2, 4))
    assert replay is None
    if kind is Appends:
        assert toy.seen == [1]
    if kind is Counts:
        assert toy.count == 1


def test_a_step_that_grows_aux_or_calls_twice_never_replays():
    toy, x = Toy(), torch.randn(2, 4)
    torch._dynamo.reset()
    step = torch.compile(toy, backend=lambda gm, example: recorded(gm.forward), dynamic=False)
    kept = [*toy.parameters()]
    with torch.no_grad():
        with capture() as seen:
            result = step(x)
        assert seen.replay([x], kept, result, ["an aux entry"], Toy.forward.__code__) is None
        with capture() as seen:
            step(x)
            result = step(x)
        assert len(seen.calls) == 2
        assert seen.replay([x], kept, result, [], Toy.forward.__code__) is None
        with capture() as seen:
            result = step(x)
        assert seen.replay([x], [], result, [], Toy.forward.__code__) is None  # w is not kept


def test_runners_sharing_a_compiled_step_replay_their_own_caches():
    """Two runners of one model share Dynamo's compiled step; each replays it over its own
    cache pools, one step each in turn, and gives the eager runner's logits."""
    from graphdelta.runtime import Runner
    from models import build, tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        qwen = build("qwen3_next")
        eager = Runner(qwen, max_seqs=3, max_len=128)
        # the shapes of test_runtime.py's guard test: its compiled code is in inductor's cache
        ours = [Runner(qwen, max_seqs=3, max_len=128, compile_steps=True) for _ in range(2)]
        prompts = [tokens(9, seed=1)[0], tokens(14, seed=2)[0]]
        want, got = [[], []], [[], []]
        lasts = [eager.prefill([eager.allocate()], [p]) for p in prompts]
        for i in range(2):
            for _ in range(4):
                lasts[i] = eager.decode([i], lasts[i].argmax(-1).tolist())
                want[i].append(lasts[i])
        lasts = [runner.prefill([runner.allocate()], [p]) for runner, p in zip(ours, prompts)]
        for _ in range(4):  # in turn: each step reads its own runner's cache
            for i, runner in enumerate(ours):
                lasts[i] = runner.decode([0], lasts[i].argmax(-1).tolist())
                got[i].append(lasts[i])
        for i in range(2):
            torch.testing.assert_close(torch.stack(got[i]), torch.stack(want[i]), atol=2e-5, rtol=0)
        first, second = (next(iter(runner._replays.values())) for runner in ours)
        assert first.fn is second.fn
        assert any(x is not y for x, y in zip(first.args, second.args))
    finally:
        torch.set_num_threads(threads)
