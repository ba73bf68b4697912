"""``graphdelta.load(path, mesh=...)``: a transformers hybrid model from a safetensors
checkpoint, sharded over the mesh, each rank reading only its own slices.

The model is built on the meta device (no memory), ``parallelize`` shards the meta
parameters (each records its ``Shard``: which ranges of the full tensor it holds), then every
parameter is read from the files with safetensors' slice reads, which copy only the requested
ranges. A rank's peak memory is then its own parameters plus one tensor's file pages (each
file is mapped only while one tensor is read), about 1/tp of the weights plus what is
replicated (embeddings, norms, routers, the LM head).

Checkpoints keep their own names and layouts: MoE experts one by one
(``experts.{e}.gate_proj.weight``) where transformers' models hold them fused
(``experts.gate_up_proj`` ``[E, 2I, H]``), Kimi's and OLMo-Hybrid's convs as q/k/v parts. The
mapping is transformers' own checkpoint conversion mapping; the pieces are read slice by
slice and put together.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import torch
from torch import Tensor, nn

from graphdelta.parallel.styles import Shard


def _index(path: str) -> dict[str, str]:
    """Tensor name -> file, from ``model.safetensors.index.json`` or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


class _Reader:
    """Reads tensors, or ranges of them, one file mapping at a time; counts the bytes read."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.bytes_read = 0
        self._shapes: dict[str, list[int]] = {}  # headers read once (the shape check, then the slicing)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> list[int]:
        if name not in self._shapes:
            from safetensors import safe_open

            with safe_open(self.files[name], "pt") as f:
                self._shapes[name] = f.get_slice(name).get_shape()
        return list(self._shapes[name])

    def read(self, name: str, dim: int | None = None, ranges: tuple[tuple[int, int], ...] = ()) -> Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            part = f.get_slice(name)
            if dim is None:
                pieces = [part[:]]
            else:
                lead = (slice(None),) * dim
                pieces = [part[lead + (slice(a, b),)] for a, b in ranges]
            # Slices are views of the file's mapping, read when touched: copy them now, so the
            # model owns its memory and only this tensor's pages are ever mapped at once.
            if len(pieces) > 1:
                out = torch.cat(pieces, dim or 0)
            else:
                out = pieces[0].clone(memory_format=torch.contiguous_format)
        self.bytes_read += out.numel() * out.element_size()
        return out


@dataclasses.dataclass
class Source:
    """Where a model parameter comes from: checkpoint ``keys``, one list per source pattern of
    transformers' converter (``patterns``; each list in expert order when experts are merged),
    combined by ``merge`` (stack the experts on dim 0), then ``concat`` (concatenate the
    patterns along that dim). A renamed or unchanged tensor is one key and neither."""

    keys: list[list[str]]
    patterns: list[str] = dataclasses.field(default_factory=list)
    merge: bool = False
    concat: int | None = None


def sources(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, Source]:
    """Model parameter name -> its ``Source``, by transformers' own checkpoint conversion
    mapping for the model (renamings, q/k/v convs concatenated, experts merged): a checkpoint
    that ``from_pretrained`` reads is read here. Raises, naming them, on conversions other than
    renaming, concatenation and expert merging."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate, MergeModulelist, WeightConverter, WeightRenaming, rename_source_key)

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    plans: dict[str, Source] = {}
    found: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for key in checkpoint_keys:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            plans.setdefault(target, Source([[key]]))
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = [type(op) for op in converter.operations]
        merge_dims = [op.dim for op in converter.operations if isinstance(op, MergeModulelist)]
        if ops not in ([Concatenate], [MergeModulelist], [MergeModulelist, Concatenate]) or merge_dims not in ([], [0]):
            raise NotImplementedError(
                f"{key}: transformers converts it with {[o.__name__ for o in ops]}, which graphdelta.load "
                "cannot read by slices (load the model whole with from_pretrained, then parallelize it)")
        expert = re.search(r"experts\.(\d+)\.", key) if MergeModulelist in ops else None
        found.setdefault(target, {}).setdefault(pattern, []).append((int(expert[1]) if expert else 0, key))
        concat = next((op.dim for op in converter.operations if isinstance(op, Concatenate)), None)
        plans[target] = Source([], list(converter.source_patterns), MergeModulelist in ops, concat)
    for target, by_pattern in found.items():
        plan = plans[target]
        plan.keys = [[k for _, k in sorted(by_pattern[p])] for p in plan.patterns if p in by_pattern]
    return plans


def _read_concat(reader: _Reader, keys: list[str], dim: int, shard_dim: int | None,
                 ranges: tuple[tuple[int, int], ...]) -> Tensor:
    """The ``ranges`` along ``shard_dim`` (None: everything) of the concatenation of the
    tensors ``keys`` along ``dim``, reading only those ranges."""
    if shard_dim is None:
        parts = [reader.read(k) for k in keys]
    elif shard_dim != dim:
        parts = [reader.read(k, shard_dim, ranges) for k in keys]
    else:
        parts, start = [], 0
        for k in keys:
            size = reader.shape(k)[dim]
            local = tuple((max(a, start) - start, min(b, start + size) - start) for a, b in ranges
                          if a < start + size and b > start)
            if local:
                parts.append(reader.read(k, dim, local))
            start += size
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


def _full_shape(reader: _Reader, source: Source) -> list[int]:
    """The shape of the whole parameter that ``source`` assembles, from the files' headers."""
    def joined(keys: list[str], dim: int) -> list[int]:
        shapes = [list(reader.shape(k)) for k in keys]
        out = shapes[0]
        out[dim] = sum(s[dim] for s in shapes)
        return out

    if not source.merge:
        return joined([k for group in source.keys for k in group], source.concat or 0)
    inner = 0 if source.concat is None else source.concat - 1
    return [len(source.keys[0]), *joined([group[0] for group in source.keys], inner)]


def _read_parameter(reader: _Reader, name: str, source: Source | None, param: Tensor, path: str) -> Tensor:
    """This rank's part of parameter ``name`` (its ``Shard``, or all of it). The whole tensor's
    shape in the checkpoint must be the model's (for a shard: before it was split), so a config
    that does not match its weights is refused rather than read at the wrong offsets."""
    if source is None:
        raise KeyError(f"{path} has no tensor for {name!r} (nor tensors that transformers converts into it)")
    shard: Shard | None = getattr(param, "_graphdelta_shard", None)
    expected = list(param.shape)
    if shard is not None:
        expected[shard.dim] = shard.full
    found = _full_shape(reader, source)
    if found != expected:
        raise ValueError(f"{name}: the checkpoint in {path} holds {found}, the model expects {expected} "
                         "(a config that does not match its weights?)")
    shard_dim, ranges = (None, ()) if shard is None else (shard.dim, shard.ranges)
    if not source.merge:
        keys = [k for group in source.keys for k in group]
        return _read_concat(reader, keys, source.concat or 0, shard_dim, ranges)
    if shard_dim == 0:
        raise NotImplementedError(f"{name}: experts split by expert (expert parallelism) are not supported")
    inner = None if shard_dim is None else shard_dim - 1  # per expert: the stacked dim is gone
    concat = 0 if source.concat is None else source.concat - 1
    return torch.stack([_read_concat(reader, [group[e] for group in source.keys], concat, inner, ranges)
                        for e in range(len(source.keys[0]))])


def _materialize(reader: _Reader, name: str, plan: dict[str, Source], tensor: Tensor, loaded: dict[int, Tensor],
                 path: str, device: torch.device, dtype: torch.dtype, fp32: Callable[[str], bool]) -> Tensor:
    """The loaded value of the meta ``tensor`` (a parameter or buffer) named ``name``; tied
    tensors (lm_head = embed_tokens) are read once (``loaded``, by the meta tensor's id)."""
    if id(tensor) in loaded:
        return loaded[id(tensor)]
    if getattr(tensor, "_graphdelta_zero", False):
        value = torch.zeros(tensor.shape, dtype=tensor.dtype)
    else:
        value = _read_parameter(reader, name, plan.get(name), tensor, path)
    if value.shape != tensor.shape:
        raise ValueError(f"{name}: the checkpoint gives {tuple(value.shape)}, the model expects "
                         f"{tuple(tensor.shape)} (a config that does not match its weights?)")
    # floating tensors in ``dtype``, except what transformers keeps in float32 (its dtype plan)
    # and float32 buffers (router score biases)
    keep = (tensor.dtype == torch.float32 and not isinstance(tensor, nn.Parameter)) or fp32(name)
    value = value.to(device, torch.float32 if keep and value.is_floating_point() else
                     dtype if value.is_floating_point() else value.dtype)
    new = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
    for mark in ("_graphdelta_shard", "_graphdelta_zero"):
        if hasattr(tensor, mark):
            setattr(new, mark, getattr(tensor, mark))
    loaded[id(tensor)] = new
    return new


def kept_in_float32(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether a parameter name is one that ``from_pretrained`` keeps in float32 when loading in
    ``dtype`` (the model's ``_keep_in_fp32_modules(_strict)``: Kimi's and Bailing's routers,
    ``dt_bias``, ``A_log``), by transformers' own dtype plan and pattern matching."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: False
    pattern, _, _ = build_glob_alternation(list(plan))
    return lambda name: pattern.search(name) is not None


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers that are not in checkpoints (the rotary tables ``inv_freq``): computed again by a
    fresh module of the same class from its config, on ``device``."""
    for path, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"buffers {meta} of {path or 'the model'} are not in the checkpoint and "
                               f"{type(module).__name__} has no config to compute them from")
        with torch.device(device):
            fresh = type(module)(config=config)
        for n in meta:
            setattr(module, n, getattr(fresh, n))
        for k, v in vars(fresh).items():  # e.g. the rotary attention_scaling
            if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(module, k, v)


def load(path: str, mesh: Any = None, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """A hybrid causal LM from the transformers checkpoint directory ``path``.

    With a process group of more than one rank (or a ``mesh``), the model is
    ``graphdelta.parallelize``d over it and each rank reads only its slices; otherwise it is
    loaded whole. ``dtype``: of the floating parameters (default: the config's, else float32);
    ``device``: where they go (default: this rank's GPU under NCCL, else the CPU). Returns the
    model in eval mode; ``model._graphdelta_bytes_read`` says how much this rank read."""
    import torch.distributed as dist

    from graphdelta.parallel.plan import default_mesh, parallelize

    from graphdelta.assets import OFFLINE, auto_model_class, load_config

    config = load_config(path)
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if mesh is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        mesh = default_mesh()
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if mesh is not None and mesh.device_type == "cuda" else torch.device("cpu"))
    device = torch.device(device)
    reader = _Reader(_index(path))  # before any model is built: a wrong path fails fast
    with torch.device("meta"):
        model = auto_model_class(config).from_config(config, trust_remote_code=OFFLINE["trust_remote_code"])
    if mesh is not None:
        parallelize(model, mesh)
    plan = sources(model, list(reader.files))
    fp32 = kept_in_float32(model, dtype)
    loaded: dict[int, Tensor] = {}
    for module_path, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is not None:
                name = f"{module_path}.{pname}" if module_path else pname
                module._parameters[pname] = _materialize(reader, name, plan, param, loaded, path, device, dtype, fp32)
        for bname, buffer in list(module._buffers.items()):
            name = f"{module_path}.{bname}" if module_path else bname
            if buffer is not None and name in plan:  # persistent buffers (e.g. MoE routers' score biases)
                module._buffers[bname] = _materialize(reader, name, plan, buffer, loaded, path, device, dtype, fp32)
    _rebuild_buffers(model, device)
    model._graphdelta_bytes_read = reader.bytes_read
    return model.eval()
