"""The shipped default model (graphdelta/assets/qwen3next-tiny): it loads offline, is a hybrid with
GVA, its cached decode agrees with a full prefill, and its byte tokenizer round-trips text."""
import pytest
import torch

import models
from graphdelta.assets import DEFAULT_MODEL_DIR, load_default_model

SNIPPETS = [
    "import os\n\n\ndef main(path: str) -> None:\n    for name in sorted(os.listdir(path)):\n        print(name)\n",
    'class Box:\n    """A box, \u00e9t\u00e9 \u2192 \u65e5\u672c \U0001f40d."""\n\n\tdef __init__(self):\r\n        self.x = {"a": [1, 2]}\n',
    "",
]
PREFILL_LENGTHS = [1, 17, 70]  # 70 crosses the 64-token chunk of the chunked gated delta rule
MAX_ASSET_BYTES = 15 * 2**20
MAX_PYTHON_LOSS = 2.5  # nats per byte; an untrained model sits near ln(260) = 5.56


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return load_default_model(torch.float32)


def test_asset_folder_is_small():
    sizes = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(sizes)
    assert sum(sizes.values()) <= MAX_ASSET_BYTES, f"asset folder holds {sizes}"


def test_config_is_a_hybrid_with_gva(default_model):
    config = default_model[0].config
    assert config.model_type == "qwen3_next"
    assert set(config.layer_types) == {"linear_attention", "full_attention"}, config.layer_types
    assert config.linear_num_value_heads // config.linear_num_key_heads == 2
    assert config.linear_num_value_heads % config.linear_num_key_heads == 0
    assert config.vocab_size == 260 and config.tie_word_embeddings


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_tokenizer_round_trips_bytes(default_model, snippet):
    tokenizer = default_model[1]
    ids = tokenizer(snippet, add_special_tokens=False).input_ids
    assert ids == list(snippet.encode("utf-8"))
    assert tokenizer.decode(ids) == snippet


def test_tokenizer_special_tokens(default_model):
    tokenizer = default_model[1]
    assert tokenizer.eos_token_id == 256
    assert tokenizer("x<|endoftext|>", add_special_tokens=False).input_ids == [ord("x"), 256]


@pytest.mark.parametrize("n", PREFILL_LENGTHS)
@torch.no_grad()
def test_cached_decode_matches_prefill(default_model, n):
    """Prefill n tokens, decode token n+1 from the cache: equals a prefill of n+1 tokens."""
    model, tokenizer = default_model
    ids = tokenizer(SNIPPETS[0] * 2, return_tensors="pt").input_ids[:, : n + 1]
    full = model(ids).logits[:, -1]
    prefill = model(ids[:, :n], use_cache=True)
    step = model(ids[:, n:], **models.cached(model, prefill), use_cache=True).logits[:, -1]
    rel = (step - full).abs().max() / full.abs().max()
    assert rel < 1e-4, f"prefill {n} + 1 decode vs prefill {n + 1}: max rel error {rel.item():.2e}"


@torch.no_grad()
def test_model_is_trained_on_python(default_model):
    model, tokenizer = default_model
    ids = tokenizer(SNIPPETS[0], return_tensors="pt").input_ids
    loss = model(ids, labels=ids).loss.item()
    assert loss < MAX_PYTHON_LOSS, f"loss {loss:.3f} nats/byte on a Python snippet"


@torch.no_grad()
def test_greedy_generation_is_deterministic(default_model):
    model, tokenizer = default_model
    ids = tokenizer("def ", return_tensors="pt").input_ids
    first = model.generate(ids, max_new_tokens=16, do_sample=False)
    second = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(first, second)
    assert first.shape == (1, ids.shape[1] + 16) or first[0, -1].item() == tokenizer.eos_token_id
