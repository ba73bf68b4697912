"""The default model that ships inside the package: a tiny byte-level Qwen3-Next.

``graphdelta/assets/qwen3next-tiny/`` holds a 4-layer hybrid (3 Gated DeltaNet : 1 gated full
attention, GVA ratio 2, a small MoE) trained on the Python standard library; it is made by
``examples/make_checkpoint.py`` and its README records how. Loading never touches the network
(``local_files_only=True``) and never runs a checkpoint's own code (``trust_remote_code=False``:
an unknown ``auto_map`` is an error, not an interactive prompt).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

OFFLINE = dict(local_files_only=True, trust_remote_code=False)


class CheckpointError(ValueError):
    """A local checkpoint that cannot be loaded as it is (no config, unreadable or mismatched weights)."""

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "assets" / "qwen3next-tiny"


def auto_model_class(config):
    """transformers' ``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a model
    that ships only as an image-text model (GLM-5-Next); both give text logits for token ids."""
    import transformers

    for name in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            return auto
    raise CheckpointError(f"config {type(config).__name__} is neither a causal LM's nor an image-text model's")


def load_config(path: str | Path):
    """The transformers config of a local checkpoint folder or ``config.json``, offline."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a local transformers checkpoint folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: give a local transformers checkpoint folder")
    try:
        return AutoConfig.from_pretrained(path, **OFFLINE)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} holds no config transformers can read: {str(err).splitlines()[0]}") from None


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, strict: bool = False):
    """The model of a local checkpoint folder, offline, in eval mode.

    Weights the checkpoint lacks (left randomly initialized), holds in excess or holds in
    another shape are a ``CheckpointError`` when ``strict``, else a warning listing them. A
    truncated or garbled weights file is a ``CheckpointError`` naming the folder.
    """
    from safetensors import SafetensorError

    path = Path(path)
    auto = auto_model_class(load_config(path))
    try:
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **OFFLINE)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the weights in {path} ({type(err).__name__}: {str(err).splitlines()[0]}): "
                         "is a file truncated or not a checkpoint?") from None
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys")}
    problems["mismatched_keys"] = sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.get("mismatched_keys") or ())
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys)}" for kind, keys in problems.items())
        message = f"the checkpoint in {path} does not match {type(model).__name__} ({listed})"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message + ": those weights are random", stacklevel=2)
    return model.eval()


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", strict: bool = False):
    """Load a local transformers checkpoint folder (the shipped one when ``path`` is None) and its
    tokenizer, offline. Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.
    ``strict``: missing or unexpected weights are an error rather than a warning."""
    if path is None:
        return load_default_model(dtype, device)
    from transformers import AutoTokenizer

    model = load_checkpoint(path, dtype, strict)
    tokenizer = AutoTokenizer.from_pretrained(path, **OFFLINE)
    return model.to(device).eval(), tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the shipped checkpoint and its byte-level tokenizer, offline.

    Returns ``(model, tokenizer)``: a ``Qwen3NextForCausalLM`` in eval mode on ``device`` and a
    fast tokenizer whose ids 0..255 are the bytes of the utf-8 text.
    """
    from transformers import AutoTokenizer

    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {DEFAULT_MODEL_DIR}; run `python examples/make_checkpoint.py` to make it"
        )
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, **OFFLINE)
    model = load_checkpoint(DEFAULT_MODEL_DIR, dtype, strict=True)  # it ships whole
    return model.to(device).eval(), tokenizer
