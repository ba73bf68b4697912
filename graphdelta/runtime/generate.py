"""``graphdelta.generate``: batched generation over the runtime's cache.

Prompts wait in a queue; each round admits as many as there are free slots (one packed
prefill), then advances every running sequence by one token (one static decode step).
Sequences finish independently, on an end-of-sequence token or at ``max_new_tokens``, and
free their slot for the next prompt.
"""
from __future__ import annotations

import collections
import math
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from graphdelta import checks
from graphdelta.runtime.layers import ModelSpec
from graphdelta.runtime.runner import Runner, compiled_state_layout, token_ids, unwrap

_runners: "weakref.WeakKeyDictionary[torch.nn.Module, Runner]" = weakref.WeakKeyDictionary()


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next tokens ``[B]`` from logits ``[B, V]``, on the logits' device: greedy when
    ``temperature == 0``, else sampled from the softmax at ``temperature`` restricted to the
    ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``.
    ``generator`` must live on the logits' device (nothing of size V goes to the host)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if generator is not None and generator.device != logits.device:
        raise ValueError(f"the generator is on {generator.device}, the logits on {logits.device}: "
                         f"make it with torch.Generator(device={str(logits.device)!r})")
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse, by name, sampling settings that are not numbers in range (NaN included)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        checks.check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def _eos_ids(model: torch.nn.Module, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def runner_for(model: Any, max_seqs: int, max_len: int, compile_steps: bool = False) -> Runner:
    """The runner ``generate`` uses for ``model``: kept between calls (its cache is allocated and
    its CUDA graphs captured or steps compiled once) and replaced by a larger one only when a
    call needs more slots, a longer cache, compiled steps, or the other state layout a
    compiled model chose."""
    inner = unwrap(model)
    layout = compiled_state_layout(model)
    runner = _runners.get(inner)
    if runner is not None:
        if (runner.cache.config.max_seqs >= max_seqs and runner.cache.max_len >= max_len
                and layout in (None, runner.cache.state_layout) and runner.compile_steps >= compile_steps):
            return runner
        max_seqs = max(max_seqs, runner.cache.config.max_seqs)
        max_len = max(max_len, runner.cache.max_len)
        compile_steps = compile_steps or runner.compile_steps
    runner = _runners[inner] = Runner(model, max_seqs=max_seqs, max_len=max_len, compile_steps=compile_steps)
    return runner


def generate(
    model: Any,
    prompts: Sequence[Sequence[int] | Tensor] | Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stream: Callable[[int, int], None] | None = None,
    max_batch: int = 8,
    max_len: int | None = None,
    seed: int | None = None,
    runner: Runner | None = None,
    compile_steps: bool = False,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a transformers hybrid causal LM (Qwen3-Next, Qwen3.5, Kimi Linear, OLMo-Hybrid,
            Bailing-Hybrid) or what ``graphdelta.compile`` returned for one.
        prompts: token ids, one sequence per prompt (lists, 1-D tensors, or a 2-D tensor).
        temperature, top_k, top_p: sampling (``temperature=0``: greedy).
        eos_token_id: token(s) that end a sequence; None takes the model's generation config,
            ``[]`` disables.
        stream: called as ``stream(prompt_index, token)`` for every new token, as it comes.
        max_batch: sequences decoded together (the cache has this many slots).
        max_len: cache length per sequence; defaults to the longest prompt + max_new_tokens.
        seed: seeds the sampler (on the model's device: a seed gives other tokens on a GPU).
        runner: run on this ``Runner`` (and its cache) instead of the shared one.
        compile_steps: compile each batch-size bucket's decode step with inductor on first use
            (seconds per bucket; on CPU a tiny model's step then runs ~6x faster than
            transformers eager, benchmarks/decode.py). On CUDA the steps are CUDA graphs anyway.

    Returns:
        The new tokens of each prompt, in prompt order (ending with the EOS token if one came).
    """
    max_new_tokens = checks.check_int("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p)
    max_batch = checks.check_int("max_batch", max_batch, 1)
    if max_len is not None:
        max_len = checks.check_int("max_len", max_len, 1)
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be token ids, one sequence per prompt, got {type(prompts).__name__} "
                        f"{prompts[:40]!r}: tokenize it first")
    ids = [token_ids(p, f"prompt {i}").reshape(-1) for i, p in enumerate(prompts)]
    prompts = [t.tolist() for t in ids]
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"empty prompt at index {[len(p) for p in prompts].index(0)}")
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return outputs
    longest = max(len(p) for p in prompts) + max_new_tokens
    positions = ModelSpec.of_model(unwrap(model)).max_positions if runner is None else runner.spec.max_positions
    if positions is not None and longest > positions:
        raise ValueError(f"a prompt of {longest - max_new_tokens} tokens + max_new_tokens={max_new_tokens} is "
                         f"{longest} positions, past the model's max_position_embeddings={positions}")
    if runner is None:
        runner = runner_for(model, max_seqs=max_batch, max_len=max(max_len or 0, longest), compile_steps=compile_steps)
    if longest > runner.cache.max_len:
        raise ValueError(f"a prompt of {longest - max_new_tokens} tokens + {max_new_tokens} new tokens exceeds "
                         f"the cache's max_len={runner.cache.max_len}")
    for i, t in enumerate(ids):  # the vocabulary is the runner's: checked before any slot is taken
        token_ids(t, f"prompt {i}", runner.vocab)
    limit = min(max_batch, runner.max_batch)  # sequences in flight
    eos = _eos_ids(runner.model, eos_token_id)
    generator = torch.Generator(device=runner.device).manual_seed(seed) if seed is not None else None
    # The first batch's decode step, at every window its sequences grow through, compiled now:
    # not between streamed tokens. A decode step feeds the token sampled last, so the steps end
    # at positions prompt + 1 .. prompt + max_new_tokens - 1 (none for a single new token).
    runner.prepare(min(limit, len(prompts)), min(len(p) for p in prompts) + 1, longest - 1)
    queue = collections.deque(enumerate(prompts))
    active: dict[int, tuple[int, int]] = {}  # slot -> (prompt index, last token)
    owned: set[int] = set()  # slots this call allocated and has not freed yet

    tp = getattr(runner.model, "_graphdelta_tp", None)  # graphdelta.parallelize's record

    def decide(logits: Tensor) -> Tensor:
        """The next tokens, sampled on the first rank and sent to the others under tensor
        parallelism: every rank then feeds and stops on the same tokens, whatever its sampler."""
        tokens = sample(logits, temperature, top_k, top_p, generator)
        if tp is not None:
            group = tp.mesh.get_group()
            torch.distributed.broadcast(tokens, src=torch.distributed.get_global_rank(group, 0), group=group)
        return tokens

    def emit(slots: list[int], indices: list[int], tokens: Tensor) -> None:
        for slot, i, token in zip(slots, indices, tokens.tolist()):
            outputs[i].append(token)
            if stream is not None:
                stream(i, token)
            if token in eos or len(outputs[i]) >= max_new_tokens:
                active.pop(slot, None)
                owned.discard(slot)
                runner.free(slot)
            else:
                active[slot] = (i, token)

    try:
        while queue or active:
            admitted: list[tuple[int, int, list[int]]] = []
            while queue and runner.cache.allocator.available and len(active) + len(admitted) < limit:
                i, prompt = queue.popleft()
                slot = runner.allocate()
                owned.add(slot)
                admitted.append((slot, i, prompt))
            if not admitted and not active:
                raise RuntimeError(f"no free cache slot for {len(queue)} waiting prompts (all "
                                   f"{runner.cache.config.max_seqs} slots are held elsewhere)")
            if admitted:
                slots = [s for s, _, _ in admitted]
                logits = runner.prefill(slots, [p for _, _, p in admitted])
                emit(slots, [i for _, i, _ in admitted], decide(logits))
            if active:
                slots = list(active)
                logits = runner.decode(slots, [active[s][1] for s in slots])
                emit(slots, [active[s][0] for s in slots], decide(logits))
    finally:
        for slot in owned:
            runner.free(slot)
    return outputs
