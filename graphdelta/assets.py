"""The default model that ships inside the package: a tiny byte-level Qwen3-Next.

``graphdelta/assets/qwen3next-tiny/`` holds a 4-layer hybrid (3 Gated DeltaNet : 1 gated full
attention, GVA ratio 2, a small MoE) trained on the Python standard library; it is made by
``examples/make_checkpoint.py`` and its README records how. Loading never touches the network.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "assets" / "qwen3next-tiny"


def auto_model_class(config):
    """transformers' ``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a model
    that ships only as an image-text model (GLM-5-Next); both give text logits for token ids."""
    import transformers

    for name in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"config {type(config).__name__} is neither a causal LM's nor an image-text model's")


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a local transformers checkpoint folder (the shipped one when ``path`` is None) and its
    tokenizer, offline. Returns ``(model, tokenizer)`` with the model in eval mode on ``device``."""
    if path is None:
        return load_default_model(dtype, device)
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a local transformers checkpoint folder")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    auto = auto_model_class(AutoConfig.from_pretrained(path, local_files_only=True))
    model = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the shipped checkpoint and its byte-level tokenizer, offline.

    Returns ``(model, tokenizer)``: a ``Qwen3NextForCausalLM`` in eval mode on ``device`` and a
    fast tokenizer whose ids 0..255 are the bytes of the utf-8 text.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {DEFAULT_MODEL_DIR}; run `python examples/make_checkpoint.py` to make it"
        )
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer
