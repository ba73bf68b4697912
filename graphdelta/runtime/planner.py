"""How much cache memory a sequence costs, per layer kind, and how many sequences fit.

Attention layers grow with every token (K and V for each KV head); linear-attention layers keep
a fixed conv state and recurrent state per sequence, whatever its length. The cache allocates
exactly what this plan says (``HybridCache.nbytes() == plan.total_bytes(slots, max_len)``),
including one sentinel row (attention, conv and recurrent) that padded rows of a batched step use.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from graphdelta.runtime.layers import ModelSpec


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    attention_layers: int
    linear_layers: int
    attention_bytes_per_token: int  # K + V of one token, summed over the attention layers
    conv_bytes_per_sequence: int  # conv states, summed over the linear layers
    recurrent_bytes_per_sequence: int  # recurrent states, summed over the linear layers

    @property
    def fixed_bytes_per_sequence(self) -> int:
        return self.conv_bytes_per_sequence + self.recurrent_bytes_per_sequence

    def attention_bytes_per_sequence(self, max_len: int) -> int:
        return self.attention_bytes_per_token * max_len

    def bytes_per_sequence(self, max_len: int) -> int:
        return self.fixed_bytes_per_sequence + self.attention_bytes_per_sequence(max_len)

    def total_bytes(self, sequences: int, max_len: int) -> int:
        """Bytes of a cache for ``sequences`` slots of ``max_len`` tokens (plus the sentinel row)."""
        return (sequences + 1) * self.bytes_per_sequence(max_len)

    def max_sequences(self, budget_bytes: int, max_len: int) -> int:
        """The most sequences of up to ``max_len`` tokens whose cache fits in ``budget_bytes``."""
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        return max(0, budget_bytes // self.bytes_per_sequence(max_len) - 1)

    def table(self, max_len: int) -> str:
        mib = 2 ** 20
        return "\n".join([
            f"attention: {self.attention_layers} layers, {self.attention_bytes_per_token} B/token "
            f"= {self.attention_bytes_per_sequence(max_len) / mib:.1f} MiB/sequence at {max_len} tokens",
            f"linear: {self.linear_layers} layers, conv {self.conv_bytes_per_sequence / mib:.2f} MiB + "
            f"recurrent {self.recurrent_bytes_per_sequence / mib:.2f} MiB per sequence (any length)",
        ])


def plan_memory(config_or_spec: Any, dtype: torch.dtype = torch.bfloat16,
                state_dtype: torch.dtype = torch.float32) -> MemoryPlan:
    """The memory plan of a model: attention KV and conv states in ``dtype`` (the model's),
    recurrent states in ``state_dtype`` (float32: they accumulate over the whole sequence)."""
    spec = config_or_spec if isinstance(config_or_spec, ModelSpec) else ModelSpec.from_config(config_or_spec)
    a, lin = spec.attention, spec.linear
    n_attn, n_lin = len(spec.attention_layers), len(spec.linear_layers)
    return MemoryPlan(
        attention_layers=n_attn,
        linear_layers=n_lin,
        attention_bytes_per_token=n_attn * a.kv_heads * (a.k_dim + a.v_dim) * _itemsize(dtype),
        conv_bytes_per_sequence=n_lin * lin.conv_dim * (lin.conv_width - 1) * _itemsize(dtype),
        recurrent_bytes_per_sequence=n_lin * lin.heads * lin.k_dim * lin.v_dim * _itemsize(state_dtype),
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device``: the GPU's free memory, the host's
    ``MemAvailable`` (Linux) or free pages; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(plan: MemoryPlan, sequences: int, max_len: int, device: torch.device) -> None:
    """Refuse, naming the numbers, a cache of ``sequences`` x ``max_len`` tokens larger than the
    memory free on ``device`` (generate(max_new_tokens=10**8) once tried 429 GiB)."""
    need = plan.total_bytes(sequences, max_len)
    free = available_bytes(device)
    if free is not None and need > free:
        gib = 2 ** 30
        raise MemoryError(
            f"a cache of {sequences} sequences x {max_len} tokens needs {need / gib:.2f} GiB ({need} bytes), "
            f"more than the {free / gib:.2f} GiB free on {device}: lower max_len (or max_new_tokens) or the "
            "number of sequences"
        )
