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
sequence (free, truncate, restore, fork) checks everything first and changes the attention part
and the recurrent part together, or raises and changes nothing.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from graphdelta import checks
from graphdelta.runtime.layers import ModelSpec
from graphdelta.runtime.planner import MemoryPlan, plan_memory


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    max_seqs: int  # slots
    max_len: int  # tokens per sequence (prompt + generated)
    dtype: torch.dtype = torch.float32  # attention KV and conv states (the model's dtype)
    device: str | torch.device = "cpu"
    state_layout: str = "kv"
    state_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.max_seqs < 1 or self.max_len < 1:
            raise ValueError(f"max_seqs and max_len must be positive, got {self.max_seqs} and {self.max_len}")
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
    the slot: the snapshot is valid as long as those ``length`` positions were not rewritten."""

    slot: int
    length: int
    conv: list[Tensor]  # per linear layer [conv_dim, conv_width - 1]
    state: list[Tensor]  # per linear layer [heads, k_dim, v_dim] (or v_dim, k_dim)
    valid: bool = True


class HybridCache:
    def __init__(self, spec: ModelSpec, config: CacheConfig):
        self.spec = spec
        self.config = config
        self.plan: MemoryPlan = plan_memory(spec, config.dtype, config.state_dtype)
        n, L, dev = config.max_seqs, config.max_len, torch.device(config.device)
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
        self._snapshots: dict[int, list[Snapshot]] = {}

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
        return slot

    def free(self, slot: int) -> None:
        self.allocator.free(slot)
        self._invalidate(slot, keep_up_to=-1)
        self.lengths[slot] = 0

    def _reset(self, slot: int) -> None:
        for t in (*self.conv, *self.state):
            t[slot].zero_()
        self.lengths[slot] = 0

    def _check_slot(self, slot: int) -> None:
        if slot not in self.allocator.in_use:
            raise ValueError(f"slot {slot} is not an allocated sequence (in use: {sorted(self.allocator.in_use)})")

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self.lengths[slot]

    def check_room(self, slot: int, new_tokens: int) -> None:
        """Raise unless ``slot`` can take ``new_tokens`` more tokens."""
        self._check_slot(slot)
        if self.lengths[slot] + new_tokens > self.max_len:
            raise ValueError(
                f"slot {slot} holds {self.lengths[slot]} tokens; {new_tokens} more exceed max_len={self.max_len}"
            )

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, slot: int) -> Snapshot:
        """Save the conv and recurrent states of ``slot`` at its current length."""
        self._check_slot(slot)
        snap = Snapshot(slot, self.lengths[slot], [c[slot].clone() for c in self.conv],
                        [s[slot].clone() for s in self.state])
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
        if not snapshot.valid:
            raise ValueError(
                f"the snapshot of slot {snapshot.slot} at length {snapshot.length} is no longer valid: the slot "
                "was freed or cut back below that length since"
            )
        self._check_slot(snapshot.slot)

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
        self._invalidate(snapshot.slot, keep_up_to=snapshot.length)
        self._load(snapshot.slot, snapshot)
        self.lengths[snapshot.slot] = snapshot.length

    def truncate(self, slot: int, length: int) -> None:
        """Cut ``slot`` back to its first ``length`` tokens.

        The recurrent and conv states cannot be recomputed backwards: this needs a snapshot of
        ``slot`` at exactly ``length`` (or ``length == 0``). Otherwise it raises ``ValueError``
        and the cache is left as it was.
        """
        self._check_slot(slot)
        current = self.lengths[slot]
        if not 0 <= length <= current:
            raise ValueError(f"cannot truncate slot {slot} of length {current} to {length} tokens")
        if length == current:
            return
        if length == 0:
            self._invalidate(slot, keep_up_to=0)
            self._reset(slot)
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
        slot = self.allocator.allocate()  # raises, changing nothing, when none is free
        for pool in (*self.k, *self.v):
            pool[slot, :, :length].copy_(pool[src, :, :length])
        if isinstance(source, Snapshot):
            self._load(slot, source)
        else:
            for pool in (*self.conv, *self.state):
                pool[slot].copy_(pool[src])
        self.lengths[slot] = length
        return slot
