"""What differs between the transformers versions graphdelta supports (see pyproject.toml).

transformers 5.24 renamed the cache argument of the models' ``forward`` from ``past_key_values``
to ``cache``, and the output field likewise. The old argument still works with a
``FutureWarning``, but the old output field is gone: code that reads ``out.past_key_values``
gets None and silently runs every later call without a cache. Everything in graphdelta, its
tests and benchmarks that hands a transformers cache around goes through these two helpers.

Since 5.23 transformers notes, once per function, that it runs a PyTorch fallback because
flash-linear-attention or causal_conv1d is missing: four lines for every Qwen3-Next, about the
very functions graphdelta replaces. ``quiet_kernel_fallbacks`` makes them one.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

FALLBACK_NOTE = "is falling back to its reference PyTorch implementation"
REPLACED_PACKAGES = ("flash-linear-attention", "causal_conv1d")  # whose functions graphdelta replaces


class _OneFallbackNote(logging.Filter):
    """Lets the first of transformers' fallback notes through, reworded to cover them all."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if FALLBACK_NOTE not in text or not any(f"`{p}`" in text for p in REPLACED_PACKAGES):
            return True  # (other packages' notes, e.g. mamba_ssm's, are not about what graphdelta replaces)
        if self.said:
            return False
        self.said = True
        record.msg = ("flash-linear-attention / causal_conv1d are not installed, so uncompiled layers run "
                      "transformers' PyTorch fallbacks; graphdelta.compile runs its own ops in their place")
        record.args = ()
        return True


def quiet_kernel_fallbacks() -> None:
    """One line instead of transformers' note per fallback function (idempotent)."""
    logger = logging.getLogger("transformers.integrations.hub_kernels")
    if not any(isinstance(f, _OneFallbackNote) for f in logger.filters):
        logger.addFilter(_OneFallbackNote())


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a cache: ``"cache"`` (transformers 5.24
    and later) or ``"past_key_values"``. A ``graphdelta.compile``d model answers for its model."""
    signature = getattr(model, "_signature", None) or inspect.signature(model.forward)
    return "cache" if "cache" in signature.parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward call returned (``out.cache``, or ``out.past_key_values`` before 5.24)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
