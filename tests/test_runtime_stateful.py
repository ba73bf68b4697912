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
hundred calls per family in the ``ci`` hypothesis profile."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from graphdelta.runtime import Runner
from graphdelta.runtime.cache import Snapshot

from models import build, build_newer, newer_available

MAX_SEQS = 3
MAX_LEN = 48
VOCAB = 512
ATOL = 2e-5
token_lists = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)

_models: dict = {}


def model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = build_newer(family, layers=4) if family == "bailing_hybrid" else build(family)
    return _models[family]


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

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def prefill(self, data):
        slots = self.draw_slots(data)
        if not slots:
            return
        pieces = [data.draw(token_lists.filter(lambda t, s=s: len(t) <= self.room(s))) for s in slots]
        logits = self.runner.prefill(slots, pieces)
        for row, (slot, piece) in enumerate(zip(slots, pieces)):
            self.history[slot] += piece
            self.expect(logits[row : row + 1], self.history[slot])

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def decode(self, data):
        slots = self.draw_slots(data)  # an empty slot too: its first token can be a step
        if not slots:
            return
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=len(slots), max_size=len(slots)))
        logits = self.runner.decode(slots, tokens)
        for row, (slot, token) in enumerate(zip(slots, tokens)):
            self.history[slot].append(token)
            self.expect(logits[row : row + 1], self.history[slot])

    @precondition(lambda self: self.history)
    @rule(data=st.data(), drafts=st.integers(1, 3))
    def verify_and_accept(self, data, drafts):
        slots = self.draw_slots(data, need=drafts + 1)
        if not slots:
            return
        width = drafts + 1
        tokens = torch.tensor([data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=width, max_size=width))
                               for _ in slots])
        logits = self.runner.verify(slots, tokens)
        starts = {s: len(self.history[s]) for s in slots}
        for row, slot in enumerate(slots):
            self.expect(logits[row], self.history[slot] + tokens[row].tolist())
        counts = [data.draw(st.integers(1, width)) for _ in slots]
        self.runner.accept(counts)
        for row, (slot, n) in enumerate(zip(slots, counts)):
            self.history[slot] += tokens[row, :n].tolist()
            self.cut(slot, starts[slot] + n)
        self.probe(slots[0], int(tokens[0, 0]))

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
