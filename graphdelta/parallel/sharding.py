"""DTensor sharding strategies for graphdelta's functional ops (``register_sharding``), for
users who call them on DTensors: ``parallelize`` never needs them (its styles hand the ops
plain local shards), but a model sharded with torch's own styles, or user code, may.

Every op accepts replicated inputs, and splits by heads (the gated delta rule: q/k on their key
heads, v/g/beta and the state on their value heads, a contiguous split keeping the GVA ratio, as
value head h reads key head ``h // (HV / H)``), by channels (the depthwise conv) or by rows (the
gated norm, over anything but its last dim), and, without ``cu_seqlens``, by batch rows. The
split by heads is offered only when H and HV both divide by the ranks. No strategy splits the
tokens of a sequence (each chunk starts from the state the one before it left), nor a packed
batch: DTensor redistributes such inputs to one of the placements here. The in-place decode-step
ops (``gated_delta_rule_decode``, ``causal_conv1d_update``) have none: they write pools that
``graphdelta.generate`` keeps as local tensors.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard

from graphdelta import ops  # noqa: F401 (registers torch.ops.graphdelta)

_registered = False


def _optional(spec, placement):
    return None if spec is None else placement


def _gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, state_layout):
    """o ``[B, T, HV, V]`` and the final state ``[N, HV, *, *]`` from q/k ``[B, T, H, K]``, v
    ``[B, T, HV, V]``, g ``[B, T, HV(, K)]``, beta ``[B, T, HV]``, initial state ``[N, HV, *, *]``."""
    rep = Replicate()
    replicated = ([rep, rep], [rep, rep, rep, rep, rep, None, _optional(initial_state, rep),
                               _optional(cu_seqlens, rep), None, None])
    out = [replicated]
    ranks = q.mesh.size()
    if q.shape[2] % ranks == 0 and v.shape[2] % ranks == 0:  # even splits: every rank keeps the GVA ratio
        heads = Shard(2)
        out.append(([heads, Shard(1)], [heads, heads, heads, heads, heads, None, _optional(initial_state, Shard(1)),
                                        _optional(cu_seqlens, rep), None, None]))
    if cu_seqlens is None:
        rows = Shard(0)
        out.append(([rows, rows], [rows, rows, rows, rows, rows, None, _optional(initial_state, rows), None, None,
                                   None]))
    return out


def _conv(x, weight, bias, initial_state, cu_seqlens, activation):
    """y ``[B, T, D]`` and the final state ``[N, D, W - 1]`` from x ``[B, T, D]``, weight ``[D, W]``."""
    rep = Replicate()
    replicated = ([rep, rep], [rep, rep, _optional(bias, rep), _optional(initial_state, rep),
                               _optional(cu_seqlens, rep), None])
    by_channels = ([Shard(2), Shard(1)], [Shard(2), Shard(0), _optional(bias, Shard(0)),
                                          _optional(initial_state, Shard(1)), _optional(cu_seqlens, rep), None])
    out = [replicated, by_channels]
    if cu_seqlens is None:
        rows = Shard(0)
        out.append(([rows, rows], [rows, Replicate(), _optional(bias, Replicate()), _optional(initial_state, rows),
                                   None, None]))
    return out


def _norm(x, gate, weight, eps, activation, norm_before_gate):
    """out ``[..., D]`` from x and gate ``[..., D]`` and weight ``[D]``: any dim but the last."""
    rep = Replicate()
    out = [([rep], [rep, rep, rep, None, None, None])]
    for d in range(len(x.shape) - 1):
        out.append(([Shard(d)], [Shard(d), Shard(d), rep, None, None, None]))
    return out


def register() -> None:
    """Register the strategies once (``graphdelta.parallel`` does on import)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor.experimental import register_sharding

    g = torch.ops.graphdelta
    register_sharding([g.chunk_gated_delta_rule.default, g.recurrent_gated_delta_rule.default])(_gated_delta)
    register_sharding(g.causal_conv1d.default)(_conv)
    register_sharding(g.gated_rms_norm.default)(_norm)
    _registered = True
