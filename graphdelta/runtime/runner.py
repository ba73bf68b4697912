"""The runner: prefill, decode and speculative verification of many sequences over one
``HybridCache``.

- ``prefill(slots, pieces)``: the next piece of each sequence's prompt, packed varlen in one
  forward; a piece continues from whatever the slot holds (chunked prefill).
- ``decode(slots, tokens)``: one token per sequence, through a static-shape step per batch-size
  bucket (1, 2, 4, ... max_batch) and attention-window bucket (64, 128, 256, ... max_len: the
  longest live sequence, rounded up); rows past the batch point at slot -1 and change
  nothing. On CUDA each (batch, window) bucket's step is captured once as a CUDA graph over the
  fixed cache buffers and replayed; slots are inputs, so sequences joining and leaving never
  force a re-capture, and attention reads only the positions its bucket can hold (a 32k cache
  holding 300-token sequences reads 512 positions a step, not 32k). On CPU the same step runs
  eagerly, its window rounded up to a multiple of 64, or with ``compile_steps`` compiled by
  inductor per bucket and then called without Dynamo, the CPU counterpart of a graph replay
  (``replay.py``).
- ``verify(slots, tokens)`` then ``accept(counts)``: run k + 1 tokens per sequence keeping the
  state after each, then roll every sequence back to its last accepted token (the cache's
  ``accept``).

Atomic steps: each call is a transaction over its slots (``HybridCache.begin_step``). An eager
step holds the new conv and recurrent states until after the model's head (``Writes``), so a
step that raises in any layer (an exception, out of memory, Ctrl-C) has written no state: its
slots stay as they were, and retrying it gives the same logits as if it had never run. Where a
step writes its pools as it goes (the Triton step kernels, a compiled step, a CUDA graph
replay) or fails while applying the writes, its slots are marked failed instead: any later use
raises ``SlotFailedError`` until the slot is restored from a snapshot, truncated to 0 or freed.
Neither costs a copy: a few dictionary operations per step (BENCHMARKS.md, "atomic steps").

No step waits for the GPU. Slot lists and prompt lengths are validated on the host once per
call (``checks.check_slot_values``, the check the decode and conv-update ops share), and the
forward calls the ops' unchecked ``torch.ops.graphdelta`` entries: checking index tensors (or
``cu_seqlens``) would wait for a GPU in every layer. Everything a call sends to the device
(tokens, slots, positions, sequence offsets) is assembled on the host and goes in one copy
from pinned memory that does not block (``to_device``).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections import abc
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from graphdelta import checks, progress
from graphdelta.runtime.cache import CacheConfig, HybridCache, LinearAux, PendingVerify
from graphdelta.runtime.forward import Batch, HybridForward, Writes, experts_implementation, static_experts
from graphdelta.runtime.layers import ModelSpec
from graphdelta.runtime.layouts import Layouts
from graphdelta.runtime.replay import Replay, capture, module_tree, recording_inductor, resets

WINDOW_BLOCK = 64  # attention windows: multiples of this (eager), or it times powers of 2 (static)


def unwrap(model: Any) -> nn.Module:
    """The transformers model behind ``model`` (itself, or what ``graphdelta.compile`` wrapped)."""
    inner = getattr(model, "model", None)
    # A wrapper holds the LM as .model; an LM's own .model is its decoder, and the LM holds the
    # head itself (hasattr would not tell: graphdelta's wrapper reads attributes through).
    own_head = isinstance(model, nn.Module) and "lm_head" in model._modules
    if isinstance(inner, nn.Module) and not own_head and hasattr(inner, "lm_head"):
        return inner
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected a transformers causal LM or a graphdelta-compiled one, got {type(model).__name__}")


def compiled_state_layout(model: Any) -> str | None:
    """The recurrent-state layout ``graphdelta.compile`` chose, if ``model`` is compiled and says."""
    plan = getattr(model, "plan", None)
    layouts = {getattr(lp, "state_layout", None) for lp in getattr(plan, "layers", [])} - {None}
    return layouts.pop() if len(layouts) == 1 else None


def token_ids(tokens: Any, what: str, vocab: int | None = None) -> Tensor:
    """``tokens`` as a long tensor, refused with an error naming ``what`` when it is text,
    non-integer, or (given ``vocab``) holds an id outside ``[0, vocab)``: such an id would read
    past the embedding table, inside a graph replay on CUDA. Ids already on a GPU are not
    range-checked: reading them would wait for the device at every step, and ids sampled there
    from the model's logits are in range."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{what} must be token ids, got {type(tokens).__name__} {tokens[:40]!r}: tokenize it first")
    if host_ids(tokens, vocab):
        return torch.tensor(tokens, dtype=torch.long)
    t = torch.as_tensor(tokens)
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{what} must be integer token ids, got dtype {t.dtype}")
    t = t.long()
    if vocab is not None and t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t[(t < 0) | (t >= vocab)][0])
        raise ValueError(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab})")
    return t


def host_ids(tokens: Any, vocab: int | None = None) -> bool:
    """Whether ``tokens`` is a list of a few host ints (generate's decode tokens, every step),
    each in ``[0, vocab)`` when given: checked in Python. A tensor's range check is two
    reductions, ~30 us of a tiny model's step."""
    return (type(tokens) is list and 0 < len(tokens) <= 256 and all(type(i) is int for i in tokens)
            and (vocab is None or 0 <= min(tokens) and max(tokens) < vocab))


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """Sizes with a step of their own: ``smallest`` times powers of two below ``largest``, then
    ``largest`` (batch sizes from 1; attention windows from ``WINDOW_BLOCK``)."""
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= 2
    return out + [largest]


def to_device(parts: Sequence[Sequence[int] | Tensor], device: torch.device) -> list[Tensor]:
    """Host int lists or int64 CPU tensors -> 1-D int64 tensors on ``device``, in one copy: from
    pinned memory and non-blocking on CUDA, so the host goes on queueing the step's kernels
    (the caching host allocator keeps the pinned block until the copy has run). On CPU there is
    nothing to copy: lists become tensors and tensors come back flattened, as views when they
    can be (the runner passes only tensors it made for the call; batching them into one copy
    and splitting it again cost ~20 us of a tiny model's step)."""
    flat = [p.reshape(-1) if isinstance(p, Tensor) else torch.tensor(p, dtype=torch.long) for p in parts]
    if device.type == "cpu":
        return [t.long() for t in flat]
    sizes = [t.numel() for t in flat]
    host = torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).split(sizes))


class _Graph:
    """One (batch, width, window) bucket's step captured as a CUDA graph over static inputs."""

    def __init__(self, runner: "Runner", bucket: int, width: int, keep: bool, window: int):
        dev = runner.device
        self.tokens = torch.zeros(bucket, width, dtype=torch.long, device=dev)
        self.slots = torch.full((bucket,), -1, dtype=torch.long, device=dev)
        self.starts = torch.zeros(bucket, dtype=torch.long, device=dev)
        with torch.cuda.device(dev):  # streams and the capture on the model's GPU, not cuda:0
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (Triton compiles) with padded rows only
                for _ in range(2):
                    runner._run(self.tokens, self.slots, self.starts, window, keep)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=runner._graph_pool):
                self.logits, self.aux = runner._run(self.tokens, self.slots, self.starts, window, keep)

    def __call__(self, tokens: Tensor, slots: Tensor, starts: Tensor) -> tuple[Tensor, list[LinearAux]]:
        self.tokens.copy_(tokens)
        self.slots.copy_(slots)
        self.starts.copy_(starts)
        self.graph.replay()
        return self.logits, self.aux


class _HostInputs:
    """A compiled CPU step's tokens ``[bucket, T]``, slots and positions ``[bucket]``, kept from
    step to step and filled in place through numpy views: the CPU counterpart of ``_Graph``'s
    static inputs. Building three tensors per step instead cost 36-64 us of the shipped model's
    ~0.65 ms ``Runner.decode`` in a one-off interleaved timing (1.01-1.18x in
    ``benchmarks/token_overhead.py``'s "inputs built per step" row; BENCHMARKS.md). A step holds
    them from its fill to its end (``hold``, ``release``); a step that finds them held (another
    thread's step on the same runner) builds its own. ``make`` returns None where torch has no
    working numpy: steps then build their inputs."""

    def __init__(self, bucket: int, width: int):
        self.tokens = torch.zeros(bucket, width, dtype=torch.long, device="cpu")
        self.slots = torch.full((bucket,), -1, dtype=torch.long, device="cpu")
        self.starts = torch.zeros(bucket, dtype=torch.long, device="cpu")
        self._views = self.tokens.numpy(), self.slots.numpy(), self.starts.numpy()
        self._lock = threading.Lock()

    @classmethod
    def make(cls, bucket: int, width: int) -> "_HostInputs | None":
        try:
            return cls(bucket, width)
        except (RuntimeError, ImportError):  # "Numpy is not available"
            return None

    def hold(self, slots: list[int], starts: list[int], tokens: Tensor | list[int]) -> bool:
        """Fill them for a step of ``B = len(slots)`` real rows (padded rows after: slot -1,
        position 0, token 0) and hold them until ``release``; False, filling nothing, while
        another step holds them. ``tokens``: ``[B, T]``, or a list of one int per row (T = 1)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            t, s, p = self._views
            B = len(slots)
            s[:B], p[:B] = slots, starts
            if type(tokens) is list:
                t[:B, 0] = tokens
            else:
                t[:B] = tokens.numpy()
            if B < len(s):
                s[B:], p[B:], t[B:] = -1, 0, 0
        except BaseException:
            self._lock.release()
            raise
        return True

    def release(self) -> None:
        self._lock.release()


class Runner:
    def __init__(
        self,
        model: Any,
        max_seqs: int = 8,
        max_len: int | None = None,
        max_batch: int | None = None,
        state_layout: str | None = None,
        cuda_graphs: bool | None = None,
        compile_steps: bool = False,
        skip_guards: bool = True,
    ):
        """``max_len`` (tokens per sequence) defaults to 1024, or the model's
        ``max_position_embeddings`` when that is smaller; a longer one, or a cache larger than
        the device's free memory, is refused before anything is allocated. ``skip_guards``:
        compiled steps skip Dynamo's guard evaluation once compiled (``_dynamo_context``), and
        compiled CPU decode steps skip Dynamo altogether: they call inductor's compiled function
        with the arguments of their compiling call (``replay.py``)."""
        max_seqs = checks.check_int("max_seqs", max_seqs, 1)
        max_batch = max_seqs if max_batch is None else checks.check_int("max_batch", max_batch, 1)
        state_layout = state_layout or compiled_state_layout(model) or "kv"
        self.model = unwrap(model).eval()
        param = next(self.model.parameters())
        self.device = param.device
        self.spec = ModelSpec.of_model(self.model)
        if max_len is None:
            max_len = min(1024, self.spec.max_positions or 1024)
        self.vocab = self.model.get_input_embeddings().num_embeddings
        self.cache = HybridCache(self.spec, CacheConfig(max_seqs, max_len, param.dtype, param.device, state_layout))
        self.forward = HybridForward(self.model, self.cache)
        self.max_batch = min(max_batch, max_seqs)
        self.buckets = buckets(self.max_batch)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on CUDA, got {self.device}")
        self.windows = buckets(self.cache.max_len, min(WINDOW_BLOCK, self.cache.max_len))
        if len(self.windows) > 1 and self.windows[-1] < 2 * self.windows[-2]:
            # max_len absorbs the power of two below it: a step shape costs a compile (~25 s on
            # CPU for the tiny model) or a CUDA graph, and a window at most 4x the positions
            # in use costs little (attention is a quarter of a hybrid's layers)
            del self.windows[-2]
        self._graphs: dict[tuple[int, int, bool, int], _Graph] = {}
        self._static_keys: set[tuple[int, int, bool, int]] = set()  # step shapes compiled or captured
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # torch.compile of the step (inductor), one compilation per (batch, window) bucket, as
        # under CUDA graphs: the shapes never change within a bucket.
        self.compile_steps = compile_steps
        self.experts = experts_implementation(self.device, param.dtype)  # MoE dispatch of static steps
        # A tiny step's time is mostly the Python around its kernels: on CPU, inductor's C++
        # wrapper calls them from one C++ function (tiny Qwen3-Next, batch 1: 0.73 ms against
        # 0.99 ms per step, best of 120). A larger one's is reading its weights (_cpu_step_options).
        options = _cpu_step_options() if self.device.type == "cpu" else None
        # one compilation per static shape (_dynamo_context: how each call runs); on CPU its
        # decode steps are then replayed without Dynamo (replay.py)
        if not compile_steps:
            self._forward = self.forward
        elif self.device.type == "cpu":
            self._forward = torch._dynamo.optimize(recording_inductor(options), dynamic=False)(self.forward)
        else:
            self._forward = torch.compile(self.forward, dynamic=False, options=options)
        self._replays: dict[tuple[int, int, bool, int], Replay] = {}
        self._host_inputs: dict[tuple[int, int], _HostInputs | None] = {}  # compiled CPU steps' inputs
        self._resets = resets()  # Dynamo cache resets seen (_forget_if_reset)
        from graphdelta.compiler import RECOMPILE_LIMIT  # (the compiler imports the runtime)

        self._recompile_limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)  # reusable
        self._compiling = False  # inside the first call of a static step shape (_first_of)
        self._entries: int | None = None  # the step frame's compiled entries after this runner's last compile
        self._layouts: Layouts | None = None  # what compiled CPU steps read, as of this runner's last compile
        self.skip_guards = skip_guards and hasattr(torch.compiler, "set_stance")

    # ------------------------------------------------------------------ sequences

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def _slots(self, slots: Sequence[int]) -> list[int]:
        """The host-side validation of a call's slots: ints, each a slot of the cache, none twice
        (usable and with room: ``HybridCache.begin_step``)."""
        if isinstance(slots, Tensor):
            slots = slots.tolist()
        if isinstance(slots, (str, bytes)) or not isinstance(slots, abc.Sequence) or not slots:
            raise ValueError(f"slots must be a non-empty list of slot ints, got {slots!r}")
        out = [checks.check_int(f"slots[{i}]", slot, 0) for i, slot in enumerate(slots)]
        checks.check_slot_values("slots", out, self.cache.config.max_seqs)
        return out

    def _atomic(self, slots: list[int], counts: list[int], what: str, writes: Writes | None,
                run: Callable[[], Any]) -> Any:
        """``run()`` a step over ``slots`` (``counts[i]`` new tokens each) as a transaction:
        commit on success; on any exception, abort if the step wrote no state (``writes``
        never started applying), else leave the slots failed."""
        self.cache.begin_step(slots, counts, what)
        try:
            result = run()
        except BaseException as err:
            if writes is not None and not writes.started:
                self.cache.abort_step(slots)
            else:
                self.cache.fail_step(slots, what, err)
            raise
        self.cache.commit_step(slots, counts)
        return result

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def prefill(self, slots: Sequence[int], pieces: Sequence[Sequence[int] | Tensor]) -> Tensor:
        """Feed the next piece of each slot's prompt; returns the logits after each piece ``[N, V]``."""
        slots = self._slots(slots)
        if len(slots) != len(pieces):
            raise ValueError(f"prefill needs one piece per slot, got {len(slots)} slots and {len(pieces)} pieces")
        pieces = [token_ids(p, f"the piece for slot {slot}", self.vocab).reshape(-1) for slot, p in zip(slots, pieces)]
        lengths = [int(p.numel()) for p in pieces]
        for slot, n in zip(slots, lengths):
            if n == 0:
                raise ValueError(f"prefill got an empty piece for slot {slot}")
            self.cache.check_room(slot, n)
        starts = [self.cache.lengths[s] for s in slots]
        # The packed batch's index tensors, built on the host (their values are known there:
        # nothing waits for the device) and sent with the tokens in one copy.
        total = sum(lengths)
        cu = torch.tensor([0, *itertools.accumulate(lengths)])
        rows = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(lengths), output_size=total)
        tokens, slots_d, starts_d, cu_d, rows_d, cols_d = to_device(
            [torch.cat([p.cpu() for p in pieces]), slots, starts, cu, rows, torch.arange(total) - cu[rows]],
            self.device)
        batch = Batch(
            slots=slots_d, starts=starts_d, width=max(lengths),
            window=self._window(max(s + n for s, n in zip(starts, lengths)), packed=True),
            cu_seqlens=cu_d, rows=rows_d, cols=cols_d,
        )
        tokens = tokens[None]
        writes = Writes()
        return self._atomic(slots, lengths, "prefill", writes,
                            lambda: self.forward(tokens, batch, last_only=True, writes=writes))

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int] | Tensor) -> Tensor:
        """One token for each of the ``B`` slots: a list of ``B`` ints, or a tensor of ``B``
        ids (``[B]`` or ``[B, 1]``); returns the next-token logits ``[B, V]``."""
        slots = self._slots(slots)
        if not host_ids(tokens, self.vocab):  # (a list of host ints goes to the step as it is)
            tokens = token_ids(tokens, "decode tokens", self.vocab).reshape(-1, 1)
        if len(tokens) != len(slots):
            raise ValueError(f"decode needs one token per slot, got {len(tokens)} tokens for slots {list(slots)}")
        logits, _ = self._step(slots, tokens, keep=False)
        return logits[:, 0]

    @torch.no_grad()
    def verify(self, slots: Sequence[int], tokens: Tensor) -> Tensor:
        """Run ``[B, k + 1]`` tokens (the last accepted token and k drafts) per slot, keeping the
        state after each; returns their logits ``[B, k + 1, V]``. Call ``accept`` next."""
        slots = self._slots(slots)
        tokens = token_ids(tokens, "verify tokens", self.vocab)
        if tokens.dim() != 2 or tokens.shape[0] != len(slots) or tokens.shape[1] < 1:
            raise ValueError(f"verify needs tokens [B={len(slots)}, k + 1], got shape {list(tokens.shape)}")
        starts = [self.cache.length(s) for s in slots]
        logits, aux = self._step(slots, tokens, keep=True)
        self.cache.set_pending(PendingVerify(slots, starts, tokens.shape[1], aux))
        return logits

    def accept(self, counts: Sequence[int]) -> None:
        """Keep the first ``counts[b]`` (1 .. k + 1) tokens of the last ``verify`` for each of its
        slots (``HybridCache.accept``)."""
        self.cache.accept(counts)

    def _window(self, longest: int, packed: bool = False) -> int:
        """The cached positions attention reads when the longest sequence of a call ends at
        ``longest``: a window bucket for static steps (CUDA graphs, compiled steps), which
        need few distinct shapes; else the next multiple of ``WINDOW_BLOCK``."""
        if (self.cuda_graphs or self.compile_steps) and not packed:
            return next(w for w in self.windows if w >= longest)
        return min(self.cache.max_len, -(-longest // WINDOW_BLOCK) * WINDOW_BLOCK)

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch of {batch} sequences exceeds max_batch={self.max_batch}")

    def _step(self, slots: list[int], tokens: Tensor | list[int], keep: bool) -> tuple[Tensor, list[LinearAux]]:
        """A step of ``tokens`` ``[B, T]`` for ``slots``, or of a list of one host int per slot."""
        self._forget_if_reset()
        listed = type(tokens) is list
        B, T = (len(tokens), 1) if listed else tokens.shape
        for slot in slots:
            self.cache.check_room(slot, T)
        size = self.bucket(B)
        starts = [self.cache.lengths[s] for s in slots]
        window = self._window(max(starts) + T)
        key = (size, T, keep, window)
        if self.compile_steps and self.device.type == "cpu" and (listed or tokens.device.type == "cpu"):
            if (size, T) not in self._host_inputs:
                self._host_inputs[size, T] = _HostInputs.make(size, T)
            host, held = self._host_inputs[size, T], False
            try:
                held = host is not None and host.hold(slots, starts, tokens)
                if held:
                    return self._static_step(slots, key, host.tokens, host.slots, host.starts, B)
            finally:
                if held:
                    host.release()
        if listed:
            tokens = torch.tensor(tokens, dtype=torch.long).view(B, 1)
        pad = size - B
        # Padded rows: slot -1, position 0, token 0. Host-side tokens travel with the slots.
        parts: list = [slots + [-1] * pad, starts + [0] * pad]
        on_host = tokens.device.type == "cpu"
        if on_host:
            parts.append(torch.cat([tokens, tokens.new_zeros(pad, T)]))
        slots_p, starts_p, *rest = to_device(parts, self.device)
        if on_host:
            tokens_p = rest[0].view(size, T)
        else:  # already on the device (sampled there): padded on the device
            tokens_p = torch.cat([tokens.to(self.device), tokens.new_zeros(pad, T, device=self.device)])
        return self._static_step(slots, key, tokens_p, slots_p, starts_p, B)

    def _static_step(self, slots: list[int], key: tuple[int, int, bool, int], tokens_p: Tensor, slots_p: Tensor,
                     starts_p: Tensor, B: int) -> tuple[Tensor, list[LinearAux]]:
        """The step of shape ``key`` on its padded inputs; the first of a static shape compiles
        (or captures) it."""
        size, T, keep, window = key
        eager = not (self.cuda_graphs or self.compile_steps)
        if not eager and key not in self._static_keys:  # the first call of a shape compiles or captures it
            with self._first_of(key):
                if self.cuda_graphs and key not in self._graphs:  # captured on padded rows, outside the step
                    self._graphs[key] = _Graph(self, size, T, keep, window)
                out = self._step_on(slots, key, tokens_p, slots_p, starts_p, B)
            self._static_keys.add(key)
            return out
        return self._step_on(slots, key, tokens_p, slots_p, starts_p, B)

    @contextlib.contextmanager
    def _first_of(self, key: tuple[int, int, bool, int]):
        """The first call of the static step of shape ``key``, which compiles (or captures) it:
        with progress, and with Dynamo's guards evaluated (``_run``)."""
        size, T, keep, window = key
        what = "capturing a CUDA graph of" if self.cuda_graphs else "compiling"
        self._forget_if_relaid()  # before _compiled() records the layouts anew
        with progress.phase(f"{what} the {'verify' if keep else 'decode'} step "
                            f"(batch bucket {size}, {T} token(s), window {window})"):
            self._compiling = True
            try:
                yield
            finally:
                self._compiling = False
                self._compiled()

    @torch.no_grad()  # as the steps run: Dynamo guards on grad mode, and would compile again
    def prepare(self, batch: int, shortest: int, longest: int) -> None:
        """Compile (``compile_steps``) or capture (CUDA graphs) the decode step of ``batch``
        sequences for every attention window its steps reach while the sequences they feed end
        at ``shortest`` to ``longest`` positions (token included), on padded rows only (no slot
        changes): a stream then does not stall part-way to compile. Eager steps need nothing,
        and neither does an empty range (``shortest > longest``: no decode step)."""
        longest = min(longest, self.cache.max_len)
        if not (self.cuda_graphs or self.compile_steps) or shortest > longest:
            return
        self._forget_if_reset()
        size = self.bucket(min(batch, self.max_batch))
        lo, hi = self._window(shortest), self._window(longest)
        for window in (w for w in self.windows if lo <= w <= hi):
            key = (size, 1, False, window)
            if key in self._static_keys:
                continue
            with self._first_of(key):
                if self.cuda_graphs:
                    if key not in self._graphs:
                        self._graphs[key] = _Graph(self, size, 1, False, window)
                else:
                    self._run(torch.zeros(size, 1, dtype=torch.long, device=self.device),
                              torch.full((size,), -1, dtype=torch.long, device=self.device),
                              torch.zeros(size, dtype=torch.long, device=self.device), window, False)
            self._static_keys.add(key)

    def _step_on(self, slots: list[int], key: tuple[int, int, bool, int], tokens_p: Tensor, slots_p: Tensor,
                 starts_p: Tensor, B: int) -> tuple[Tensor, list[LinearAux]]:
        """One static step on padded rows (``key``: bucket, T, keep, window) for ``B`` real rows."""
        _, T, keep, window = key
        eager = not (self.cuda_graphs or self.compile_steps)
        writes = Writes() if eager and self.forward.stages_writes(packed=False) else None

        def run() -> tuple[Tensor, list[LinearAux]]:
            if self.cuda_graphs:
                logits, aux = self._graphs[key](tokens_p, slots_p, starts_p)
                return logits[:B].clone(), aux  # inside: a failed copy must not commit the step
            logits, aux = self._run(tokens_p, slots_p, starts_p, window, keep, writes)
            return logits[:B], aux

        return self._atomic(slots, [T] * B, "verify" if keep else "decode", writes, run)

    def _run(self, tokens: Tensor, slots: Tensor, starts: Tensor, window: int, keep: bool,
             writes: Writes | None = None):
        """The static step: shapes depend only on (bucket, T, window)."""
        aux: list[LinearAux] = []
        if not (self.cuda_graphs or self.compile_steps):
            batch = Batch(slots, starts, tokens.shape[1], window, keep_intermediate=keep)
            return self._forward(tokens, batch, aux, writes=writes), aux  # the model's own MoE dispatch

        key = (tokens.shape[0], tokens.shape[1], keep, window)
        replay = self._replays.get(key)
        # A module's parameter, buffer or submodule was set since the capture: the replay's
        # arguments may be stale, so this call runs with its guards and captures anew.
        recapture = replay is not None and not replay.fresh()
        if recapture:
            del self._replays[key]
            replay = None
            self._forget_if_relaid()
        if (replay is not None and not torch.is_grad_enabled() and replay.fits(tokens, slots, starts)
                and self._may_replay()):
            return replay(tokens, slots, starts), aux
        batch = Batch(slots, starts, tokens.shape[1], window, keep_intermediate=keep)
        rows = tokens.shape[0] if tokens.shape[1] == 1 else 1  # decode steps only (_reduction_rows)
        compiling = self._compiling or recapture
        with (static_experts(self.forward.experts_configs, self.experts), self._dynamo_context(rows, recapture),
              capture() as seen):
            logits = self._forward(tokens, batch, aux)
        if recapture:  # (as after a first call: _first_of)
            self._compiled()
        if compiling and self.device.type == "cpu" and self.skip_guards and not keep and not torch.is_grad_enabled():
            replay = seen.replay([tokens, slots, starts], self.forward, self.cache.buffers(), logits, aux,
                                 HybridForward.forward)
            if replay is not None:
                self._replays[key] = replay
        return logits, aux

    def _dynamo_context(self, rows: int = 1, guarded: bool = False):
        """How a compiled step runs (``rows``: a decode step's batch bucket, else 1). Its first
        call per shape (``_first_of``) compiles it, under the compiler's recompile limit (each
        (batch bucket, T, window) is a compilation of the same frames, and Dynamo's default
        limit of 8 per code object would quietly send the rest to eager), on CPU with inductor's
        matmul limits lifted (``_compiling``, ``_reduction_rows``), and so does every call that
        evaluates its guards (one may compile: after a Dynamo reset, or after another runner
        compiled the frame). Later calls skip Dynamo's guard evaluation, except the guards that
        tell the compiled shapes apart (``skip_guard_eval_unsafe``): the runner fixes what the
        guards check (its modules, its cache, the step's shapes, no autograd), and evaluating
        them is a sizable part of a tiny model's step (with the cheaper MoE switch, the shipped
        model's compiled step went from 0.84 to 0.72 ms, benchmarks/token_overhead.py). So a
        runner's model must not change dtype, device or modules after the runner is made: make
        a new Runner (``skip_guards=False`` keeps the guards). ``guarded``: evaluate them anyway
        (a step captured again for its replay, ``_run``)."""
        if self._compiling or guarded or (self.compile_steps and not self._may_skip_guards()):
            return _compiling(self._recompile_limit, self.device, self._reduction_rows(rows))
        if not self.compile_steps:
            return self._recompile_limit
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def _reduction_rows(self, rows: int) -> int:
        """Up to how many rows a CPU decode step of ``rows`` sequences computes its matmuls as
        reductions (``_compiling``): ``rows`` itself from 2 to ``_LIFTED_ROWS``, else 1. Reading
        the weights bounds a matmul of a few rows as it bounds one of one row, and MKL's GEMM of
        2 or 4 rows reads them slower than inductor's reduction does (AMD EPYC, 2 threads,
        weights from memory, F.linear 1024x1024: 2 rows 1.13 -> 0.45 ms, 4 rows 1.92 -> 0.91 ms;
        at 8 rows MKL is faster again; benchmarks/step_reductions.py times whole steps). The
        pass applies the same limit to a ``bmm``'s batch, and batched MoE experts run one of
        rows x top-k: with one expert per token it would be decomposed too, which made steps
        slower (a one-row step's expert bmm of batch 2: mid-size step 13-15 -> 20-23 ms); so
        models whose experts take fewer than 2 per token (or whose count is unknown) keep 1.
        Dense models (no MoE) are lifted. Verify steps (several tokens per sequence) keep 1:
        only decode steps were measured (``_run``)."""
        if not 2 <= rows <= _LIFTED_ROWS:
            return 1
        per_token = [getattr(c, "num_experts_per_tok", None) for c in self.forward.experts_configs]
        if any(not isinstance(k, int) or k < 2 for k in per_token):
            return 1
        return rows

    def _forget_if_reset(self) -> None:
        """After a reset of Dynamo's caches (``replay.resets``), forget the compiled shapes and
        their replays: each is compiled again by its next call, with its guards (a shape still
        marked compiled would run with its guards skipped and find no entry)."""
        if self._resets != resets():
            self._resets = resets()
            self._forget_compiled()

    def _forget_compiled(self) -> None:
        """Drop every compiled shape and replay: each shape's next call compiles it again."""
        self._static_keys.clear()
        self._replays.clear()
        self._entries = None
        self._layouts = None

    def _compiled(self) -> None:
        """After a call that evaluated its guards (and may have compiled): what later steps may
        choose among with their guards skipped (Dynamo's entries for the step frame), and on CPU
        the layouts of every tensor they may read (``layouts.py``: their steps are compiled
        without inductor's size asserts)."""
        self._entries = _compiled_entries()
        if self.device.type == "cpu" and self.compile_steps:
            places = [(entries, name) for entries, name, value in module_tree(self.forward) if isinstance(value, Tensor)]
            self._layouts = Layouts(places, self.cache.buffers())

    def _forget_if_relaid(self) -> bool:
        """Forget every compiled shape (``_forget_compiled``) if a tensor the steps read changed
        dtype, device, shape or strides since the last compile (``layouts.py``); True if so. Run
        before a compile records the layouts anew: the shapes compiled earlier would read the
        tensor as it was."""
        if self._layouts is not None and not self._layouts.same():
            self._forget_compiled()
            return True
        return False

    def _may_skip_guards(self) -> bool:
        """Whether this step may run with the guards skipped: only under Dynamo's default
        stance (a user's ``force_eager`` etc. stays in force), and only while the step frame's
        compiled entries are the ones there were after this runner's last compile. Fewer means
        Dynamo's caches were reset (``torch._dynamo.reset``): the runner's shapes are forgotten,
        to be compiled again with their guards; more means another runner compiled this frame
        since: the guards run until this runner's next compile. Either way no shape can reach
        an entry that was not compiled for it. The stance is process-wide: compiled code that
        other threads run during a step skips its guards too (the runners' steps through
        Dynamo take turns under one lock, ``static_experts``; replayed steps set no stance)."""
        if not self._default_stance():
            return False
        entries = _compiled_entries()
        if entries is None or entries != self._entries:
            if entries is not None and self._entries is not None and entries < self._entries:
                self._forget_compiled()
            return False
        # a weight or pool of another dtype, shape or strides: its compiled code would read it
        # as it was, with no assert to stop it; every shape compiles again
        return not self._forget_if_relaid()

    def _may_replay(self) -> bool:
        """Whether a replay (``replay.py``) may run this step: as ``_may_skip_guards``, but
        whatever Dynamo's entries for the step frame are now. A replay calls its own compiled
        function with the tensors it was given, never an entry Dynamo chooses, and Dynamo's
        resets drop the replays anyway (``_forget_if_reset``)."""
        return self._default_stance() and not self._forget_if_relaid()

    def _default_stance(self) -> bool:
        """Whether guards may be skipped at all: only by a runner that may (``skip_guards``) and
        under Dynamo's default stance (a user's ``force_eager`` etc. stays in force)."""
        stance = getattr(torch._dynamo.eval_frame, "_stance", None)
        return (self.skip_guards and getattr(stance, "stance", None) == "default"
                and getattr(stance, "backend", None) is None and not getattr(stance, "skip_guard_eval_unsafe", True))


def _cpu_step_options() -> dict[str, Any]:
    """inductor's options for CPU steps. At batch 1 every projection is a matrix-vector
    product bound by reading its weights, and MKL's GEMV reads them at about half the rate of
    the reduction inductor generates for it (AMD EPYC, 2 threads, weights from memory: 1024x1024
    2.2x, 4096x2048 1.7x, 32768x2048 2.1x faster; ``benchmarks/token_overhead.py --config mid``:
    about 22 -> 12.6 ms per compiled step, BENCHMARKS.md). inductor's ``decompose_mm_pass`` turns
    a one-row ``mm`` / ``addmm`` (and a ``bmm`` of batch 1) into that reduction; ``_compiling``
    lifts its size limit, and its row limit to a step's rows up to ``_LIFTED_ROWS``
    (``Runner._reduction_rows``); larger steps' matmuls stay matrix products. The lifted limits
    are written into the pass's options too, where the pass ignores them (it reads them when
    imported), so that inductor's caches keep graphs compiled with and without them apart: the
    row limit a step compiles under follows from its graph (its rows, its experts' top-k) and
    ``_LIFTED_ROWS``. A user's own ``post_grad_fusion_options`` are kept."""
    # Without inductor's asserts of every input's size and strides on each call (the tiny
    # model's step: 85 asserts, about 0.1 ms of 0.66 ms): Runner._may_skip_guards and
    # _may_replay check the layouts of everything a step reads in one call instead (layouts.py).
    options: dict[str, Any] = {"cpp_wrapper": True, "size_asserts": False}
    if _decompose_module() is not None:
        options["post_grad_fusion_options"] = {
            **torch._inductor.config.post_grad_fusion_options,
            "decompose_mm_pass": {"cpu_max_other_dimension_decomposition": _LIFTED,
                                  "cpu_max_first_dimension_decomposition": _LIFTED_ROWS}}
    return options


@functools.cache
def _decompose_module():
    """inductor's matmul decomposition pass, where this torch has it with the CPU size and row
    limits that ``_compiling`` lifts; None elsewhere (steps then compile without it). Imported
    when a CPU runner is made, not with graphdelta: importing inductor takes seconds."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as module
    except ImportError:
        return None
    limits = ("cpu_max_other_dimension_decomposition", "cpu_max_first_dimension_decomposition")
    return module if all(isinstance(getattr(module, name, None), int) for name in limits) else None


_LIFTED = 1 << 62  # no weight is this large
_LIFTED_ROWS = 4  # matmuls of up to this many rows may compile as reductions (_reduction_rows)


@contextlib.contextmanager
def _compiling(recompile_limit, device: torch.device, rows: int = 1):
    """A step call that may compile (a shape's first, or one with its guards evaluated): under
    the compiler's recompile limit, and on CPU with inductor's matmul decomposition for weights
    of any size and matmuls of up to ``rows`` rows (``Runner._reduction_rows``). The pass's
    default limits (2048 for the weight's sides, 1 row) are read once, when inductor imports
    it, and would leave a real model's larger projections and LM head to MKL's GEMV or GEMM;
    they are set for this call only. They are module globals: a ``torch.compile`` of another
    thread that compiles during such a call compiles under them too (the runners' own steps
    take turns under one lock, ``static_experts``)."""
    with recompile_limit:
        module = _decompose_module() if device.type == "cpu" else None
        if module is None:
            yield
            return
        saved = module.cpu_max_other_dimension_decomposition, module.cpu_max_first_dimension_decomposition
        module.cpu_max_other_dimension_decomposition = _LIFTED
        module.cpu_max_first_dimension_decomposition = rows
        try:
            yield
        finally:
            module.cpu_max_other_dimension_decomposition, module.cpu_max_first_dimension_decomposition = saved


def _compiled_entries() -> int | None:
    """How many compiled entries Dynamo holds for the step's frame (``HybridForward.forward``),
    all runners together; None where this torch cannot tell."""
    try:
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(HybridForward.forward.__code__))
    except (AttributeError, RuntimeError, TypeError):
        return None
