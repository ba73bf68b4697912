"""Input validation shared by every public op.

Each check raises ``ValueError`` (bad shape or value) or ``TypeError`` (bad type or dtype)
naming the argument and the values it got, so that no malformed input reaches a kernel and
silently produces a wrong answer. Checks on tensor *values* (``cu_seqlens``, ``state_indices``)
need a device-to-host copy; they are skipped while torch.compile traces or a CUDA graph is
being captured, where the shapes checks still run. Slot indices have one validation
(``check_state_indices`` / ``check_slot_values``) shared by the decode and conv-update ops and
the runtime.
"""
from __future__ import annotations

import operator

import torch

from graphdelta.lowering.contract import STATE_LAYOUTS, state_shape

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def _values_checkable(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int (an int, or a numpy or 0-d tensor one), refused by ``name`` when it is
    not one (a float, a bool) or is below ``minimum``."""
    if type(value) is int:  # the common case, a few times per runtime step
        n = value
    else:
        try:
            n = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            n = None
    if n is None or (minimum is not None and n < minimum):
        raise ValueError(f"{name} must be an int{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return n


def check_tensor(name: str, t, dims: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def check_layout(state_layout) -> None:
    if state_layout not in STATE_LAYOUTS:
        raise ValueError(f"state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}")


def check_cu_seqlens(cu_seqlens, batch: int, total: int, device: torch.device) -> int:
    """Validate ``cu_seqlens`` ``[N + 1]`` for a packed batch of ``total`` tokens on ``device``;
    return N."""
    check_tensor("cu_seqlens", cu_seqlens, dims=1, dtypes=INDEX_DTYPES)
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, the tokens on {device}: put it on {device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a packed batch of size 1, got batch size {batch}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if _values_checkable(cu_seqlens):
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {offsets[:4]}...")
        if any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequence), got {offsets}")
        if offsets[-1] != total:
            raise ValueError(f"cu_seqlens must end at T={total}, got last value {offsets[-1]}")
    return cu_seqlens.shape[0] - 1


def check_slot_values(name: str, values, pool_size: int) -> None:
    """Slot indices given as host ints (a list, or a tensor's ``tolist()``): each in
    ``[0, pool_size)`` or -1, the only padding value, and no slot twice (two rows updating one
    state in place race, and each backend resolves the race differently)."""
    seen: set[int] = set()
    for i, slot in enumerate(values):
        if slot != -1 and not 0 <= slot < pool_size:
            raise ValueError(
                f"{name}[{i}] = {slot} is not a slot of the pool of {pool_size} (valid: 0 .. {pool_size - 1}, "
                "or -1 for a padded row)"
            )
        if slot in seen:
            raise ValueError(f"{name} holds slot {slot} twice ({list(values)}): each slot may appear once per call")
        if slot != -1:
            seen.add(slot)


def check_state_indices(state_indices, batch: int, pool_size: int, device: torch.device,
                        name: str = "state_indices") -> None:
    """Validate the slot indices ``[B]`` of an in-place step on a pool of ``pool_size`` states
    living on ``device``: dtype, shape and device always; the values (``check_slot_values``)
    whenever they can be read without breaking a trace or a CUDA graph capture. Reading them
    from a GPU waits for it: the runtime instead validates its host-side slot lists once per
    step and calls the ``torch.ops.graphdelta`` ops, which do not check."""
    check_tensor(name, state_indices, dims=1, dtypes=INDEX_DTYPES)
    if state_indices.shape[0] != batch:
        raise ValueError(f"{name} must be [B] = [{batch}], got {list(state_indices.shape)}")
    if state_indices.device != device:
        raise ValueError(f"{name} is on {state_indices.device}, the pool and the tokens on {device}")
    if _values_checkable(state_indices):
        check_slot_values(name, state_indices.tolist(), pool_size)


def check_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_layout) -> int:
    """Validate the inputs of the gated delta rule; return the number of sequences N."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_tensor(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, heads, dim], got shape {tuple(t.shape)}")
    check_layout(state_layout)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must start with [B, T] = [{B}, {T}] like q, got shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if H < 1 or HV < 1 or HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a positive multiple of key heads H={H}")
    for name, d in (("K", K), ("V", V)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"head dim {name}={d} must be in [1, {MAX_HEAD_DIM}]")
    if tuple(g.shape) not in ((B, T, HV), (B, T, HV, K)):
        raise ValueError(
            f"g must be [B, T, HV] = {[B, T, HV]} (GDN) or [B, T, HV, K] = {[B, T, HV, K]} (KDA), "
            f"got {list(g.shape)}"
        )
    if tuple(beta.shape) != (B, T, HV):
        raise ValueError(f"beta must be [B, T, HV] = {[B, T, HV]}, got {list(beta.shape)}")
    devices = {t.device for t in (q, k, v, g, beta)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, g, beta must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, dims=4)
        expected = state_shape(N, HV, K, V, state_layout)
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must be {list(expected)} for state_layout={state_layout!r} "
                f"(N={N}, HV={HV}, K={K}, V={V}), got {list(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device}, q on {q.device}")
    return N


def check_state_pool(q, k, v, g, beta, scale, state_pool, state_indices, state_layout) -> None:
    """Validate a decode step: ``[B, T]`` tokens against a pool of states ``[S, HV, ...]``."""
    check_gated_delta(q, k, v, g, beta, scale, None, None, state_layout)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    check_tensor("state_pool", state_pool, dims=4, dtypes=(torch.float32, torch.float64))
    expected = state_shape(state_pool.shape[0], HV, K, V, state_layout)
    if tuple(state_pool.shape) != expected:
        raise ValueError(
            f"state_pool must be {list(expected)} for state_layout={state_layout!r}, "
            f"got {list(state_pool.shape)}"
        )
    if state_pool.device != q.device:
        raise ValueError(f"state_pool is on {state_pool.device}, q on {q.device}")
    check_state_indices(state_indices, B, state_pool.shape[0], q.device)


def check_conv(x, weight, bias, state, activation, state_name: str = "initial_state") -> None:
    """Validate a causal depthwise conv1d: ``x`` ``[..., D]``, weight ``[D, W]``, state ``[N, D, S]``."""
    check_tensor("x", x)
    check_tensor("weight", weight, dims=2)
    D, W = weight.shape
    if x.shape[-1] != D:
        raise ValueError(f"x has {x.shape[-1]} channels (last dim) but weight has D={D}")
    if W < 1:
        raise ValueError(f"weight width W must be >= 1, got {W}")
    if bias is not None:
        check_tensor("bias", bias, dims=1)
        if bias.shape[0] != D:
            raise ValueError(f"bias must be [D] = [{D}], got {list(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")
    if state is not None:
        check_tensor(state_name, state, dims=3)
        if state.shape[1] != D or state.shape[2] < W - 1:
            raise ValueError(
                f"{state_name} must be [N, D={D}, S >= W-1={W - 1}], got {list(state.shape)}"
            )
    for name, t in (("weight", weight), ("bias", bias), (state_name, state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


NORM_ACTIVATIONS = ("silu", "swish", "sigmoid")


def check_gated_norm(x, gate, weight, eps, activation) -> None:
    """Validate a gated RMSNorm: ``x`` and ``gate`` ``[..., D]``, ``weight`` ``[D]``."""
    check_tensor("x", x)
    check_tensor("gate", gate)
    check_tensor("weight", weight, dims=1)
    if x.dim() < 1:
        raise ValueError(f"x must be [..., D] with at least one dimension, got a 0-dim tensor ({x.item()!r})")
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {list(x.shape)}, got {list(gate.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [D] = [{x.shape[-1]}] (x's last dim), got {list(weight.shape)}")
    # eps = 0 is a plain RMSNorm (torch's nn.RMSNorm and fla's tests allow it): an all-zero row
    # then gives inf/nan, as it does there.
    if not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a non-negative finite number, got {eps!r}")
    if activation not in NORM_ACTIVATIONS:
        raise ValueError(f"activation must be one of {NORM_ACTIVATIONS}, got {activation!r}")
    for name, t in (("gate", gate), ("weight", weight)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
