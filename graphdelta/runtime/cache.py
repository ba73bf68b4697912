"""The hybrid cache: every buffer allocated once, at a fixed address, updated in place.

- full-attention layers: K ``[slots + 1, kv_heads, max_len, k_dim]`` and V (``v_dim``);
- linear-attention layers: a conv state ``[slots + 1, conv_dim, conv_width - 1]`` and a recurrent
  state ``[slots + 1, heads, k_dim, v_dim]`` (``state_layout="kv"``) or ``[..., v_dim, k_dim]``
  ("vk"), float32;
- in every buffer the last row is a sentinel that padded rows of a batched step read and write
  and nobody else uses: a step then needs no data-dependent branch, so it can be compiled or
  captured whole;
- a ``SlotAllocator`` hands slots to sequences and takes them back; ``lengths[slot]`` counts the
  tokens a sequence has in the cache.

Attention can be cut back to any length (later positions are simply overwritten), the recurrent
and conv states only to a point where a ``Snapshot`` was taken. Every operation that changes a
sequence (free, truncate, restore, fork, accept) checks everything first and changes the
attention part and the recurrent part together, or raises and changes nothing.

A step (prefill, decode, verify) is a transaction over its slots (``begin_step`` /
``commit_step`` / ``abort_step``): the slots are marked failed when it begins and unmarked
when it commits (lengths advanced) or aborts having written nothing. A step that raises after
writing part of their states (some layers done, others not), or is interrupted anywhere, leaves
them failed: every later use raises ``SlotFailedError`` until the slot is restored from a
snapshot, truncated to 0 or freed. The same mark covers restore, fork and accept while they copy.
The mark costs a few dictionary operations per step; which steps can abort cleanly is the
runner's business (``Runner``, "atomic steps").

A slot's attention rows are zeroed up to where its previous sequence wrote when it is handed to
a new one (allocate, fork, truncate to 0): attention reads a window past a sequence's length,
masked, and a masked NaN or inf still poisons the softmax (NaN * 0 = NaN), so no value of one
sequence may stay there.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import torch
from torch import Tensor

from graphdelta import checks
from graphdelta.runtime.layers import ModelSpec
from graphdelta.runtime.planner import MemoryPlan, check_fits, plan_memory

_cache_ids = itertools.count(1)


class SlotFailedError(RuntimeError):
    """A slot's state may be inconsistent after an operation on it raised part-way."""


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    max_seqs: int  # slots
    max_len: int  # tokens per sequence (prompt + generated)
    dtype: torch.dtype = torch.float32  # attention KV and conv states (the model's dtype)
    device: str | torch.device = "cpu"
    state_layout: str = "kv"
    state_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        for name in ("max_seqs", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        checks.check_layout(self.state_layout)


class SlotAllocator:
    """Hands out slot indices ``0 .. n - 1``, lowest free first."""

    def __init__(self, n: int):
        self.n = n
        self._free = list(range(n))
        self.in_use: set[int] = set()

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.n} cache slots are in use; free a sequence or raise max_seqs")
        slot = self._free.pop(0)
        self.in_use.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self.in_use:
            raise ValueError(f"slot {slot} is not in use (in use: {sorted(self.in_use)})")
        self.in_use.remove(slot)
        self._free.append(slot)
        self._free.sort()

    @property
    def available(self) -> int:
        return len(self._free)


@dataclasses.dataclass(eq=False)
class Snapshot:
    """A sequence's conv and recurrent states at ``length`` tokens. Its attention prefix stays in
    the slot: the snapshot is valid as long as those ``length`` positions were not rewritten,
    and only in the cache that took it (``cache_id``)."""

    slot: int
    length: int
    conv: list[Tensor]  # per linear layer [conv_dim, conv_width - 1]
    state: list[Tensor]  # per linear layer [heads, k_dim, v_dim] (or v_dim, k_dim)
    cache_id: int
    valid: bool = True


@dataclasses.dataclass
class LinearAux:
    """What a verify step keeps for one linear layer, to roll back to any of its T tokens."""

    states: Tensor  # [B, T, heads, ...] recurrent state after each token
    conv_before: Tensor  # [B, conv_dim, W - 1] conv state before the step
    conv_inputs: Tensor  # [B, T, conv_dim] conv inputs of the step


@dataclasses.dataclass
class PendingVerify:
    """A verify step waiting for ``accept``: its slots, their lengths before it, its width."""

    slots: list[int]
    starts: list[int]
    width: int
    aux: list[LinearAux]  # per linear layer


class HybridCache:
    def __init__(self, spec: ModelSpec, config: CacheConfig):
        """Refuses, before allocating anything, a ``max_len`` past the model's positions and a
        cache larger than the device's free memory (``planner.check_fits``)."""
        self.spec = spec
        self.config = config
        self.plan: MemoryPlan = plan_memory(spec, config.dtype, config.state_dtype)
        n, L, dev = config.max_seqs, config.max_len, torch.device(config.device)
        if spec.max_positions is not None and L > spec.max_positions:
            raise ValueError(f"max_len={L} tokens per sequence exceeds the model's max_position_embeddings="
                             f"{spec.max_positions}")
        check_fits(self.plan, n, L, dev)
        a, lin = spec.attention, spec.linear
        self.sentinel = n  # the extra row of every buffer, for padded rows
        kv = dict(dtype=config.dtype, device=dev)
        self.k = [torch.zeros(n + 1, a.kv_heads, L, a.k_dim, **kv) for _ in spec.attention_layers]
        self.v = [torch.zeros(n + 1, a.kv_heads, L, a.v_dim, **kv) for _ in spec.attention_layers]
        self.conv = [torch.zeros(n + 1, lin.conv_dim, lin.conv_width - 1, dtype=config.dtype, device=dev)
                     for _ in spec.linear_layers]
        state_shape = checks.state_shape(n + 1, lin.heads, lin.k_dim, lin.v_dim, config.state_layout)
        self.state = [torch.zeros(state_shape, dtype=config.state_dtype, device=dev) for _ in spec.linear_layers]
        self.allocator = SlotAllocator(n)
        self.lengths = [0] * n
        self.id = next(_cache_ids)  # snapshots carry it: another cache's snapshot is refused
        self._snapshots: dict[int, list[Snapshot]] = {}
        self._written = [0] * n  # attention positions of each slot that may hold data
        self._failed: dict[int, str | tuple] = {}  # slot -> why it is unusable (see failed())
        self._pending: PendingVerify | None = None
        self._pending_lost = "no verify() ran since the last accept()"

    # ------------------------------------------------------------------ buffers

    @property
    def max_len(self) -> int:
        return self.config.max_len

    @property
    def state_layout(self) -> str:
        return self.config.state_layout

    def buffers(self) -> list[Tensor]:
        return [*self.k, *self.v, *self.conv, *self.state]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def addresses(self) -> list[int]:
        return [t.data_ptr() for t in self.buffers()]

    # ------------------------------------------------------------------ slots

    def allocate(self) -> int:
        slot = self.allocator.allocate()
        self._reset(slot)
        self._clear_attention(slot)
        return slot

    def free(self, slot: int) -> None:
        self.allocator.free(slot)
        self._forget_pending(slot, "freed")
        self._invalidate(slot, keep_up_to=-1)
        self._failed.pop(slot, None)
        self.lengths[slot] = 0

    def _reset(self, slot: int) -> None:
        for t in (*self.conv, *self.state):
            t[slot].zero_()
        self.lengths[slot] = 0

    def _clear_attention(self, slot: int) -> None:
        """Zero the attention rows of ``slot`` up to where its last sequences wrote anything."""
        end = self._written[slot]
        if end:
            for pool in (*self.k, *self.v):
                pool[slot, :, :end].zero_()
        self._written[slot] = 0

    def _check_slot(self, slot: int, usable: bool = True) -> None:
        """Raise unless ``slot`` is an allocated sequence (and, if ``usable``, not failed)."""
        slot = checks.check_int("slot", slot)
        if slot not in self.allocator.in_use:
            raise ValueError(f"slot {slot} is not an allocated sequence (in use: {sorted(self.allocator.in_use)})")
        if usable and slot in self._failed:
            raise SlotFailedError(
                f"slot {slot} is unusable: {self.failed(slot)}; restore a snapshot of it (cache.restore), "
                "truncate it to 0 tokens or free it"
            )

    def failed(self, slot: int) -> str | None:
        """Why ``slot`` is unusable, or None when it is fine."""
        reason = self._failed.get(slot)
        if not isinstance(reason, tuple):
            return reason
        what, slots, error = reason  # a step's mark (begin_step, fail_step)
        if error is None:
            return f"a {what} step on slots {list(slots)} did not complete"
        return (f"a {what} step on slots {list(slots)} raised {error} part-way, after some layers may have "
                "updated the slot's state")

    def length(self, slot: int) -> int:
        """Tokens ``slot`` holds (for a failed slot: before the operation that failed)."""
        self._check_slot(slot, usable=False)
        return self.lengths[slot]

    def check_room(self, slot: int, new_tokens: int) -> None:
        """Raise unless ``slot`` is usable and can take ``new_tokens`` more tokens."""
        self._check_slot(slot)
        if self.lengths[slot] + new_tokens > self.max_len:
            raise ValueError(
                f"slot {slot} holds {self.lengths[slot]} tokens; {new_tokens} more exceed max_len={self.max_len}"
            )

    # ------------------------------------------------------------------ steps

    def begin_step(self, slots: Sequence[int], counts: Sequence[int], what: str) -> None:
        """Start a step that feeds ``counts[i]`` tokens to ``slots[i]`` (checked distinct, usable
        and with room): the slots are marked failed until ``commit_step`` or ``abort_step``, and
        a pending verify is dropped (a step reuses its buffers). A few microseconds a step: the
        failure's message is only formatted when someone reads it."""
        if len(slots) > 1 and len(set(slots)) != len(slots):
            checks.check_slot_values("slots", slots, self.config.max_seqs)  # names the duplicate
        for slot, n in zip(slots, counts):
            self.check_room(slot, n)
        if self._pending is not None:
            self._drop_pending(f"a {what} step ran since")
        reason = (what, slots, None)
        for slot, n in zip(slots, counts):
            end = self.lengths[slot] + n
            if end > self._written[slot]:
                self._written[slot] = end
            self._failed[slot] = reason

    def commit_step(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        for slot, n in zip(slots, counts):  # one slot at a time: an interrupt leaves the rest marked
            self.lengths[slot] += n
            del self._failed[slot]

    def abort_step(self, slots: Sequence[int]) -> None:
        """The step wrote nothing to the slots' states: they are as they were."""
        for slot in slots:
            self._failed.pop(slot, None)

    def fail_step(self, slots: Sequence[int], what: str, error: BaseException) -> None:
        """The ``what`` step raised after (maybe) writing part of the slots' states."""
        reason = (what, slots, type(error).__name__)
        for slot in slots:
            self._failed[slot] = reason

    # ------------------------------------------------------------------ speculative decoding

    def set_pending(self, pending: PendingVerify) -> None:
        """Keep what ``accept`` needs after a verify step over ``pending.slots``."""
        self._pending = pending

    def _drop_pending(self, why: str) -> None:
        if self._pending is not None:
            self._pending, self._pending_lost = None, why

    def _forget_pending(self, slot: int, what: str) -> None:
        """``slot`` was ``what`` (freed, truncated, restored, forked): a pending verify of it is void."""
        if self._pending is not None and slot in self._pending.slots:
            self._drop_pending(f"slot {slot} was {what} since the verify")

    @torch.no_grad()
    def accept(self, counts: Sequence[int]) -> None:
        """Keep the first ``counts[b]`` (1 .. k + 1) tokens of the pending verify for each of its
        slots: recurrent states, conv states and lengths go back exactly to that token."""
        pending = self._pending
        if pending is None:
            raise RuntimeError(f"accept() needs a verify() before it, and none is pending: {self._pending_lost}")
        counts = _counts(counts, pending.width, pending.slots)
        dev = self.conv[0].device if self.conv else torch.device(self.config.device)
        rows = torch.arange(len(counts), device=dev)
        n = torch.tensor(counts, dtype=torch.long, device=dev)
        slots = torch.tensor(pending.slots, dtype=torch.long, device=dev)
        width = self.spec.linear.conv_width - 1
        # Everything is computed before the first write, so that a failure (out of memory)
        # changes nothing; the writes themselves run under the failed mark.
        rolled = []
        window = n[:, None] + torch.arange(width, device=dev)[None, :]  # the W - 1 inputs before token n
        for aux, conv_pool in zip(pending.aux, self.conv):
            inputs = torch.cat([aux.conv_before[rows], aux.conv_inputs[rows].transpose(1, 2).to(conv_pool.dtype)], -1)
            conv = torch.gather(inputs, 2, window[:, None, :].expand(-1, inputs.shape[1], -1))
            rolled.append((aux.states[rows, n - 1], conv))
        for slot in pending.slots:
            self._failed[slot] = "accept() did not complete"
        for (state, conv), state_pool, conv_pool in zip(rolled, self.state, self.conv):
            state_pool[slots] = state
            conv_pool[slots] = conv
        self._drop_pending("accept() consumed the verify")
        for slot, start, c in zip(pending.slots, pending.starts, counts):
            self.lengths[slot] = start + c
            self._invalidate(slot, keep_up_to=start + c)
            del self._failed[slot]

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, slot: int) -> Snapshot:
        """Save the conv and recurrent states of ``slot`` at its current length."""
        self._check_slot(slot)
        snap = Snapshot(slot, self.lengths[slot], [c[slot].clone() for c in self.conv],
                        [s[slot].clone() for s in self.state], self.id)
        self._snapshots.setdefault(slot, []).append(snap)
        return snap

    def drop(self, snapshot: Snapshot) -> None:
        """Forget a snapshot (its memory is released with the last reference)."""
        snaps = self._snapshots.get(snapshot.slot, [])
        if snapshot in snaps:
            snaps.remove(snapshot)
        snapshot.valid = False

    def snapshots(self, slot: int) -> list[Snapshot]:
        return list(self._snapshots.get(slot, []))

    def _check_snapshot(self, snapshot: Snapshot) -> None:
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"expected a Snapshot, got {type(snapshot).__name__}")
        if snapshot.cache_id != self.id:
            raise ValueError(
                f"the snapshot of slot {snapshot.slot} at length {snapshot.length} was taken by another cache "
                f"(cache {snapshot.cache_id}; this is cache {self.id}): its attention prefix is not here"
            )
        if not snapshot.valid:
            raise ValueError(
                f"the snapshot of slot {snapshot.slot} at length {snapshot.length} is no longer valid: the slot "
                "was freed or cut back below that length since"
            )
        self._check_slot(snapshot.slot, usable=False)  # a failed slot's prefix and snapshots are intact

    def _invalidate(self, slot: int, keep_up_to: int) -> None:
        """Invalidate the snapshots of ``slot`` longer than ``keep_up_to`` tokens, whose attention
        prefix is about to be rewritten."""
        kept = []
        for snap in self._snapshots.get(slot, []):
            if snap.length > keep_up_to:
                snap.valid = False
            else:
                kept.append(snap)
        self._snapshots[slot] = kept

    def _load(self, slot: int, snapshot: Snapshot) -> None:
        for pool, saved in zip(self.conv, snapshot.conv):
            pool[slot].copy_(saved)
        for pool, saved in zip(self.state, snapshot.state):
            pool[slot].copy_(saved)

    def restore(self, snapshot: Snapshot) -> None:
        """Bring the snapshot's slot back to the snapshot: states and length together."""
        self._check_snapshot(snapshot)
        if snapshot.length > self.lengths[snapshot.slot]:
            raise ValueError(f"snapshot at {snapshot.length} tokens is longer than slot {snapshot.slot} "
                             f"({self.lengths[snapshot.slot]} tokens)")
        slot = snapshot.slot
        self._forget_pending(slot, "restored")
        self._invalidate(slot, keep_up_to=snapshot.length)
        self._failed[slot] = "restore() did not complete"
        self._load(slot, snapshot)
        self.lengths[slot] = snapshot.length
        del self._failed[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Cut ``slot`` back to its first ``length`` tokens.

        The recurrent and conv states cannot be recomputed backwards: this needs a snapshot of
        ``slot`` at exactly ``length`` (or ``length == 0``). Otherwise it raises ``ValueError``
        and the cache is left as it was.
        """
        self._check_slot(slot, usable=False)
        length = checks.check_int("length", length)
        current = self.lengths[slot]
        if not 0 <= length <= current:
            raise ValueError(f"cannot truncate slot {slot} of length {current} to {length} tokens")
        if length == current and slot not in self._failed:
            return
        if length == 0:  # an empty sequence, maybe another request's: as from allocate()
            self._forget_pending(slot, "truncated")
            self._invalidate(slot, keep_up_to=0)
            self._reset(slot)
            self._clear_attention(slot)
            self._failed.pop(slot, None)
            return
        matches = [s for s in self._snapshots.get(slot, []) if s.length == length and s.valid]
        if not matches:
            points = sorted({s.length for s in self._snapshots.get(slot, []) if s.valid})
            raise ValueError(
                f"cannot truncate slot {slot} from {current} to {length} tokens: its recurrent state has no "
                f"snapshot at {length} (snapshots at {points or 'none'}); take cache.snapshot(slot) at the "
                "points you may return to"
            )
        self.restore(matches[-1])

    def fork(self, source: int | Snapshot) -> int:
        """A new sequence equal to ``source`` (a slot, or a snapshot for prefix reuse): attention
        prefix, conv and recurrent states and length are copied. Returns the new slot."""
        if isinstance(source, Snapshot):
            self._check_snapshot(source)
            src, length = source.slot, source.length
        else:
            self._check_slot(source)
            src, length = source, self.lengths[source]
        self._forget_pending(src, "forked")
        slot = self.allocator.allocate()  # raises, changing nothing, when none is free
        self._failed[slot] = "fork() did not complete"
        self._clear_attention(slot)
        for pool in (*self.k, *self.v):
            pool[slot, :, :length].copy_(pool[src, :, :length])
        self._written[slot] = length
        if isinstance(source, Snapshot):
            self._load(slot, source)
        else:
            for pool in (*self.conv, *self.state):
                pool[slot].copy_(pool[src])
        self.lengths[slot] = length
        del self._failed[slot]
        return slot


def _counts(counts: Sequence[int], width: int, slots: list[int]) -> list[int]:
    """accept's counts: one int in ``[1, width]`` per verified slot."""
    counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    if len(counts) != len(slots):
        raise ValueError(f"accept needs one count per verified slot {slots}, got {counts}")
    counts = [checks.check_int(f"accept's count for slot {slot}", c) for slot, c in zip(slots, counts)]
    if not all(1 <= c <= width for c in counts):
        raise ValueError(f"accept needs counts in [1, {width}] for the verified slots {slots}, got {counts}")
    return counts
