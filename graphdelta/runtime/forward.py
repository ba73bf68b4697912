"""The forward pass of a transformers hybrid causal LM, run over a ``HybridCache``.

The model's own submodules do the projections, norms, MLP / MoE and rotary tables; what carries
state between tokens goes through graphdelta: the short conv through ``causal_conv1d`` (prefill)
and ``causal_conv1d_update`` (steps) on the conv-state pools, the gated delta rule (GDN or KDA)
through ``chunk_gated_delta_rule`` (prefill: packed varlen, starting from the slot's state) and
``gated_delta_rule_decode`` (steps: in place on the state pool, by slot index), and attention
through ``F.scaled_dot_product_attention`` over the fixed K/V buffers with explicit positions
and masks (a compiled CPU decode step writes it as reductions instead: ``one_query_attention``).

Two shapes of batch (``Batch``):
- prefill: the new tokens of N sequences packed in one row ``[1, total]`` (``cu_seqlens``);
  attention sees them as N rows padded to the longest piece;
- step: ``[B, T]`` tokens, one row per slot, -1 marking a padded row (T = 1 to decode, k + 1 to
  verify k draft tokens). Its shapes depend only on (B, T, window), so it can be captured.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphdelta import lowering, ops  # noqa: F401 (ops registers torch.ops.graphdelta)
from graphdelta.lowering import torch_conv, torch_recurrent
from graphdelta.runtime.cache import HybridCache, LinearAux


@dataclasses.dataclass
class Batch:
    slots: Tensor  # [N] int64 slot of each row; -1: padded row (steps only)
    starts: Tensor  # [N] int64 tokens each row already has in the cache
    width: int  # T: tokens per row (the longest piece in a prefill)
    window: int  # cached positions attention reads: 0 .. window - 1
    cu_seqlens: Tensor | None = None  # [N + 1] packed prefill
    rows: Tensor | None = None  # [total] row of each packed token
    cols: Tensor | None = None  # [total] column of each packed token
    keep_intermediate: bool = False  # steps: keep what rolling back to any token needs

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def positions(self) -> Tensor:
        """Position of each new token: ``[1, total]`` (prefill) or ``[N, T]`` (step)."""
        if self.packed:
            return (self.starts[self.rows] + self.cols).unsqueeze(0)
        return self.starts[:, None] + torch.arange(self.width, device=self.starts.device)[None, :]

    def to_rows(self, x: Tensor) -> Tensor:
        """``[1, total, ...]`` -> ``[N, T, ...]`` (zeros past each row's end); steps: unchanged."""
        if not self.packed:
            return x
        out = x.new_zeros(self.slots.shape[0], self.width, *x.shape[2:])
        out[self.rows, self.cols] = x[0]
        return out

    def from_rows(self, x: Tensor) -> Tensor:
        return x[self.rows, self.cols].unsqueeze(0) if self.packed else x

    def row_valid(self) -> Tensor:
        """``[N, T]``: which (row, column) holds a real token."""
        cols = torch.arange(self.width, device=self.starts.device)[None, :]
        if self.packed:
            lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1])[:, None]
            return cols < lengths
        return (self.slots >= 0)[:, None].expand(-1, self.width)


class Writes:
    """The state-pool writes of one forward, applied together after its last layer and its head.

    A forward that raises before ``apply`` (an exception in a layer, out of memory, Ctrl-C) has
    then written no conv or recurrent state, and the runner can leave its slots as they were.
    Only the Triton decode and conv-update kernels write their pools in place, during the
    forward. Holding the new states until the end costs no copy (they are computed out of place
    anyway) and keeps one step's new states alive at once: N sequences x the per-sequence
    state of all linear layers (``MemoryPlan.fixed_bytes_per_sequence``).
    """

    def __init__(self):
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.started = False  # apply() began: some pools may hold the new states

    def add(self, pool: Tensor, rows: Tensor, values: Tensor) -> None:
        """Queue ``pool[rows[i]] = values[i]`` (pool ``[S, ...]``, rows ``[N]``, values ``[N, ...]``)."""
        self.pending.append((pool, rows, values))

    def apply(self) -> None:
        self.started = True
        for pool, rows, values in self.pending:
            pool.index_copy_(0, rows, values)
        self.pending.clear()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dims of ``x`` ``[..., T, heads, D]``
    (``cos``/``sin`` ``[..., T, rot]``; partial rotary keeps the rest as is)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat([xr * cos + torch.cat([-x2, x1], dim=-1) * sin, xp], dim=-1)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """DeepSeek's rotary on ``x`` ``[..., T, heads, rot]``: dims (2i, 2i + 1) form pair i,
    rotated by angle i; the result lists the pairs' first parts, then their second parts, as
    transformers writes it (a fixed permutation of both q and k leaves their products as they
    are). ``cos``/``sin`` ``[..., T, rot]`` repeat each angle's value in their two halves."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(-2), sin[..., :half].unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Shared by the attention flavors: write the new K/V at their positions (padded tokens go to
    the sentinel row), read the slot's first ``window`` positions, attend causally."""

    def __init__(self, module: nn.Module, cache: HybridCache, index: int):
        super().__init__()
        self.m = module
        self.cache = cache
        self.index = index  # among the attention layers

    def attend(self, q: Tensor, k_new: Tensor, v_new: Tensor, batch: Batch, scale: float,
               expand=None) -> Tensor:
        """q ``[N, T, H, Dq]``, k_new/v_new ``[N, T, Hkv, *]`` (row form) -> ``[N, T, H, Dv]``."""
        kc, vc = self.cache.k[self.index], self.cache.v[self.index]
        sentinel = self.cache.sentinel
        valid = batch.row_valid()
        qpos = batch.starts[:, None] + torch.arange(batch.width, device=q.device)[None, :]
        write_slot = torch.where(valid, batch.slots[:, None], sentinel)
        write_pos = torch.where(valid, qpos, 0)
        kc[write_slot, :, write_pos] = k_new.to(kc.dtype)
        vc[write_slot, :, write_pos] = v_new.to(vc.dtype)
        read_slot = torch.where(batch.slots >= 0, batch.slots, sentinel)
        keys, values = kc[read_slot, :, : batch.window], vc[read_slot, :, : batch.window]
        if expand is not None:
            keys, values = expand(keys, values)
        mask = torch.arange(batch.window, device=q.device)[None, None, :] <= qpos[:, :, None]
        if batch.width == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
            return one_query_attention(q, keys, values, mask, scale)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask.unsqueeze(1),
            scale=scale, enable_gqa=q.shape[2] != keys.shape[1],
        )
        return o.transpose(1, 2)


def one_query_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float | None) -> Tensor:
    """Attention of one new token per row, written as reductions for a compiled CPU decode step.
    q ``[N, 1, H, D]``, keys ``[N, Hkv, W, D]``, values ``[N, Hkv, W, Dv]``, mask ``[N, 1, W]``
    (True: attend; position 0 always is) -> ``[N, 1, H, Dv]`` in q's dtype, computed in float32
    (float64 for a float64 model).
    Query head h reads key head ``h // (H / Hkv)``, without repeating the keys.

    inductor cannot fuse ``F.scaled_dot_product_attention``: it stays an ATen call that splits
    the step's generated C++ in two and, at one query, costs more than its arithmetic. As
    reductions it joins the step's fused kernels (the shipped model's replayed decode step,
    ``benchmarks/step_attention.py``: 1.13-1.17x, BENCHMARKS.md). Eager steps, steps of several
    tokens per row and GPU steps keep SDPA."""
    N, _, H, D = q.shape
    Hkv, W = keys.shape[1], keys.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).reshape(N, Hkv, H // Hkv, 1, D)
    scores = (qg * keys.to(dtype)[:, :, None]).sum(-1) * (D ** -0.5 if scale is None else scale)  # [N, Hkv, H / Hkv, W]
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = (p[..., None] * values.to(dtype)[:, :, None]).sum(-2)  # [N, Hkv, H / Hkv, Dv]
    return o.reshape(N, 1, H, -1).to(q.dtype)


class GatedAttention(Attention):
    """Qwen3-Next / Qwen3.5 attention: q and k RMS-normed per head, partial rotary, output gated
    by a sigmoid of a second half of q_proj."""

    def forward(self, x: Tensor, batch: Batch, rope: tuple[Tensor, Tensor]) -> Tensor:
        m = self.m
        B, T = x.shape[:2]
        q, gate = torch.chunk(m.q_proj(x).view(B, T, -1, m.head_dim * 2), 2, dim=-1)
        q = m.q_norm(q)
        k = m.k_norm(m.k_proj(x).view(B, T, -1, m.head_dim))
        v = m.v_proj(x).view(B, T, -1, m.head_dim)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = self.attend(batch.to_rows(q), batch.to_rows(k), batch.to_rows(v), batch, m.scaling)
        o = batch.from_rows(o).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return m.o_proj(o)


class NormedAttention(Attention):
    """OLMo-Hybrid attention: q and k RMS-normed over all heads at once (before the split into
    heads), rotary unless the checkpoint has none (NoPE), no output gate."""

    def forward(self, x: Tensor, batch: Batch, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        m = self.m
        B, T = x.shape[:2]
        q = m.q_norm(m.q_proj(x)).view(B, T, -1, m.head_dim)
        k = m.k_norm(m.k_proj(x)).view(B, T, -1, m.head_dim)
        v = m.v_proj(x).view(B, T, -1, m.head_dim)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        o = self.attend(batch.to_rows(q), batch.to_rows(k), batch.to_rows(v), batch, m.scaling)
        return m.o_proj(batch.from_rows(o).reshape(B, T, -1))


class LatentAttention(Attention):
    """MLA: the cache holds the normed KV latent (as K) and the shared key part (as V); the
    module's ``expand_kv`` turns them into per-head keys and values. Kimi Linear's has no rotary;
    Bailing-Hybrid's rotates the shared key part and the query's last dims DeepSeek's way
    (interleaved pairs) and gates each head's output by a sigmoid of ``g_proj``."""

    def forward(self, x: Tensor, batch: Batch, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        m = self.m
        B, T = x.shape[:2]
        if getattr(m, "q_lora_rank", None) is None:
            q = m.q_proj(x)
        else:
            q = m.q_b_proj(m.q_a_layernorm(m.q_a_proj(x)))
        q = q.view(B, T, -1, m.qk_head_dim)
        latent, k_rot = torch.split(m.kv_a_proj_with_mqa(x), [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = m.kv_a_layernorm(latent).view(B, T, 1, m.kv_lora_rank)
        k_rot = k_rot.view(B, T, 1, m.qk_rope_head_dim)
        if rope is not None:
            q_pass, q_rot = torch.split(q, [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
            q = torch.cat([q_pass, rotate_pairs(q_rot, *rope)], dim=-1)
            k_rot = rotate_pairs(k_rot, *rope)
        o = self.attend(batch.to_rows(q), batch.to_rows(latent), batch.to_rows(k_rot), batch, m.scaling,
                        expand=m.expand_kv)
        o = batch.from_rows(o)  # [B, T, H, v_head_dim]
        if hasattr(m, "g_proj"):
            o = o * torch.sigmoid(m.g_proj(x).float()).to(o.dtype).unsqueeze(-1)
        return m.o_proj(o.reshape(B, T, -1))


# ----------------------------------------------------------------------------- linear attention


class LinearAttention(nn.Module):
    """The common part of GDN and KDA: conv over the concatenated q/k/v, gated delta rule, gated
    RMSNorm, output projection. Subclasses say how the inputs are projected."""

    def __init__(self, module: nn.Module, cache: HybridCache, index: int):
        super().__init__()
        self.m = module
        self.cache = cache
        self.index = index  # among the linear layers
        self.activation = module.activation
        spec = cache.spec.linear
        self.k_dim, self.v_dim = spec.k_dim, spec.v_dim
        self.key_dim = (spec.conv_dim - spec.heads * spec.v_dim) // 2  # q (and k) channels of the conv

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> conv input ``[B, T, conv_dim]``, g, beta, output gate ``[B, T, HV, V]``."""
        raise NotImplementedError

    def finish(self, o: Tensor, gate: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, batch: Batch, aux: list, writes: Writes) -> Tensor:
        """Calls the ``torch.ops.graphdelta`` ops, which do not check their inputs: the runner
        validated its slot lists and built ``cu_seqlens`` on the host, and a check of the index
        tensors would wait for the GPU in every layer."""
        B, T = x.shape[:2]
        conv_pool, state_pool = self.cache.conv[self.index], self.cache.state[self.index]
        layout = self.cache.state_layout
        mixed, g, beta, gate = self.project(x)
        weight, bias = self.m.conv1d.weight.squeeze(1), self.m.conv1d.bias  # [conv_dim, W], [conv_dim]
        if batch.packed:
            mixed, conv_final = torch.ops.graphdelta.causal_conv1d(
                mixed, weight, bias, conv_pool[batch.slots], batch.cu_seqlens, self.activation)
            writes.add(conv_pool, batch.slots, conv_final)
        else:
            plain = lowering.backend_for(mixed) == "torch"
            # Padded rows use the sentinel row, so the PyTorch path needs no mask or branch and
            # a compiled step (inductor) fuses the conv and the recurrence with their neighbours.
            rows = torch.where(batch.slots >= 0, batch.slots, self.cache.sentinel)
            if plain or batch.keep_intermediate:
                conv_before = conv_pool.index_select(0, rows)  # a copy: the pool is updated below
                conv_inputs = mixed
            if plain:
                mixed, new_conv = torch_conv.conv_update_rows(mixed, conv_before, weight, bias, self.activation)
                writes.add(conv_pool, rows, new_conv)
            else:
                mixed = torch.ops.graphdelta.causal_conv1d_update(
                    mixed, conv_pool, weight, bias, batch.slots, self.activation)
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, mixed.shape[-1] - 2 * self.key_dim], dim=-1)
        q, k = q.reshape(B, T, -1, self.k_dim), k.reshape(B, T, -1, self.k_dim)
        v = v.reshape(B, T, -1, self.v_dim)
        if batch.packed:
            o, final = torch.ops.graphdelta.chunk_gated_delta_rule(
                q, k, v, g, beta, self.k_dim ** -0.5, state_pool[batch.slots], batch.cu_seqlens, True, layout)
            writes.add(state_pool, batch.slots, final)
        else:
            if plain:
                o, states, new_state = torch_recurrent.decode_rows(
                    q, k, v, g, beta, state_pool.index_select(0, rows), self.k_dim ** -0.5, True, layout,
                    batch.keep_intermediate)
                writes.add(state_pool, rows, new_state)
            else:
                o, states = torch.ops.graphdelta.gated_delta_rule_decode(
                    q, k, v, g, beta, state_pool, batch.slots, self.k_dim ** -0.5, True, layout,
                    batch.keep_intermediate)
            if batch.keep_intermediate:
                aux.append(LinearAux(states, conv_before, conv_inputs))
        return self.finish(o, gate)


class GatedDeltaNet(LinearAttention):
    """Qwen3-Next (q/k/v/z interleaved per key head in ``in_proj_qkvz``), Qwen3.5 (separate
    ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``) and OLMo-Hybrid (``q_proj``,
    ``k_proj``, ``v_proj``, ``g_proj`` for the output gate, and beta doubled to [0, 2] when the
    config allows negative eigenvalues)."""

    def project(self, x):
        m = self.m
        B, T = x.shape[:2]
        if hasattr(m, "in_proj_qkvz"):
            q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(x), m.in_proj_ba(x))
            mixed = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1)
        elif hasattr(m, "in_proj_qkv"):
            mixed = m.in_proj_qkv(x)
            z = m.in_proj_z(x).reshape(B, T, -1, m.head_v_dim)
            b, a = m.in_proj_b(x), m.in_proj_a(x)
        else:
            mixed = torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], dim=-1)
            z = m.g_proj(x).reshape(B, T, -1, m.head_v_dim)
            b, a = m.b_proj(x), m.a_proj(x)
        g = -m.A_log.float().exp() * F.softplus(a.float() + m.dt_bias)
        beta = b.sigmoid() * 2.0 if getattr(m, "allow_neg_eigval", False) else b.sigmoid()
        return mixed, g, beta, z

    def finish(self, o, gate):
        m = self.m
        B, T = o.shape[:2]
        norm, out = (m.norm, m.out_proj) if hasattr(m, "out_proj") else (m.o_norm, m.o_proj)
        o = norm(o.reshape(-1, m.head_v_dim), gate.reshape(-1, m.head_v_dim))
        return out(o.reshape(B, T, -1))


class KimiDeltaAttention(LinearAttention):
    """KDA: a decay per key channel from the forget gate module (Kimi Linear's low-rank one;
    Bailing-Hybrid's bounded below), output gate from a low-rank (Kimi) or full (Bailing)
    projection."""

    def project(self, x):
        m = self.m
        B, T = x.shape[:2]
        mixed = torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], dim=-1)
        g = m.forget_gate(x)  # [B, T, H, K]
        beta = torch.sigmoid(m.b_proj(x))
        gate = m.g_proj(x) if hasattr(m, "g_proj") else m.g_b_proj(m.g_a_proj(x))
        gate = gate.view(B, T, -1, m.head_dim)
        return mixed, g, beta, gate

    def finish(self, o, gate):
        m = self.m
        B, T = o.shape[:2]
        return m.o_proj(m.o_norm(o, gate).reshape(B, T, -1))


# ----------------------------------------------------------------------------- the model


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder with ``layers``, ``embed_tokens``, ``norm``; the LM head) of a causal LM."""
    base = getattr(model, "model", None)
    if base is not None and not hasattr(base, "layers"):
        base = getattr(base, "language_model", None)
    head = getattr(model, "lm_head", None)
    if base is None or not hasattr(base, "layers") or head is None:
        raise TypeError(
            f"{type(model).__name__} is not a hybrid causal LM with .model.layers and .lm_head "
            "(expected e.g. Qwen3NextForCausalLM, Qwen3_5ForCausalLM, KimiLinearForCausalLM)"
        )
    return base, head


def _mixer(layer: nn.Module, kind: str, i: int, cache: HybridCache, index: int) -> nn.Module:
    if kind == "linear":
        module = getattr(layer, "linear_attn", None) or getattr(layer, "self_attn", None)
        if module is not None and hasattr(module, "forget_gate"):
            return KimiDeltaAttention(module, cache, index)
        if module is not None and any(hasattr(module, p) for p in ("in_proj_qkvz", "in_proj_qkv", "g_proj")):
            return GatedDeltaNet(module, cache, index)
    else:
        module = getattr(layer, "self_attn", None)
        if module is not None and hasattr(module, "kv_a_proj_with_mqa"):
            return LatentAttention(module, cache, index)
        if module is not None and hasattr(module, "q_norm"):
            # Qwen's q_proj also holds the output gate: twice the width that o_proj reads
            gated = module.q_proj.out_features == 2 * module.o_proj.in_features
            return (GatedAttention if gated else NormedAttention)(module, cache, index)
    raise TypeError(f"layer {i} is {kind} per the config but holds no known {kind} module: {type(layer).__name__}")


def experts_configs(model: nn.Module) -> list[Any]:
    """The configs that transformers' MoE experts modules of ``model`` dispatch on: the modules
    that ``use_experts_implementation`` wrapped. Its ``__init__`` sets ``has_gate`` and
    ``is_transposed`` in every transformers 5.x; ``_is_expert_parallel`` came later (5.2x), and
    under 5.17 a search for it alone found nothing, so that the dispatch switch silently did
    nothing and a CUDA graph captured ``grouped_mm``'s host sync in fp32 (the first GPU check
    kit run, 2026-12-04)."""
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(getattr(m, "config", None), "_experts_implementation")
               and (hasattr(m, "_is_expert_parallel") or (hasattr(m, "has_gate") and hasattr(m, "is_transposed")))}
    return list(configs.values())


def experts_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """The MoE dispatch of a static step (CUDA graph or compiled) on ``device`` in ``dtype``:
    one with no data-dependent shapes and no host sync.

    - ``grouped_mm`` on Hopper or newer in bf16, where this transformers has it and torch's
      native grouped GEMM runs it (its offsets come from a histogram on the device, and it
      reads each selected expert's weights in place);
    - ``batched_mm`` elsewhere: it copies the selected experts' weights for every token, but
      inductor compiles it whole (on CPU, compiled steps of tiny Qwen3-Next at batch 1: 1.46 ms
      against 3.7 ms with ``grouped_mm``, whose sort, histc and fallback op stay outside
      inductor's kernels), and off Hopper's bf16 ``grouped_mm`` falls back to a loop with a
      host sync, which no CUDA graph can hold.
    ``tools/gpu_replay.py`` measures both on a GPU."""
    if device.type != "cuda" or dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (9, 0):
        return "batched_mm"
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return "batched_mm"
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return "batched_mm"
    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "batched_mm"


@contextlib.contextmanager
def static_experts(configs: list[Any], implementation: str = "batched_mm") -> Iterator[None]:
    """Run transformers' MoE experts with ``implementation`` (``experts_implementation``'s
    choice) for a step that is captured in a CUDA graph or compiled whole by inductor. Only for
    those: eagerly, the model's own dispatch stays (on CPU ``grouped_mm`` is 5x faster than
    ``batched_mm`` at batch 16, tiny MoE block: 0.96 ms against 4.8 ms, and 2x faster at batch 1
    on the mid-size benchmark model).

    transformers reads the implementation from the model's config at call time and has no
    argument for it, so the config is switched and restored, under one lock: steps of
    different threads would otherwise save each other's switched value and leave the user's
    model on ``batched_mm``. Compiled CPU steps of all runners therefore take turns through
    Dynamo; CUDA graph replays and compiled CPU decode steps replayed without Dynamo
    (``replay.py``) never enter here (only their capture does)."""
    with _EXPERTS_LOCK:
        saved = [c._experts_implementation for c in configs]
        try:
            for c in configs:
                _set_experts(c, implementation)
            yield
        finally:
            for c, impl in zip(configs, saved):
                _set_experts(c, impl)


def _set_experts(config: Any, implementation: str | None) -> None:
    """``config._experts_implementation = implementation``, per token: where the config keeps it in
    ``_experts_implementation_internal`` (transformers 5.x), written there directly. The
    property's setter validates the whole config (huggingface_hub's strict dataclasses), twice
    per step, in Python (thousands of calls per hundred steps in cProfile). Each experts
    module's own config is in ``configs``, so the setter's walk over sub-configs is not needed."""
    if "_experts_implementation_internal" in vars(config):
        vars(config)["_experts_implementation_internal"] = implementation
    else:
        config._experts_implementation = implementation


_EXPERTS_LOCK = threading.RLock()


class HybridForward(nn.Module):
    """``forward(tokens, batch)`` -> logits, reading and writing ``cache``."""

    def __init__(self, model: nn.Module, cache: HybridCache):
        super().__init__()
        self.model = model
        self.cache = cache
        self.base, self.head = decoder_parts(model)
        self.rotary = getattr(self.base, "rotary_emb", None)
        kinds = cache.spec.kinds
        if len(self.base.layers) != len(kinds):
            raise ValueError(f"the model has {len(self.base.layers)} layers, its config {len(kinds)}")
        counters = {"attention": 0, "linear": 0}
        mixers = []
        for i, (layer, kind) in enumerate(zip(self.base.layers, kinds)):
            mixers.append(_mixer(layer, kind, i, cache, counters[kind]))
            counters[kind] += 1
        self.mixers = nn.ModuleList(mixers)
        # Pre-norm layers norm what goes into the mixer and the MLP. OLMo-Hybrid's attention
        # layers (no input norm) norm what comes out of them instead, and there
        # post_attention_layernorm belongs to the mixer, not to the MLP.
        self.pre_norm = [hasattr(layer, "input_layernorm") for layer in self.base.layers]
        self.experts_configs = experts_configs(model)

    def stages_writes(self, packed: bool) -> bool:
        """Whether a forward writes the linear layers' states only through ``Writes``: prefill
        always, steps on the PyTorch path (the Triton step kernels update the pools in place)."""
        return packed or not self.cache.conv or lowering.backend_for(self.cache.conv[0]) == "torch"

    def forward(self, tokens: Tensor, batch: Batch, aux: list | None = None, last_only: bool = False,
                writes: Writes | None = None) -> Tensor:
        """tokens ``[1, total]`` (prefill) or ``[N, T]`` (step) -> logits ``[N, V]`` at each
        sequence's last token (``last_only``, prefill) or ``[N, T, V]``. The conv and recurrent
        states are written after the head (``Writes``); attention K/V as each layer runs, at
        positions past the slots' lengths (``HybridCache`` counts them only once a step commits)."""
        aux = [] if aux is None else aux
        writes = Writes() if writes is None else writes
        x = self.base.embed_tokens(tokens)
        rope = None
        if self.rotary is not None:
            positions = batch.positions()
            if getattr(self.rotary, "mrope_section", None) is not None:
                # Qwen3.5's multimodal rotary takes (temporal, height, width) positions; text
                # tokens have the same one on all three (5.23 broadcasts a single row, 5.17 does not)
                positions = positions.expand(3, *positions.shape)
            rope = self.rotary(x, positions)
        for layer, mixer, pre_norm in zip(self.base.layers, self.mixers, self.pre_norm):
            h = layer.input_layernorm(x) if pre_norm else x
            if isinstance(mixer, LinearAttention):
                h = mixer(h, batch, aux, writes)
            else:
                h = mixer(h, batch, rope)
            x = x + (h if pre_norm else layer.post_attention_layernorm(h))
            h = layer.mlp(layer.post_attention_layernorm(x) if pre_norm else x)
            if isinstance(h, tuple):
                h = h[0]
            x = x + (h if pre_norm else layer.post_feedforward_layernorm(h))
        if last_only:
            x = x[0, batch.cu_seqlens[1:] - 1] if batch.packed else x[:, -1]
        logits = self.head(self.base.norm(x))
        writes.apply()
        return logits
