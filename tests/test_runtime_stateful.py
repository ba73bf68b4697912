"""The runtime as a state machine: hypothesis draws sequences of runner and cache calls
(allocate, prefill pieces, decode, verify + accept, snapshot, restore, truncate, fork, free) on
several slots at once, and every logit the runner returns is checked against transformers
running the slot's whole token history from scratch, without a cache.

A slot's history is all the runner is given; so a state that drifts from it (a rollback that
moves the attention part but not the recurrent part, a chunked prefill that starts from a
zeroed state, a fork that copies too little, a snapshot that outlives the tokens it was taken
at) shows up as a wrong logit at the next call on that slot. Calls the cache must refuse
(truncating to a length it holds no snapshot for, restoring a stale snapshot) are checked to
raise and to change nothing. Tiny fp32 models on CPU (tests/models.py) of three families; a few
hundred calls per family in the ``ci`` hypothesis profile.

Faults: a prefill, decode or verify can be made to raise (an exception or KeyboardInterrupt) in
a random module of a random layer, in the n-th call of one of graphdelta's ops, or after the
step applied some of its state writes. After each, every slot of the call either is as before
(the retried call must give transformers' logits on the slot's history) or refuses use with
``SlotFailedError`` until it is restored from a snapshot, truncated to 0 or freed."""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from graphdelta import ops
from graphdelta.lowering import torch_conv, torch_recurrent
from graphdelta.runtime import Runner
from graphdelta.runtime.cache import SlotFailedError, Snapshot
from graphdelta.runtime.forward import Writes

from models import build, build_newer, newer_available

MAX_SEQS = 3
MAX_LEN = 48
VOCAB = 512
ATOL = 2e-5
token_lists = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)

_models: dict = {}
COUNTS: collections.Counter = collections.Counter()  # over all runs: faults injected, retried, refused


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """Print the fault counts (seen with ``pytest -s``, e.g. for a HYPOTHESIS_PROFILE=fuzz run)."""
    yield
    print(f"\nruntime state machine: {dict(COUNTS)}")


def model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = build_newer(family, layers=4) if family == "bailing_hybrid" else build(family)
    return _models[family]


class Boom(Exception):
    """An injected fault."""


# graphdelta's op functions the runtime calls on CPU (prefill: the public ops; steps: the rows).
OPS = [(ops, "causal_conv1d"), (ops, "chunk_gated_delta_rule"), (torch_conv, "conv_update_rows"),
       (torch_recurrent, "decode_rows")]


@contextlib.contextmanager
def fault(model: torch.nn.Module, kind: str, where: int, error: type[BaseException]):
    """Within the block, the runtime raises ``error`` at a place ``where`` picks: a submodule of
    a layer (``kind="module"``), the n-th call of an op (``"op"``), or after the n-th pool write
    of a step (``"writes"``). A place the call never reaches raises nothing."""
    with pytest.MonkeyPatch.context() as mp:
        if kind == "module":
            layers = model.model.layers
            modules = list(layers[where % len(layers)].modules())

            def hook(*_):
                raise error("injected in a module")

            handle = modules[where // len(layers) % len(modules)].register_forward_pre_hook(hook)
            try:
                yield
            finally:
                handle.remove()
            return
        if kind == "op":
            module, name = OPS[where % len(OPS)]
            real, left = getattr(module, name), [where // len(OPS) % 3]

            def flaky(*args, **kwargs):
                if left[0] == 0:
                    raise error(f"injected in {name}")
                left[0] -= 1
                return real(*args, **kwargs)

            mp.setattr(module, name, flaky)
        else:
            def apply_some(self):
                self.started = True
                for pool, rows, values in self.pending[: where % (len(self.pending) + 1)]:
                    pool.index_copy_(0, rows, values)
                raise error("injected while writing")

            mp.setattr(Writes, "apply", apply_some)
        yield


@dataclasses.dataclass
class Saved:
    snapshot: Snapshot
    tokens: tuple[int, ...]
    valid: bool = True  # what the cache should say


class RunnerMachine(RuleBasedStateMachine):
    family: str
    state_layout: str

    @initialize(first=token_lists)
    def start(self, first):
        self.model = model(self.family)
        self.runner = Runner(self.model, max_seqs=MAX_SEQS, max_len=MAX_LEN, state_layout=self.state_layout)
        self.history: dict[int, list[int]] = {}  # slot -> every token it was given
        self.saved: list[Saved] = []
        self.faults = self.retried = self.refused = 0  # injected faults that raised; their outcomes
        slot = self.runner.allocate()
        self.history[slot] = first
        self.expect(self.runner.prefill([slot], [first]), first)

    # ------------------------------------------------------------------ the reference

    def expect(self, logits: torch.Tensor, tokens: list[int]) -> None:
        """``logits`` ``[n, V]`` are the model's at the last n of ``tokens``, run from scratch."""
        with torch.no_grad():
            ref = self.model(torch.tensor(tokens)[None], use_cache=False).logits[0, -logits.shape[0]:]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)

    def cut(self, slot: int, length: int) -> None:
        """The slot now holds its first ``length`` tokens: longer snapshots of it go stale."""
        del self.history[slot][length:]
        self.stale(slot, longer_than=length)

    def stale(self, slot: int, longer_than: int) -> None:
        for s in self.saved:
            if s.snapshot.slot == slot and len(s.tokens) > longer_than:
                s.valid = False

    def probe(self, slot: int, token: int) -> None:
        """Decode one token on a slot whose state was just replaced, so a wrong state shows now."""
        if self.room(slot):
            self.history[slot].append(token)
            self.expect(self.runner.decode([slot], [token]), self.history[slot])

    def room(self, slot: int) -> int:
        return MAX_LEN - len(self.history[slot])

    def draw_slots(self, data, need: int = 1) -> list[int]:
        roomy = sorted(s for s in self.history if self.room(s) >= need)
        return data.draw(st.lists(st.sampled_from(roomy), min_size=1, unique=True)) if roomy else []

    # ------------------------------------------------------------------ sequences

    @precondition(lambda self: len(self.history) < MAX_SEQS)
    @rule()
    def allocate(self):
        slot = self.runner.allocate()
        assert slot not in self.history
        self.history[slot] = []

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.history)))
        self.runner.free(slot)
        del self.history[slot]
        self.stale(slot, longer_than=-1)

    def draw_call(self, data, kind: str, drafts: int = 1):
        """Slots and tokens of a ``kind`` call (None when no slot has room)."""
        slots = self.draw_slots(data, need=drafts + 1 if kind == "verify" else 1)
        if not slots:
            return None
        if kind == "prefill":
            return slots, [data.draw(token_lists.filter(lambda t, s=s: len(t) <= self.room(s))) for s in slots]
        width = 1 if kind == "decode" else drafts + 1
        tokens = [data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=width, max_size=width)) for _ in slots]
        return slots, tokens

    def call(self, kind: str, slots: list[int], tokens: list[list[int]]) -> torch.Tensor:
        if kind == "prefill":
            return self.runner.prefill(slots, tokens)
        if kind == "decode":
            return self.runner.decode(slots, [t[0] for t in tokens])
        return self.runner.verify(slots, torch.tensor(tokens))

    def check(self, data, kind: str, slots: list[int], tokens: list[list[int]], logits: torch.Tensor) -> None:
        """The logits of a call that went through; then (verify) accept a drawn count each."""
        if kind != "verify":
            for row, (slot, piece) in enumerate(zip(slots, tokens)):
                self.history[slot] += piece
                self.expect(logits[row : row + 1], self.history[slot])
            return
        starts = {s: len(self.history[s]) for s in slots}
        for row, slot in enumerate(slots):
            self.expect(logits[row], self.history[slot] + tokens[row])
        counts = [data.draw(st.integers(1, len(tokens[0]))) for _ in slots]
        self.runner.accept(counts)
        for slot, piece, n in zip(slots, tokens, counts):
            self.history[slot] += piece[:n]
            self.cut(slot, starts[slot] + n)
        self.probe(slots[0], tokens[0][0])

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def prefill(self, data):
        drawn = self.draw_call(data, "prefill")
        if drawn:
            self.check(data, "prefill", *drawn, self.call("prefill", *drawn))

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def decode(self, data):
        drawn = self.draw_call(data, "decode")  # an empty slot too: its first token can be a step
        if drawn:
            self.check(data, "decode", *drawn, self.call("decode", *drawn))

    @precondition(lambda self: self.history)
    @rule(data=st.data(), drafts=st.integers(1, 3))
    def verify_and_accept(self, data, drafts):
        drawn = self.draw_call(data, "verify", drafts)
        if drawn:
            self.check(data, "verify", *drawn, self.call("verify", *drawn))

    @precondition(lambda self: self.history)
    @rule(data=st.data(), call=st.sampled_from(["prefill", "decode", "verify"]), drafts=st.integers(1, 2),
          kind=st.sampled_from(["module", "op", "writes"]), where=st.integers(0, 1000),
          error=st.sampled_from([Boom, KeyboardInterrupt]))
    def faulty_call(self, data, call, drafts, kind, where, error):
        drawn = self.draw_call(data, call, drafts)
        if not drawn:
            return
        slots, tokens = drawn
        with fault(self.model, kind, where, error):
            try:
                logits = self.call(call, slots, tokens)
            except error:
                logits = None
        if logits is not None:  # the fault sat where this call never went
            self.check(data, call, slots, tokens, logits)
            return
        self.faults += 1
        failed = [s for s in slots if self.runner.cache.failed(s)]
        if not failed:  # nothing was written: the retry is the call itself
            self.retried += 1
            self.check(data, call, slots, tokens, self.call(call, slots, tokens))
            return
        assert failed == slots, (failed, slots)  # a step's writes cover all its slots
        for slot in slots:
            self.refused += 1
            with pytest.raises(SlotFailedError, match=f"slot {slot} is unusable"):
                self.runner.decode([slot], [0])
            with pytest.raises(SlotFailedError, match=f"slot {slot} is unusable"):
                self.runner.cache.snapshot(slot)
            self.recover(data, slot)

    def recover(self, data, slot: int) -> None:
        """Bring a failed slot back: restore one of its valid snapshots, or truncate it to 0, or free it."""
        snaps = [s for s in self.saved if s.valid and s.snapshot.slot == slot]
        way = data.draw(st.sampled_from(["restore", "truncate", "free"] if snaps else ["truncate", "free"]))
        if way == "restore":
            s = data.draw(st.sampled_from(snaps))
            self.runner.cache.restore(s.snapshot)
            self.cut(slot, len(s.tokens))
            self.probe(slot, 0)
        elif way == "truncate":
            self.runner.cache.truncate(slot, 0)
            self.cut(slot, 0)
            self.probe(slot, 0)
        else:
            self.runner.free(slot)
            del self.history[slot]
            self.stale(slot, longer_than=-1)

    # ------------------------------------------------------------------ snapshots and cuts

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def snapshot(self, data):
        slot = data.draw(st.sampled_from(sorted(self.history)))
        self.saved.append(Saved(self.runner.cache.snapshot(slot), tuple(self.history[slot])))

    @precondition(lambda self: self.saved)
    @rule(data=st.data(), token=st.integers(0, VOCAB - 1))
    def restore(self, data, token):
        s = data.draw(st.sampled_from(self.saved))
        if not s.valid:
            with pytest.raises(ValueError, match="no longer valid"):
                self.runner.cache.restore(s.snapshot)
            return
        self.runner.cache.restore(s.snapshot)
        assert self.history[s.snapshot.slot][: len(s.tokens)] == list(s.tokens)
        self.cut(s.snapshot.slot, len(s.tokens))
        self.probe(s.snapshot.slot, token)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), token=st.integers(0, VOCAB - 1))
    def truncate(self, data, token):
        slot = data.draw(st.sampled_from(sorted(self.history)))
        length = data.draw(st.integers(0, len(self.history[slot])))
        points = {len(s.tokens) for s in self.saved if s.valid and s.snapshot.slot == slot}
        if length in (0, len(self.history[slot])) or length in points:
            self.runner.cache.truncate(slot, length)
            self.cut(slot, length)
            self.probe(slot, token)
        else:
            with pytest.raises(ValueError, match="no snapshot"):
                self.runner.cache.truncate(slot, length)

    @precondition(lambda self: self.history and len(self.history) < MAX_SEQS)
    @rule(data=st.data(), from_snapshot=st.booleans(), token=st.integers(0, VOCAB - 1))
    def fork(self, data, from_snapshot, token):
        if from_snapshot and self.saved:
            s = data.draw(st.sampled_from(self.saved))
            if not s.valid:
                with pytest.raises(ValueError, match="no longer valid"):
                    self.runner.cache.fork(s.snapshot)
                return
            slot, tokens = self.runner.cache.fork(s.snapshot), list(s.tokens)
        else:
            source = data.draw(st.sampled_from(sorted(self.history)))
            slot, tokens = self.runner.cache.fork(source), list(self.history[source])
        assert slot not in self.history
        self.history[slot] = tokens
        self.probe(slot, token)

    def teardown(self):
        COUNTS.update(runs=1, faults=self.faults, retried=self.retried, refused=self.refused)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def lengths_and_snapshots_agree(self):
        for slot, tokens in self.history.items():
            assert self.runner.cache.length(slot) == len(tokens), (slot, tokens)
        for s in self.saved:
            assert s.snapshot.valid == s.valid, (s.snapshot.slot, len(s.tokens), s.valid)


STEPS = settings(stateful_step_count=12)


class QwenMachine(RunnerMachine):
    family, state_layout = "qwen3_next", "vk"


class KimiMachine(RunnerMachine):
    family, state_layout = "kimi_linear", "kv"


class BailingMachine(RunnerMachine):
    family, state_layout = "bailing_hybrid", "vk"


class TestQwen3NextVK(QwenMachine.TestCase):
    """GDN with GVA ratio 2, MoE, gated attention; the recurrent state stored transposed."""

    settings = STEPS


class TestKimiLinearKV(KimiMachine.TestCase):
    """KDA (a decay per key channel) and MLA attention, the state in the kv layout."""

    settings = STEPS


@pytest.mark.skipif(not newer_available("bailing_hybrid"), reason="this transformers has no BailingHybridForCausalLM")
class TestBailingHybridVK(BailingMachine.TestCase):
    """KDA with a lower-bounded gate, MLA whose keys are rotated at their positions."""

    settings = STEPS
