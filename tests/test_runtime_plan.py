"""Layer kinds, the memory planner on the real Qwen3-Next and Qwen3.5 configs (checked against
hand computations), and that the cache allocates exactly what the planner says."""
import types

import pytest
import torch
import transformers as tf

from graphdelta.runtime import CacheConfig, HybridCache, ModelSpec, layer_kinds, plan_memory

GIB = 2 ** 30

# Published hyper-parameters (config.json of the Hugging Face checkpoints).
QWEN3_NEXT_80B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, full_attention_interval=4, num_experts=512, num_experts_per_tok=10,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, max_position_embeddings=262144,
)
QWEN3_5_35B_A3B = dict(
    vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
    full_attention_interval=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, max_position_embeddings=262144,
)


def test_layer_kinds_from_layer_types():
    cfg = types.SimpleNamespace(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "attention"])
    assert layer_kinds(cfg) == ["linear", "attention", "attention"]


def test_layer_kinds_from_interval():
    cfg = types.SimpleNamespace(num_hidden_layers=6, full_attention_interval=3)
    assert layer_kinds(cfg) == ["linear", "linear", "attention"] * 2
    # Missing interval: transformers' default of 4.
    assert layer_kinds(types.SimpleNamespace(num_hidden_layers=4)) == ["linear"] * 3 + ["attention"]


@pytest.mark.parametrize("interval", [0, -2, 1.5, True])
def test_layer_kinds_bad_interval(interval):
    with pytest.raises(ValueError, match=f"full_attention_interval must be a positive int, got {interval!r}"):
        layer_kinds(types.SimpleNamespace(num_hidden_layers=4, full_attention_interval=interval))


def test_layer_kinds_unknown_and_unsupported_types():
    with pytest.raises(ValueError, match="layer 1 has unknown layer type 'banana'"):
        layer_kinds(types.SimpleNamespace(num_hidden_layers=2, layer_types=["linear_attention", "banana"]))
    with pytest.raises(NotImplementedError, match="'sliding_attention'"):
        layer_kinds(types.SimpleNamespace(num_hidden_layers=1, layer_types=["sliding_attention"]))


def test_planner_qwen3_next_80b():
    config = tf.Qwen3NextConfig(**QWEN3_NEXT_80B_A3B)
    assert layer_kinds(config) == (["linear"] * 3 + ["attention"]) * 12
    plan = plan_memory(config, dtype=torch.bfloat16)
    # 12 attention layers x (K + V) x 2 KV heads x 256 dims x 2 bytes
    assert plan.attention_bytes_per_token == 12 * 2 * 2 * 256 * 2 == 24576
    # 36 GDN layers x 32 value heads x 128 x 128 x 4 bytes (float32 state)
    assert plan.recurrent_bytes_per_sequence == 36 * 32 * 128 * 128 * 4 == 75497472
    # 36 layers x conv over q, k, v (2 x 16 x 128 + 32 x 128 = 8192 channels) x (4 - 1) x 2 bytes
    assert plan.conv_bytes_per_sequence == 36 * 8192 * 3 * 2 == 1769472
    # At 32k tokens: 768 MiB of attention + 73.7 MiB of fixed state per sequence.
    assert plan.bytes_per_sequence(32768) == 24576 * 32768 + 75497472 + 1769472 == 882573312
    # 40 GiB hold 48 rows of 882573312 bytes (42949672960 // 882573312 = 48), one of them the
    # sentinel row that padded rows of a batched step use.
    assert plan.max_sequences(40 * GIB, 32768) == 47
    assert plan.max_sequences(80 * GIB, 4096) == 80 * GIB // (24576 * 4096 + 77266944) - 1 == 481


def test_planner_qwen3_5_35b():
    config = tf.Qwen3_5MoeTextConfig(**QWEN3_5_35B_A3B)
    plan = plan_memory(config, dtype=torch.bfloat16)
    assert (plan.attention_layers, plan.linear_layers) == (10, 30)
    assert plan.attention_bytes_per_token == 10 * 2 * 2 * 256 * 2 == 20480
    assert plan.recurrent_bytes_per_sequence == 30 * 32 * 128 * 128 * 4 == 62914560
    assert plan.conv_bytes_per_sequence == 30 * 8192 * 3 * 2 == 1474560
    assert plan.max_sequences(24 * GIB, 262144) == 24 * GIB // (20480 * 262144 + 64389120) - 1 == 3


def test_cache_allocates_what_the_plan_says():
    config = tf.Qwen3NextConfig(**{**QWEN3_NEXT_80B_A3B, "num_hidden_layers": 4, "hidden_size": 64,
                                   "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_key_value_heads": 1,
                                   "linear_key_head_dim": 16, "linear_value_head_dim": 8, "head_dim": 32})
    spec = ModelSpec.from_config(config)
    cache = HybridCache(spec, CacheConfig(max_seqs=3, max_len=40, dtype=torch.bfloat16, state_layout="vk"))
    assert cache.nbytes() == plan_memory(spec, torch.bfloat16).total_bytes(3, 40)
    assert cache.state[0].shape == (4, 4, 8, 16)  # vk: [slots + the sentinel, heads, v_dim, k_dim]
    assert cache.conv[0].shape == (4, 2 * 2 * 16 + 4 * 8, 3)
    assert cache.k[0].shape == (4, 1, 40, 32)  # 3 slots + the sentinel
