"""Tiny hybrid models for the compiler tests and benchmarks: the four transformers families at
hidden size 128 with 4 layers mixing linear and full attention, GVA ratio 2 where the family
has it, random weights from a fixed seed, float32.

``build(family)`` returns an eval-mode ``*ForCausalLM``; ``FAMILIES`` lists the names.
"""
from __future__ import annotations

import torch

from graphdelta import hf

FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "kimi_linear")
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


def _heads(hidden: int) -> tuple[int, int]:
    """(head dim, key heads): 32 and 2 at the tiny size; 64 and hidden / 256 from 512 up."""
    return (32, 2) if hidden < 512 else (64, hidden // 256)


def _qwen_common(hidden: int, layers: int) -> dict:
    head, key_heads = _heads(hidden)
    return dict(
        vocab_size=512, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2 * key_heads, num_key_value_heads=key_heads, head_dim=head,
        linear_num_key_heads=key_heads, linear_num_value_heads=2 * key_heads,  # GVA ratio 2
        linear_key_head_dim=head, linear_value_head_dim=head, linear_conv_kernel_dim=4,
        layer_types=_layer_types(layers), max_position_embeddings=4096,
    )


def _layer_types(layers: int) -> list[str]:
    return [LAYER_TYPES[i % len(LAYER_TYPES)] for i in range(layers)]


def config(family: str, hidden: int = 128, layers: int = 4):
    """The transformers config of a small ``family`` model."""
    import transformers as tf

    if family == "qwen3_next":
        return tf.Qwen3NextConfig(
            **_qwen_common(hidden, layers), intermediate_size=2 * hidden,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
            shared_expert_intermediate_size=hidden,
        )
    if family == "qwen3_5":
        return tf.Qwen3_5TextConfig(**_qwen_common(hidden, layers), intermediate_size=2 * hidden)
    if family == "qwen3_5_moe":
        return tf.Qwen3_5MoeTextConfig(
            **_qwen_common(hidden, layers), num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden,
        )
    if family == "kimi_linear":
        # Kimi Delta Attention has as many key as value heads (no GVA in its config).
        return tf.KimiLinearConfig(
            vocab_size=512, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden,
            moe_intermediate_size=hidden, num_experts=4, num_experts_per_tok=2,
            kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
            v_head_dim=32, linear_head_dim=32, linear_num_heads=4, linear_conv_kernel_dim=4,
            layer_types=_layer_types(layers), max_position_embeddings=4096,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


# Qwen3-Next-80B-A3B's layer dimensions (GDN: 16 key / 32 value heads of 128; attention: 16
# query / 2 key-value heads of 256) and vocabulary, with 64 of its 512 experts (10 active).
REALISTIC_QWEN3_NEXT = dict(
    vocab_size=151936, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, intermediate_size=5120,
    num_experts=64, num_experts_per_tok=10, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, max_position_embeddings=65536,
)


def realistic_config(family: str = "qwen3_next", layers: int = 8):
    """A ``layers``-layer config with a real checkpoint's dimensions (``REALISTIC_QWEN3_NEXT``),
    for GPU benchmarks."""
    import transformers as tf

    if family != "qwen3_next":
        raise ValueError(f"realistic dimensions are defined for qwen3_next only, got {family!r}")
    kinds = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)]  # the checkpoint's
    return tf.Qwen3NextConfig(**REALISTIC_QWEN3_NEXT, num_hidden_layers=layers, layer_types=kinds)


def build(family: str, hidden: int = 128, layers: int = 4, seed: int = 0, *, realistic: bool = False,
          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialized ``family`` causal LM in eval mode, built on ``device`` (a large
    model initializes there much faster than on the host) in ``dtype``. ``realistic``: the
    dimensions of ``realistic_config`` instead of ``hidden``."""
    import transformers as tf

    classes = {
        "qwen3_next": tf.Qwen3NextForCausalLM,
        "qwen3_5": tf.Qwen3_5ForCausalLM,
        "qwen3_5_moe": tf.Qwen3_5MoeForCausalLM,
        "kimi_linear": tf.KimiLinearForCausalLM,
    }
    cfg = realistic_config(family, layers) if realistic else config(family, hidden, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = classes[family](cfg)
    return model.to(dtype).eval()


def cached(model: torch.nn.Module, out) -> dict:
    """The keyword argument that hands ``out``'s cache to ``model``'s next call, in the
    installed transformers' spelling (``cache=`` from 5.24, ``past_key_values=`` before)."""
    return {hf.cache_kwarg(model): hf.output_cache(out)}


def tokens(length: int, batch: int = 1, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# Qwen3.5 checkpoints are image-text models; their special tokens sit in the tiny vocabulary.
IMAGE_TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def build_multimodal(family: str = "qwen3_5", seed: int = 0) -> torch.nn.Module:
    """A tiny ``Qwen3_5[Moe]ForConditionalGeneration``: the ``family`` text model of ``build``
    behind a one-block vision tower (patch 16, merge 2), float32, eval mode."""
    import transformers as tf

    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=128)
    classes = {
        "qwen3_5": (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
        "qwen3_5_moe": (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration),
    }
    config_class, model_class = classes[family]
    cfg = config_class(text_config=config(family).to_dict(), vision_config=vision, **IMAGE_TOKENS)
    torch.manual_seed(seed)
    return model_class(cfg).float().eval()


def image_prompt(length: int, grid: tuple[int, int] = (4, 4), seed: int = 1) -> dict:
    """Keyword arguments of a ``build_multimodal`` call: ``length`` text tokens with one image
    of ``grid`` patches (``grid[0] * grid[1] / 4`` image tokens) after the tenth."""
    ids = tokens(length, seed=seed, vocab=IMAGE_TOKENS["image_token_id"])
    n = grid[0] * grid[1] // 4
    ids[0, 10] = IMAGE_TOKENS["vision_start_token_id"]
    ids[0, 11:11 + n] = IMAGE_TOKENS["image_token_id"]
    ids[0, 11 + n] = IMAGE_TOKENS["vision_end_token_id"]
    kinds = torch.zeros_like(ids)
    kinds[0, 11:11 + n] = 1
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(grid[0] * grid[1], 3 * 2 * 16 * 16, generator=g)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, *grid]]),
                mm_token_type_ids=kinds)


# Hybrids that transformers added after the four families above. graphdelta has no code of its
# own for them: its passes recognize their layers structurally (tests/test_compile_newer.py).
# Qwen4-Exp and GLM-5-Next replace full attention by "indexed_attention" (a token indexer in
# front of attention) and GLM-5-Next ships as an image-text model only.
NEWER_FAMILIES = {
    "olmo_hybrid": "OlmoHybridForCausalLM",  # GDN, separate q/k/v projections, beta in [0, 2], V = 2K
    "bailing_hybrid": "BailingHybridForCausalLM",  # KDA with a lower-bounded gate, MLA attention
    "qwen4_exp": "Qwen4ExpForCausalLM",  # GDN, hyper-connections, indexed attention
    "glm5_next": "Glm5NextForConditionalGeneration",  # KDA, hyper-connections, indexed MLA
}


def newer_available(family: str) -> bool:
    import transformers as tf

    return hasattr(tf, NEWER_FAMILIES[family])


def newer_config(family: str, layers: int = 2, **overrides):
    """A tiny config of a ``NEWER_FAMILIES`` model: hidden 128, linear and full (or indexed)
    attention layers alternating, GVA ratio 2 for the GDN families. ``overrides`` go to the
    (text) config: ``rope_parameters={"rope_type": "default", "rope_theta": None}`` gives
    OLMo-Hybrid's released form, without rotary embeddings (NoPE)."""
    import transformers as tf

    kinds = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    tokens = dict(vocab_size=512, pad_token_id=0, eos_token_id=2, max_position_embeddings=4096)
    gdn = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32)
    common = dict(hidden_size=128, num_hidden_layers=layers, layer_types=kinds, **tokens, **overrides)
    if family == "olmo_hybrid":
        return tf.OlmoHybridConfig(**common, **gdn, linear_value_head_dim=64, intermediate_size=256,
                                   num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen4_exp":
        return tf.Qwen4ExpTextConfig(
            **common, **gdn, linear_value_head_dim=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
            shared_expert_intermediate_size=128, hc_lowrank=32, indexer_n_heads=2, indexer_kv_heads=1,
            indexer_head_dim=32, indexer_budget=32, indexer_compress_ratio=4)
    mla = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, v_head_dim=32,
               intermediate_size=256, moe_intermediate_size=64, num_experts_per_tok=2,
               mlp_layer_types=["dense"] + ["sparse"] * (layers - 1))
    if family == "bailing_hybrid":
        return tf.BailingHybridConfig(**common, **mla, qk_rope_head_dim=16, qk_nope_head_dim=16, head_dim=32,
                                      n_group=1, topk_group=1, num_local_experts=4, num_mtp_layers=0)
    if family == "glm5_next":
        text = tf.Glm5NextTextConfig(**common, **mla, q_lora_rank=32, qk_rope_head_dim=0, qk_nope_head_dim=32,
                                     n_routed_experts=4, index_topk=32, index_head_dim=32, index_n_heads=2,
                                     linear_head_dim=32, linear_num_heads=4)
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=128,
                      projection_intermediate_size=64)
        special = dict(image_token_id=500, video_token_id=501, image_start_token_id=502, image_end_token_id=503,
                       video_start_token_id=504, video_end_token_id=505)
        return tf.Glm5NextConfig(text_config=text.to_dict(), vision_config=vision, **special)
    raise ValueError(f"unknown family {family!r}; known: {tuple(NEWER_FAMILIES)}")


def build_newer(family: str, layers: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialized tiny ``NEWER_FAMILIES`` model in eval mode, float32."""
    import transformers as tf

    cfg = newer_config(family, layers, **overrides)
    torch.manual_seed(seed)
    return getattr(tf, NEWER_FAMILIES[family])(cfg).float().eval()
