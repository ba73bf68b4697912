"""What each layer of a hybrid model keeps between tokens, read from its config.

``layer_kinds(config)`` is the one place that decides which layers are full attention and which
are linear attention; the memory planner, the cache and the runner all go through it (via
``ModelSpec``), so they cannot disagree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

LayerKind = Literal["attention", "linear"]

# The config names of each kind ("attention" and "mamba" are the legacy spellings transformers
# remaps). Other layer types transformers knows are recognized and refused by name.
ATTENTION_TYPES = ("full_attention", "attention")
LINEAR_TYPES = ("linear_attention", "mamba")
KNOWN_UNSUPPORTED_TYPES = (
    "sliding_attention", "chunked_attention", "window_attention", "indexed_attention",
    "compressed_sparse_attention", "heavily_compressed_attention", "minimax_m3_sparse", "conv",
    "moe", "hybrid", "hybrid_sliding", "reference_sliding_attention", "sparse", "dense",
    "qwen_sparse_attention", "deepseek_sparse_attention",  # transformers 5.17's Qwen4-Exp, GLM-5-Next
)
DEFAULT_FULL_ATTENTION_INTERVAL = 4  # transformers' default for Qwen3-Next and Qwen3.5


def text_config(config: Any) -> Any:
    """The language-model part of a config (Qwen3.5's multimodal configs nest it)."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None else config


def _kind(layer_type: str, index: int) -> LayerKind:
    if layer_type in ATTENTION_TYPES:
        return "attention"
    if layer_type in LINEAR_TYPES:
        return "linear"
    if layer_type in KNOWN_UNSUPPORTED_TYPES:
        raise NotImplementedError(
            f"layer {index} has type {layer_type!r}, which graphdelta's runtime does not support "
            f"(supported: {ATTENTION_TYPES + LINEAR_TYPES})"
        )
    raise ValueError(f"layer {index} has unknown layer type {layer_type!r}")


def layer_kinds(config: Any) -> list[LayerKind]:
    """``"attention"`` or ``"linear"`` for each layer.

    From ``config.layer_types`` when present, else from ``config.full_attention_interval``
    (layer i is full attention when ``(i + 1) % interval == 0``; transformers' default 4 when
    the field is missing).
    """
    config = text_config(config)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"config.num_hidden_layers must be a positive int, got {n!r}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) != n:
            raise ValueError(f"config.layer_types has {len(layer_types)} entries for num_hidden_layers={n}")
        return [_kind(t, i) for i, t in enumerate(layer_types)]
    interval = getattr(config, "full_attention_interval", None)
    if interval is None:
        interval = DEFAULT_FULL_ATTENTION_INTERVAL
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise ValueError(f"config.full_attention_interval must be a positive int, got {interval!r}")
    return ["attention" if (i + 1) % interval == 0 else "linear" for i in range(n)]


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one full-attention layer caches per token: K ``[kv_heads, k_dim]`` and V
    ``[kv_heads, v_dim]`` (for Kimi's MLA, the compressed latent and the shared rope key)."""

    kv_heads: int
    k_dim: int
    v_dim: int


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """What one linear-attention layer keeps per sequence: a conv state ``[conv_dim, conv_width - 1]``
    and a recurrent state ``[heads, k_dim, v_dim]`` (kv layout)."""

    conv_dim: int
    conv_width: int
    heads: int
    k_dim: int
    v_dim: int
    per_channel_gate: bool  # KDA (gate per key channel) rather than GDN (one per head)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str  # "qwen3_next", "qwen3_5" (also the MoE variant), "kimi_linear", "olmo_hybrid" or "bailing_hybrid"
    kinds: tuple[LayerKind, ...]
    attention: AttentionSpec
    linear: LinearSpec
    vocab_size: int
    hidden_size: int
    max_positions: int | None = None  # the config's max_position_embeddings

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "attention"]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "linear"]

    @classmethod
    def of_model(cls, model: Any) -> "ModelSpec":
        """The spec of what ``model`` computes on this rank: its config's, or for a model that
        ``graphdelta.parallelize`` sharded, the local heads' (``TensorParallel.spec``)."""
        tp = getattr(model, "_graphdelta_tp", None)
        return tp.spec if tp is not None else cls.from_config(model.config)

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        config = text_config(config)
        model_type = getattr(config, "model_type", None)
        kinds = tuple(layer_kinds(config))
        gdn = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe", "olmo_hybrid")
        if model_type in gdn:
            # OLMo-Hybrid: GDN with V = 2K; its attention norms q and k over all heads at once
            family = model_type if model_type in ("qwen3_next", "olmo_hybrid") else "qwen3_5"
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            attention = AttentionSpec(config.num_key_value_heads, head_dim, head_dim)
            hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
            dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
            if hv % hk:
                raise ValueError(f"linear_num_value_heads={hv} must be a multiple of linear_num_key_heads={hk}")
            linear = LinearSpec(2 * hk * dk + hv * dv, config.linear_conv_kernel_dim, hv, dk, dv, False)
        elif model_type in ("kimi_linear", "bailing_hybrid"):
            # KDA and MLA; Bailing-Hybrid's MLA has rotary keys, its KDA gate a lower bound
            family = model_type
            attention = AttentionSpec(1, config.kv_lora_rank, config.qk_rope_head_dim)
            h, d = config.linear_num_heads, config.linear_head_dim
            linear = LinearSpec(3 * h * d, config.linear_conv_kernel_dim, h, d, d, True)
        else:
            raise NotImplementedError(
                f"graphdelta's runtime supports Qwen3-Next, Qwen3.5 (dense and MoE), Kimi Linear, "
                f"OLMo-Hybrid and Bailing-Hybrid configs, got model_type={model_type!r}; compiled.generate "
                f"(transformers' generate over graphdelta.compile's graphs) runs the others"
            )
        positions = getattr(config, "max_position_embeddings", None)
        positions = positions if isinstance(positions, int) and positions > 0 else None
        return cls(family, kinds, attention, linear, config.vocab_size, config.hidden_size, positions)
