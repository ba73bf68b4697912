"""Full-attention layers under graphdelta keep SDPA's ``is_causal`` path.

transformers builds no attention mask for a prompt without padding: SDPA gets
``is_causal=True`` and, on CPU and CUDA, runs its flash kernel on the key/value heads as they
are (``enable_gqa``). Before torch 2.14 Dynamo folded ``torch.compiler.is_exporting()`` to
True while compiling, so under ``torch.compile`` transformers believes it is exporting and
always materializes a ``[T, T]`` mask plus the repeated key/value heads: attention at 2048
tokens took twice as long as in eager (tiny Qwen3-Next, CPU).

Without a cache transformers also looks for packed sequences in ``position_ids``, a check on
their values that a traced graph cannot make, so it builds the mask there too.

graphdelta compiles, it never exports, so while its compiled forward runs transformers'
masking code is told so. Older transformers (5.17, the GPU image's) asks ``is_tracing(mask)``
instead, which is True under any ``torch.compile`` even when there is no mask to read; it is
told that only a traced mask is traced, which is the newer versions' own condition. And when
the caller passes no ``position_ids``, the model makes them itself as one ``arange`` per row,
which holds no packed sequences, and the masking code is told that as well. Every other
condition transformers checks stays as it is: a padding mask that Dynamo traces as a tensor,
a cache with earlier tokens or a sliding window still get an explicit mask.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


def _not_exporting() -> bool:
    return False


def _no_packing(position_ids):
    return None


def _only_tensors_traced(is_tracing):
    def tracing(tensor=None) -> bool:
        return tensor is not None and is_tracing(tensor)
    return tracing


@contextlib.contextmanager
def causal_sdpa(own_positions: bool) -> Iterator[None]:
    """While active, ``transformers.masking_utils`` sees that no export is in progress and, with
    ``own_positions`` (the caller passed no ``position_ids``), that no sequences are packed."""
    try:
        from transformers import masking_utils
    except ImportError:  # a model without transformers: nothing to tell
        yield
        return
    patches = {"is_torchdynamo_exporting": _not_exporting}
    if hasattr(masking_utils, "is_tracing"):
        patches["is_tracing"] = _only_tensors_traced(masking_utils.is_tracing)
    if own_positions:
        patches["find_packed_sequence_indices"] = _no_packing
    saved = {name: getattr(masking_utils, name) for name in patches if hasattr(masking_utils, name)}
    for name in saved:
        setattr(masking_utils, name, patches[name])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(masking_utils, name, fn)
