"""graphdelta's runtime: a hybrid cache at fixed addresses, packed and chunked prefill, static
decode steps (CUDA graphs on GPU), snapshots, speculative rollback, and ``generate``.

Files, outside in: ``generate.py`` (sampling, the batching loop), ``runner.py`` (prefill /
decode / verify over the cache, one static step per batch bucket), ``forward.py`` (the model's
forward over the cache with graphdelta's ops), ``cache.py`` (buffers, slots, snapshots),
``planner.py`` (bytes per sequence), ``layers.py`` (which layer keeps what).

    runner = Runner(model, max_seqs=8, max_len=4096)
    a, b = runner.allocate(), runner.allocate()
    logits = runner.prefill([a, b], [prompt_a, prompt_b])       # packed, varlen
    logits = runner.decode([a, b], logits.argmax(-1).tolist())  # one static step
    snap = runner.cache.snapshot(a)                             # branch / prefix reuse point
    c = runner.cache.fork(snap)

A call that raises part-way leaves its slots as they were, or unusable (``SlotFailedError``)
until ``runner.cache.restore(snap)``, ``truncate(slot, 0)`` or ``free(slot)``: see runner.py.
"""
from graphdelta.runtime.cache import CacheConfig, HybridCache, SlotAllocator, SlotFailedError, Snapshot
from graphdelta.runtime.generate import generate, sample
from graphdelta.runtime.layers import ModelSpec, layer_kinds
from graphdelta.runtime.planner import MemoryPlan, plan_memory
from graphdelta.runtime.runner import Runner

__all__ = [
    "CacheConfig", "HybridCache", "SlotAllocator", "SlotFailedError", "Snapshot", "ModelSpec", "layer_kinds",
    "MemoryPlan", "plan_memory", "Runner", "generate", "sample",
]
