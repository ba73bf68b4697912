"""Packing of variable-length batches, and writes into state pools, for the PyTorch (CPU) path.

``cu_seqlens`` ``[N + 1]`` describes N sequences packed along T of a ``B == 1`` batch. The
PyTorch implementations work on a padded batch ``[N, L, ...]`` instead, where padding tokens
are given zero key, value, beta and gate so that they leave every state unchanged. Padding is
*selected* to zero, never multiplied by zero: a padding entry gathers token 0 of the packed
batch, and NaN * 0 = NaN would carry a non-finite first token into every other sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """Where each token of the padded ``[N, L]`` batch comes from in the packed ``[1, T]`` one."""

    index: torch.Tensor  # [N, L] token position in the packed batch (0 for padding)
    valid: torch.Tensor  # [N, L] bool, False for padding
    lengths: torch.Tensor  # [N]

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, multiple: int = 1) -> "Packing":
        offsets = cu_seqlens.to(torch.int64)
        lengths = offsets[1:] - offsets[:-1]
        longest = int(lengths.max()) if lengths.numel() else 0
        L = max(multiple, -(-longest // multiple) * multiple)
        pos = torch.arange(L, device=offsets.device)
        valid = pos[None, :] < lengths[:, None]
        index = torch.where(valid, offsets[:-1, None] + pos[None, :], 0)
        return Packing(index=index, valid=valid, lengths=lengths)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[N, L, ...]`` with zeros at padding (whatever token 0 holds)."""
        out = x[0][self.index]
        mask = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, out, 0)

    def unpad(self, y: torch.Tensor, total: int) -> torch.Tensor:
        """``[N, L, ...]`` -> ``[1, T, ...]``."""
        out = y.new_zeros(1, total, *y.shape[2:])
        out[0, self.index[self.valid]] = y[self.valid]
        return out


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad ``dim`` of ``x`` up to a multiple of ``multiple``."""
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def write_rows(pool: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, new: torch.Tensor) -> None:
    """``pool[slots[b]] = new[b]`` for the rows b where ``valid``; padded rows write nothing.

    Whole-batch ``index_copy_`` when every row is real (the common decode step), else only the
    real rows, so a padded row's clamped slot never races a real row's write.
    """
    if bool(valid.all()):
        pool.index_copy_(0, slots, new)
    else:
        rows = valid.nonzero().squeeze(1)
        pool.index_copy_(0, slots[rows], new[rows])
