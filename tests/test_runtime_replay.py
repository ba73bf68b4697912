"""Replaying a compiled step without Dynamo (graphdelta/runtime/replay.py): built only where
the compiled function is the whole step. Look-alikes that must not replay: a step that mutates
a list, an attribute, a dict or a global, one with a graph break, one that reads a tensor made
per call, one whose result is not the function's output. Runners' replays are compared with
eager steps across runners sharing a compiled step, a weight set anew and a Dynamo reset (and
with eager and guarded steps in test_runtime.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graphdelta.runtime.replay import Replay, capture, recorded


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


class FillsDict(Toy):
    def forward(self, x):
        self.table = getattr(self, "table", {})
        self.table["last"] = 1
        return torch.tanh(x @ self.w) + 1


COUNTER = 0


class SetsGlobal(Toy):
    def forward(self, x):
        global COUNTER
        COUNTER += 1
        return torch.tanh(x @ self.w) + 1


class Keeps(Toy):
    def forward(self, x, keep=False):
        if keep:  # another entry of the same code, with a side effect
            self.seen.append(1)
        return torch.tanh(x @ self.w) + 1


def _compiled(toy: Toy):
    """``toy`` compiled afresh by a backend that records what Dynamo's compiled function is
    called with."""
    torch._dynamo.reset()
    return torch.compile(toy, backend=lambda gm, example: recorded(gm.forward), dynamic=False)


def _first_call(toy: Toy, x: torch.Tensor):
    """Compile ``toy`` and call it once, as a runner's first step call is: the replay it would
    build, or None."""
    step = _compiled(toy)
    with torch.no_grad(), capture() as seen:
        result = step(x)
    return seen.replay([x], toy, [], result, [], type(toy).forward), result


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
    assert replay.fresh()
    w = toy.w
    toy._parameters["w"] = nn.Parameter(w.detach() + 1)  # set anew, past torch's hooks: stale
    assert not replay.fresh()
    toy._parameters["w"] = w
    assert replay.fresh()
    toy.w = nn.Parameter(w.detach())  # set anew with the same values: still another object
    assert not replay.fresh()


@pytest.mark.parametrize("kind", [Appends, Counts, Breaks, ReadsFresh, Wraps, FillsDict, SetsGlobal])
def test_steps_that_do_more_than_the_compiled_function_never_replay(kind):
    toy = kind()
    replay, result = _first_call(toy, torch.randn(2, 4))
    assert replay is None
    if kind is Appends:
        assert toy.seen == [1]
    if kind is Counts:
        assert toy.count == 1


def test_only_the_entry_that_ran_is_checked():
    """A verify step's entry of the same frame mutates ``aux``; decode steps still replay."""
    toy, x = Keeps(), torch.randn(2, 4)
    step = _compiled(toy)
    with torch.no_grad():
        with capture() as seen:
            result = step(x, keep=True)
        assert seen.replay([x], toy, [], result, [], Keeps.forward) is None
        with capture() as seen:
            result = step(x)
        assert seen.replay([x], toy, [], result, [], Keeps.forward) is not None
    assert toy.seen == [1]


def test_a_step_that_grows_aux_or_calls_twice_never_replays():
    toy, x = Toy(), torch.randn(2, 4)
    step = _compiled(toy)
    with torch.no_grad():
        with capture() as seen:
            result = step(x)
        assert seen.replay([x], toy, [], result, ["an aux entry"], Toy.forward) is None
        with capture() as seen:
            step(x)
            result = step(x)
        assert len(seen.calls) == 2
        assert seen.replay([x], toy, [], result, [], Toy.forward) is None
        with capture() as seen:
            result = step(x)
        assert seen.replay([x], nn.Module(), [], result, [], Toy.forward) is None  # w is not kept


@pytest.fixture
def one_thread():
    """One torch thread while a runner test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_runners_sharing_a_compiled_step_replay_their_own_caches(monkeypatch, one_thread):
    """Two runners of one model share Dynamo's compiled step; each replays it over its own
    cache pools, one step each in turn, and gives the eager runner's logits."""
    from graphdelta.runtime import Runner
    from models import build, tokens

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
    replayed = []
    call = Replay.__call__
    monkeypatch.setattr(Replay, "__call__", lambda self, *inputs: replayed.append(self) or call(self, *inputs))
    lasts = [runner.prefill([runner.allocate()], [p]) for runner, p in zip(ours, prompts)]
    for _ in range(4):  # in turn: each step reads its own runner's cache
        for i, runner in enumerate(ours):
            lasts[i] = runner.decode([0], lasts[i].argmax(-1).tolist())
            got[i].append(lasts[i])
    for i in range(2):
        torch.testing.assert_close(torch.stack(got[i]), torch.stack(want[i]), atol=2e-5, rtol=0)
    first, second = (next(iter(runner._replays.values())) for runner in ours)
    assert first.fn is second.fn
    assert replayed == [first, second] * 3  # each runner's first step compiled or captured
    for replay, runner, other in ((first, *ours), (second, *ours[::-1])):  # its own pools only
        held = {id(a) for a in replay.args}
        assert held >= {id(t) for t in runner.cache.buffers()}
        assert not held & {id(t) for t in other.cache.buffers()}


def test_a_replay_runs_whatever_entries_another_runner_compiles(monkeypatch, one_thread):
    """A replay calls its own compiled function, never an entry Dynamo chooses: another runner
    compiling the step frame anew (a cache of other sizes, so a new entry) leaves the first
    runner's steps replaying, with the eager runner's logits."""
    from graphdelta.runtime import Runner
    from graphdelta.runtime.runner import _compiled_entries
    from models import build, tokens

    qwen = build("qwen3_next")
    eager, ours = (Runner(qwen, max_seqs=3, max_len=128, compile_steps=c) for c in (False, True))
    prompt = tokens(9, seed=1)[0]
    slots = [runner.allocate() for runner in (eager, ours)]
    lasts = [runner.prefill([slot], [prompt]) for runner, slot in zip((eager, ours), slots)]

    def step():  # the same token for both
        token = lasts[0].argmax(-1).tolist()
        for i, (runner, slot) in enumerate(zip((eager, ours), slots)):
            lasts[i] = runner.decode([slot], token)
        torch.testing.assert_close(lasts[1], lasts[0], atol=2e-5, rtol=0)

    step()  # compiles
    step()  # replays
    before = _compiled_entries()
    other = Runner(qwen, max_seqs=2, max_len=64, compile_steps=True)
    other.prefill([other.allocate()], [prompt])
    other.decode([0], [3])
    assert before is None or _compiled_entries() > before
    replayed = []
    call = Replay.__call__
    monkeypatch.setattr(Replay, "__call__", lambda self, *inputs: replayed.append(self) or call(self, *inputs))
    step()
    assert replayed == [ours._replays[(1, 1, False, 64)]]


def test_every_dynamo_reset_captures_the_step_again(one_thread):
    """Each reset of Dynamo's caches drops the runner's replays, the second of two with no new
    runner between them too (Dynamo forgets the backends it knows at every reset: the runner's
    backend registers again when it compiles); the logits stay the eager runner's."""
    from graphdelta.runtime import Runner
    from models import build, tokens

    qwen = build("qwen3_next")
    eager, ours = (Runner(qwen, max_seqs=3, max_len=128, compile_steps=c) for c in (False, True))
    slots = [runner.allocate() for runner in (eager, ours)]
    for runner, slot in zip((eager, ours), slots):
        runner.prefill([slot], [tokens(5, seed=3)[0]])
    seen = []
    for token in (3, 4, 5, 6, 7):
        got, want = (runner.decode([slot], [token]) for runner, slot in zip((ours, eager), slots))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        seen.append(ours._replays[(1, 1, False, 64)])
        if token in (4, 5):
            torch._dynamo.reset()
    first, after_one, after_two = seen[1], seen[2], seen[3]
    assert seen[0] is first and after_one is not first and after_two is not after_one and seen[4] is after_two


def test_a_set_weight_or_a_dynamo_reset_captures_the_step_again(one_thread):
    """A replay holds the tensors its compiling call got. A weight set anew (``load_state_dict``
    with ``assign=True``, or a write to ``_parameters``) or a reset of Dynamo's caches makes each shape's next step run with
    its guards and be captured again: the logits stay the eager runner's, including where the
    first step after a reset is a shape never compiled before, and a verify step compiled
    before the reset runs after it."""
    from graphdelta.runtime import Runner
    from models import build, tokens

    qwen = build("qwen3_next")
    eager = Runner(qwen, max_seqs=3, max_len=128)
    ours = Runner(qwen, max_seqs=3, max_len=128, compile_steps=True)
    slots = {}

    def both(name, token):
        got, want = (runner.decode([slots[name, runner]], [token]) for runner in (ours, eager))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)

    for runner in (ours, eager):
        slots["a", runner] = runner.allocate()
        runner.prefill([slots["a", runner]], [tokens(5, seed=1)[0]])
    both("a", 3)
    both("a", 4)
    first = ours._replays[(1, 1, False, 64)]

    norm = qwen.model.norm.weight
    qwen.load_state_dict({"model.norm.weight": norm.detach() + 0.5}, strict=False, assign=True)
    assert qwen.model.norm.weight is not norm
    both("a", 5)
    second = ours._replays[(1, 1, False, 64)]
    assert second is not first
    both("a", 6)
    drafts = torch.tensor([[6, 9]])
    got, want = (runner.verify([slots["a", runner]], drafts) for runner in (ours, eager))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    for runner in (ours, eager):
        runner.accept([1])

    # a direct write to the module's dictionary passes no hook: the tree check sees it
    qwen.model.norm._parameters["weight"] = nn.Parameter(norm.detach() - 0.5)
    torch._dynamo.reset()
    for runner in (ours, eager):  # the first step after the reset: window 128, a new shape
        slots["b", runner] = runner.allocate()
        runner.prefill([slots["b", runner]], [tokens(70, seed=2)[0]])
    both("b", 7)
    both("a", 8)  # window 64 again
    assert ours._replays[(1, 1, False, 64)] is not second
    got, want = (runner.verify([slots["a", runner]], drafts) for runner in (ours, eager))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("fallback", [False, True])
def test_layouts_see_a_tensor_changed_in_place_or_set_anew(monkeypatch, fallback):
    """``Layouts`` (what compiled CPU steps read, checked in place of inductor's size asserts)
    tells a parameter whose ``.data`` changed shape, strides or dtype, one set anew with another
    layout, one removed, and tied weights untied, through Dynamo's ``TensorGuards`` and its
    Python fallback alike; new values, or a new parameter, of the same layout pass."""
    from graphdelta.runtime.layouts import Layouts

    if fallback:
        monkeypatch.setattr(torch._C._dynamo.guards, "TensorGuards", None)
    toy, pool = nn.Linear(6, 4), torch.zeros(3, 5)
    layouts = Layouts([(toy._parameters, "weight"), (toy._parameters, "bias")], [pool])
    assert (layouts._check.__name__ == "python_check") == fallback
    assert layouts.same()
    w = toy.weight
    for changed in (torch.randn(6, 4), torch.randn(6, 4).t(), torch.randn(4, 6).double(), torch.randn(4, 7)[:, :6]):
        w.data = changed
        assert not layouts.same(), (changed.shape, changed.stride(), changed.dtype)
    w.data = torch.randn(4, 6)  # other values, same layout
    pool.add_(1)
    assert layouts.same()
    toy.weight = nn.Parameter(torch.randn(6, 4).t())  # set anew: looked up where it is
    assert not layouts.same()
    toy.weight = nn.Parameter(torch.randn(4, 6))
    assert layouts.same()
    toy.bias = None
    assert not layouts.same()

    other = nn.Linear(6, 4)
    other.weight = toy.weight  # tied: one tensor at two places, checked once
    tied = Layouts([(toy._parameters, "weight"), (other._parameters, "weight")])
    assert (tied._check.__name__ == "python_check") == fallback
    assert tied.same()
    other.weight = nn.Parameter(toy.weight.detach().clone())  # untied: the places part
    assert not tied.same()


def test_a_weight_whose_layout_changed_in_place_compiles_the_step_again(one_thread):
    """Compiled CPU steps run without inductor's size asserts and with Dynamo's guards skipped
    (layouts.py). A weight whose strides change in place (its ``.data`` set to the same values
    stored column-major, the same Parameter object) is caught by the runner's layout check:
    - before a verify step through Dynamo, the first step after the change;
    - before a new step shape compiles (``prepare``), which must not record the new layout as
      the one the older shapes were compiled for.
    Every step keeps the eager runner's logits. Without either check the step reads the
    weight's memory as compiled."""
    from graphdelta.runtime import Runner
    from models import build, tokens

    qwen = build("qwen3_next")
    eager = Runner(qwen, max_seqs=2, max_len=128)
    ours = Runner(qwen, max_seqs=2, max_len=128, compile_steps=True)
    slot = {runner: runner.allocate() for runner in (ours, eager)}
    for runner in (ours, eager):
        runner.prefill([slot[runner]], [tokens(5, seed=3)[0]])

    def both(step, *args):
        got, want = (getattr(runner, step)([slot[runner]], *args) for runner in (ours, eager))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        if step == "verify":
            for runner in (ours, eager):
                runner.accept([1])

    def relaid(weight):  # same values, column-major
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
        assert weight.stride() == (1, weight.shape[0])

    drafts = torch.tensor([[4, 7]])
    both("decode", [3])
    both("verify", drafts)
    both("decode", [4])
    first = ours._replays[(1, 1, False, 64)]
    assert ours._layouts.same()

    relaid(qwen.model.layers[0].linear_attn.out_proj.weight)
    assert not ours._layouts.same()
    both("verify", drafts)  # through Dynamo, guards skipped until the check
    both("decode", [5])
    assert ours._replays[(1, 1, False, 64)] is not first
    assert ours._layouts.same()

    second = ours._replays[(1, 1, False, 64)]
    relaid(qwen.model.layers[1].self_attn.o_proj.weight)
    ours.prepare(1, 100, 128)  # compiles the window-128 step first
    both("decode", [6])  # window 64: compiled before the change
    assert ours._replays[(1, 1, False, 64)] is not second
    both("verify", drafts)


def test_kept_step_inputs_follow_the_batch_and_step_aside_when_held(one_thread):
    """A compiled CPU step fills inputs it keeps per bucket in place (``runner._HostInputs``).
    A batch that shrinks within its bucket pads the row it freed again (slot -1: the slot that
    left is not stepped), a step that finds them held by another step builds its own without
    touching them, and a step that raises lets them go. Logits and every cache part stay the
    eager runner's, whether the tokens come as a list of host ints (filled in as they are) or
    as a tensor."""
    from graphdelta.runtime import Runner
    from models import build, tokens

    qwen = build("qwen3_next")
    eager, ours = (Runner(qwen, max_seqs=4, max_len=128, compile_steps=c) for c in (False, True))
    nexts = {}  # (runner, slot) -> the slot's next token
    for runner in (eager, ours):
        slots = [runner.allocate() for _ in range(4)]
        logits = runner.prefill(slots, [tokens(5 + 3 * i, seed=i)[0] for i in range(4)])
        nexts.update(((runner, s), t) for s, t in zip(slots, logits.argmax(-1).tolist()))

    def both(slots, as_tensor=False):
        ids = {runner: [nexts[runner, s] for s in slots] for runner in (ours, eager)}
        if as_tensor:
            ids[ours] = torch.tensor(ids[ours])[:, None]
        got, want = (runner.decode(slots, ids[runner]) for runner in (ours, eager))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        for runner, logits in ((ours, got), (eager, want)):
            nexts.update(((runner, s), t) for s, t in zip(slots, logits.argmax(-1).tolist()))

    both([0, 1, 2, 3])
    both([0, 1, 2, 3], as_tensor=True)
    both([0, 1, 2])  # bucket 4 still: row 3 pads
    kept = ours._host_inputs[4, 1]
    assert kept.slots.tolist() == [0, 1, 2, -1] and kept.starts.tolist()[3] == 0
    assert kept._lock.acquire(blocking=False)  # as another step would hold them
    try:
        before = [t.clone() for t in (kept.tokens, kept.slots, kept.starts)]
        both([2, 0, 1])  # bucket 4, other order
        both([2, 0, 1], as_tensor=True)
        assert all(torch.equal(a, b) for a, b in zip(before, (kept.tokens, kept.slots, kept.starts)))
    finally:
        kept._lock.release()
    both([0, 1, 2])

    def fails(*args, **kwargs):  # a step that raises inside: its slots fail, the inputs are free
        raise RuntimeError("injected")

    run = ours._run
    ours._run = fails
    with pytest.raises(RuntimeError, match="injected"):
        ours.decode([0, 1, 3], [nexts[ours, s] for s in (0, 1, 3)])  # bucket 4
    ours._run = run
    assert kept._lock.acquire(blocking=False)
    kept._lock.release()
    for runner in (eager, ours):  # the failed slots start over, in both runners alike
        for slot in (0, 1, 3):
            runner.free(slot)
        slots = [runner.allocate() for _ in range(3)]
        logits = runner.prefill(slots, [tokens(6 + i, seed=10 + i)[0] for i in range(3)])
        nexts.update(((runner, s), t) for s, t in zip(slots, logits.argmax(-1).tolist()))
    both([0, 1, 2, 3])
    both([0, 1, 2])
    assert eager.cache.lengths == ours.cache.lengths
    for a, b in zip(eager.cache.buffers(), ours.cache.buffers()):
        torch.testing.assert_close(b[:4], a[:4], atol=2e-5, rtol=0)
