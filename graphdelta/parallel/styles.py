"""graphdelta's tensor-parallel styles: ``torch.distributed.tensor.parallel.ParallelStyle``s
that ``parallelize_module`` applies, sharding a module's parameters in place.

Unlike torch's ``ColwiseParallel``/``RowwiseParallel``, the shards stay plain local tensors
(torch's styles hold DTensors), for three reasons:
- the layouts of these models are not one contiguous split: a conv over ``[q; k; v]`` is split
  segment by segment, fused gate/up expert weights half by half, KV heads are copied when there
  are fewer of them than ranks;
- graphdelta's ops then see exactly the local heads, as in vLLM and SGLang, and the passes
  recognize the same graphs as on one device;
- the only communication is the sum after a row-parallel projection (``ReduceOutput``), one
  functional all-reduce (``torch.distributed._functional_collectives``), which Dynamo traces
  into the graph, so inductor and CUDA graphs see it.

Each shard records where it came from (``Shard``, on the parameter as ``_graphdelta_shard``):
``graphdelta.parallel.load`` reads exactly those ranges from a checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle


@dataclasses.dataclass(frozen=True)
class Shard:
    """A local parameter is the concatenation, along ``dim``, of the ``ranges`` (start, stop)
    of the full parameter, whose size along ``dim`` is ``full``."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int


def piece_ranges(size: int, segments: Sequence[int] | None, rank: int, parts: int) -> tuple[tuple[int, int], ...]:
    """Rank ``rank``'s ranges of a dimension of ``size`` made of ``segments`` (sizes summing to
    ``size``; default one segment): the ``rank``-th of ``parts`` equal pieces of each segment."""
    segments = [size] if segments is None else list(segments)
    if sum(segments) != size:
        raise ValueError(f"segments {segments} do not add up to the dimension's size {size}")
    out, start = [], 0
    for s in segments:
        if s % parts:
            raise ValueError(f"a segment of {s} does not split into {parts} equal pieces")
        step = s // parts
        out.append((start + rank * step, start + (rank + 1) * step))
        start += s
    return tuple(out)


def shard_parameter(module: nn.Module, name: str, dim: int, ranges: tuple[tuple[int, int], ...]) -> None:
    """Replace ``module.<name>`` by the concatenation of ``ranges`` along ``dim`` (works on the
    meta device too, where ``graphdelta.parallel.load`` fills it in later)."""
    param = getattr(module, name)
    if param is None:
        return
    if getattr(param, "_graphdelta_shard", None) is not None:
        raise RuntimeError(f"{type(module).__name__}.{name} is already sharded")
    dim = dim % param.dim()
    pieces = [param.narrow(dim, a, b - a) for a, b in ranges]
    local = (torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]).contiguous()
    shard = Shard(dim, ranges, param.shape[dim])
    if isinstance(param, nn.Parameter):
        local = nn.Parameter(local, requires_grad=param.requires_grad)
    local._graphdelta_shard = shard
    setattr(module, name, local)


def _rank(mesh: DeviceMesh) -> tuple[int, int]:
    return mesh.get_local_rank(), mesh.size()


class Split(ParallelStyle):
    """Shard parameters of the module along the given dims (``{"weight": 0}``: column parallel
    for an ``nn.Linear``, channel parallel for a depthwise ``nn.Conv1d``).

    Args:
        dims: parameter name -> dimension to split.
        segments: sizes of the segments the dimension is made of, each split on its own
            (``[key_dim, key_dim, value_dim]`` for a conv over ``[q; k; v]``).
        copies: how many consecutive ranks hold the same piece (KV heads replicated when there
            are fewer than ranks: with 2 KV heads on 4 ranks, ranks 0-1 hold head 0).
    """

    def __init__(self, dims: dict[str, int], segments: Sequence[int] | None = None, copies: int = 1):
        super().__init__()
        self.dims, self.segments, self.copies = dims, segments, copies

    def check(self, module: nn.Module, ranks: int) -> None:
        """Raise, naming the numbers, what ``_apply`` would fail on (before any style applies)."""
        for name, dim in self.dims.items():
            param = getattr(module, name, None)
            if param is None:
                if name != "bias":
                    raise AttributeError(f"{type(module).__name__} has no parameter {name!r} to split")
                continue
            try:
                piece_ranges(param.shape[dim], self.segments, 0, ranks // self.copies)
            except ValueError as err:
                raise ValueError(f"{type(module).__name__}.{name} {tuple(param.shape)} over {ranks} ranks: "
                                 f"{err}") from None

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rank, size = _rank(device_mesh)
        for name, dim in self.dims.items():
            param = getattr(module, name, None)
            if param is None:
                continue
            ranges = piece_ranges(param.shape[dim], self.segments, rank // self.copies, size // self.copies)
            shard_parameter(module, name, dim, ranges)
        return module


class RowSplit(Split):
    """Row parallel ``nn.Linear``: the input features split (the weight's dim 1), each rank's
    output a partial sum. The bias is added once in the sum: kept on rank 0, zero elsewhere.
    The sum itself is a ``ReduceOutput`` on this module or on one that encloses it."""

    def __init__(self):
        super().__init__({"weight": 1})

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        super()._apply(module, device_mesh)
        bias = getattr(module, "bias", None)
        if bias is not None and device_mesh.get_local_rank() != 0:
            with torch.no_grad():
                bias.zero_()
            bias._graphdelta_zero = True  # for graphdelta.parallel.load: not read, zero
        return module


def all_reduce(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """The sum of ``x`` over the mesh, as a traceable functional collective."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", mesh))


class ReduceOutput(ParallelStyle):
    """Sum the module's output over the ranks: the one all-reduce after a row-parallel
    projection (attention's ``o_proj``) or after a whole MLP / MoE block whose every term
    (routed experts, shared expert) is a partial sum."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def reduce(_module, _inputs, output):
            if isinstance(output, tuple):
                return (all_reduce(output[0], device_mesh), *output[1:])
            return all_reduce(output, device_mesh)

        module.register_forward_hook(reduce)
        return module


class SetAttributes(ParallelStyle):
    """Set the module's head counts and widths to their local values (transformers' layers
    read them in ``view``/``split`` calls)."""

    def __init__(self, **values: int):
        super().__init__()
        self.values = values

    def check(self, module: nn.Module, ranks: int) -> None:
        for name in self.values:
            if not hasattr(module, name):
                raise AttributeError(f"{type(module).__name__} has no attribute {name!r} to set")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, value in self.values.items():
            setattr(module, name, value)
        return module


class SplitNorm(ParallelStyle):
    """An RMSNorm over all heads at once (OLMo-Hybrid's q and k norms, ``[H * D]``) on a
    rank's heads: its weight split like the projection before it, the mean of squares summed
    over the ranks. With ``copies`` (replicated KV heads) each head is counted ``copies`` times
    in the sum and in the width alike, so the mean is unchanged."""

    def __init__(self, copies: int = 1):
        super().__init__()
        self.copies = copies

    def check(self, module: nn.Module, ranks: int) -> None:
        if not hasattr(module, "variance_epsilon"):
            raise AttributeError(f"{type(module).__name__} is not an RMSNorm with variance_epsilon")
        Split({"weight": 0}, copies=self.copies).check(module, ranks)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        Split({"weight": 0}, copies=self.copies)._apply(module, device_mesh)
        eps = module.variance_epsilon
        ranks = device_mesh.size()

        def forward(x: Tensor) -> Tensor:
            dtype = x.dtype
            x = x.float()
            squares = all_reduce(x.pow(2).sum(-1, keepdim=True), device_mesh)
            x = x * torch.rsqrt(squares / (x.shape[-1] * ranks) + eps)
            return (module.weight * x).to(dtype)

        module.forward = forward
        return module
