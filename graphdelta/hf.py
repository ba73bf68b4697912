"""What differs between the transformers versions graphdelta supports (see pyproject.toml).

transformers 5.24 renamed the cache argument of the models' ``forward`` from ``past_key_values``
to ``cache``, and the output field likewise. The old argument still works with a
``FutureWarning``, but the old output field is gone: code that reads ``out.past_key_values``
gets None and silently runs every later call without a cache. Everything in graphdelta, its
tests and benchmarks that hands a transformers cache around goes through these two helpers.
"""
from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a cache: ``"cache"`` (transformers 5.24
    and later) or ``"past_key_values"``. A ``graphdelta.compile``d model answers for its model."""
    signature = getattr(model, "_signature", None) or inspect.signature(model.forward)
    return "cache" if "cache" in signature.parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward call returned (``out.cache``, or ``out.past_key_values`` before 5.24)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
