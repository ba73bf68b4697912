"""The numerical confirmation of a gated-delta candidate, on an adversarial input domain.

It runs after the candidate's graph is completely explained (``grammar``), and asks whether
the function equals ``graphdelta.reference.gated_delta_rule`` everywhere the op will be used,
not only where a model's activations usually lie. For each length it draws these cases, batch
2, with a zero initial state in the first and a random one in the others (when the function
takes one):

- **typical**: gates in [-1, 0], |q| and |k| in [0.5, 1], beta in [0, 2];
- **gates**: every head gets its own gate class, 0, -1e-3, -1, -20, -1e4 or -inf, and half the
  heads also get full resets (-inf or -1e4) at random tokens;
- **norms**: q and k norms from 1e-3 to 1e3, beta scaled so the delta rule stays contractive
  (beta |k|^2 <= 2); with an l2norm inside the function, tiny norms are where its eps shows.

Lengths are 1, C - 1, C, C + 1 and 3C + 1 for chunk size C, past every integer constant the
function holds (``constants``: c + 1, and c·C + 1 for a chunk count), and past every length the
probe saw; a token loop gets 1, 2, 5, 8 and the same. Outputs and final states are compared with
the float64 reference per head, relative to the head's largest value, at ``TOLERANCE`` for the
dtype the function runs in (typical inputs; the gates and norms cases get the looser bound, as
a cumulative sum of steep gates loses low bits in float32 whatever the formulation). Where a
formulation overflows on steep gates (inf or NaN in its output), its answer is not compared:
the op gives the rule's finite answer there, which is the only change fusing makes.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable

import torch

from graphdelta import reference
from .discover import Call
from .recognize import as_kwargs, mismatch

# max error relative to each head's largest value: (typical inputs, the extreme cases)
TOLERANCE = {
    torch.float64: (1e-9, 1e-6),
    torch.float32: (1e-3, 1e-2),
    torch.float16: (1e-2, 3e-2),
    torch.bfloat16: (3e-2, 6e-2),
}
GATE_CLASSES = (0.0, -1e-3, -1.0, -20.0, -1e4, -math.inf)
MAX_LENGTH = 4096  # a constant that needs a longer check makes the function a non-match
CASES = ("typical", "gates", "norms")


@dataclasses.dataclass(frozen=True)
class Roles:
    """Parameter names of the gated-delta inputs in one function's signature, and its layouts."""

    q: str
    k: str
    v: str
    g: str
    beta: str
    state: str | None  # the initial state, [B, HV, K, V] or [B, HV, V, K]
    heads_first: bool = False  # arguments [B, H, T, .] (else [B, T, H, .]); outputs alike
    state_layouts: tuple[str, ...] = ("kv",)  # the state layouts its shapes allow ("kv", "vk")

    def tensors(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.g, self.beta)

    def to_function(self, x: torch.Tensor) -> torch.Tensor:
        """A ``[B, T, H, .]`` tensor in the function's argument layout (and back: it is its own inverse)."""
        return x.transpose(1, 2) if self.heads_first else x


@dataclasses.dataclass(frozen=True)
class Variant:
    """A confirmed set of non-tensor arguments and how the op reproduces it."""

    l2norm: bool
    returns_state: bool
    out_dtype: torch.dtype
    state_dtype: torch.dtype | None
    state_layout: str = "kv"  # the layout of the states the function takes and returns


def lengths(kind: str, chunk: int | None, constants: set[int], seen: set[int]) -> list[int] | str:
    """The lengths to check, or why no check can reach past a constant."""
    if kind == "chunk":
        base = {1, chunk - 1, chunk, chunk + 1, 3 * chunk + 1}
    else:
        base = {1, 2, 5, 8}
    base |= {t + 1 for t in seen}
    for c in sorted(abs(c) for c in constants):
        if c + 1 > MAX_LENGTH:
            return (f"holds the integer constant {c}, which no shape explains, and the check reaches "
                    f"only {MAX_LENGTH} tokens")
        base.add(c + 1)
        if kind == "chunk" and c * chunk + 1 <= MAX_LENGTH:
            base.add(c * chunk + 1)
    return sorted(t for t in base if t >= 1)


def _unit(gen: torch.Generator, shape: tuple[int, ...], norms: torch.Tensor) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True) * norms


def draw(template: Call, roles: Roles, T: int, case: str, seed: int) -> dict[str, Any]:
    """Arguments like ``template``'s (batch 2, length T) for one case; tensors in the dtypes of
    the recorded call, drawn in float64 and rounded once."""
    gen = torch.Generator().manual_seed(seed * 7919 + T * 31 + CASES.index(case))
    b = template.bound
    _, _, H, K = roles.to_function(b[roles.q]).shape
    _, _, HV, V = roles.to_function(b[roles.v]).shape
    B = 2
    per_channel = b[roles.g].dim() == 4
    gshape = (B, T, HV, K) if per_channel else (B, T, HV)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    if case == "norms":
        qn = 10 ** (6 * rand(B, T, H, 1) - 3)
        kn = 10 ** (6 * rand(B, T, H, 1) - 3)
    else:
        qn, kn = 0.5 + 0.5 * rand(B, T, H, 1), 0.5 + 0.5 * rand(B, T, H, 1)
    q, k = _unit(gen, (B, T, H, K), qn), _unit(gen, (B, T, H, K), kn)
    beta = 2 * rand(B, T, HV)
    if case == "norms":  # keep beta |k|^2 <= 2 for the value head's key head
        k2 = (kn[..., 0] ** 2).repeat_interleave(HV // H, dim=2)
        beta = beta / k2.clamp_min(1.0)
    g = -rand(*gshape)
    if case == "gates":
        for h in range(HV):
            cls = GATE_CLASSES[(h + seed) % len(GATE_CLASSES)]
            g[:, :, h] = cls * (0.5 + 0.5 * rand(*g[:, :, h].shape)) if math.isfinite(cls) else cls
            if h % 2 == 1:
                resets = rand(B, T) < 0.15
                g[:, :, h][resets] = -math.inf if seed % 2 else -1e4
    args = dict(b)
    args.update({roles.q: q, roles.k: k, roles.v: torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64),
                 roles.g: g, roles.beta: beta})
    # drawn on the CPU (the same numbers on every device), checked where the function runs
    for n in roles.tensors():
        args[n] = roles.to_function(args[n]).to(device=b[n].device, dtype=b[n].dtype)
    if roles.state is not None and isinstance(b.get(roles.state), torch.Tensor):
        state = b[roles.state]
        s = torch.randn(B, *state.shape[1:], generator=gen, dtype=torch.float64)
        args[roles.state] = (s if seed else torch.zeros_like(s)).to(device=state.device, dtype=state.dtype)
    return args


def _fingerprint(x: torch.Tensor) -> tuple:
    """A tensor by dtype, shape and a digest of its values (the same values, the same key)."""
    data = x.detach().cpu().contiguous()
    return x.dtype, tuple(x.shape), hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


@functools.lru_cache(maxsize=256)
def _reference_of(key: tuple, *tensors: _Keyed) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, g, beta, state = (t.value if t is not None else None for t in tensors)
    l2norm, layout = key
    return reference.gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                      initial_state=state.double() if state is not None else None,
                                      output_final_state=True, use_qk_l2norm_in_kernel=l2norm,
                                      state_layout=layout)


def _reference(args: dict[str, Any], roles: Roles, l2norm: bool, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on ``args`` (the function's layouts), output and final state in those layouts too.

    Results are kept per input values (a digest of each tensor, which the cache's key compares):
    the draws depend only on shapes, dtypes and seeds, so every compile of a model with the same
    dimensions asks for the same references, and the float64 token loop is the check's main cost.
    """
    state = args.get(roles.state) if roles.state is not None else None
    tensors = [_Keyed(roles.to_function(args[n]).cpu()) for n in roles.tensors()]
    tensors.append(_Keyed(state.cpu()) if isinstance(state, torch.Tensor) else None)
    o, final = _reference_of((l2norm, layout), *tensors)
    return roles.to_function(o), final


class _Keyed:
    """A tensor that hashes and compares by its fingerprint (for ``functools.lru_cache``)."""

    __slots__ = ("value", "key")

    def __init__(self, value: torch.Tensor):
        self.value, self.key = value, _fingerprint(value)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Keyed) and self.key == other.key


def confirm(fn: Callable, template: Call, roles: Roles, check_lengths: list[int]) -> Variant | str:
    """The variant that reproduces ``fn`` at ``template``'s non-tensor arguments on every case
    and length, or why none does."""
    dtype = template.bound[roles.v].dtype
    typical_tol, extreme_tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    runs = []
    for T in check_lengths:
        for seed, case in enumerate(CASES):
            args = draw(template, roles, T, case, seed)
            try:
                with torch.no_grad():
                    out = fn(**as_kwargs(args))
            except Exception as e:  # noqa: BLE001
                return f"raised {type(e).__name__} on {case} inputs of length {T}: {e}"
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
                    and (out[1] is None or isinstance(out[1], torch.Tensor))):
                return "does not return (output, state): a replacement would drop the rest"
            runs.append((T, case, args, out))
    reasons = []  # (runs matched, why) per hypothesis: the one that got furthest is reported
    heads = (0, 1) if roles.heads_first else (0, 2)
    for l2norm, layout in ((l2, lay) for l2 in (True, False) for lay in roles.state_layouts):
        why = None
        for matched, (T, case, args, (o, final)) in enumerate(runs):
            ref_o, ref_s = _reference(args, roles, l2norm, layout)
            tol = typical_tol if case == "typical" else extreme_tol
            why = mismatch(o, ref_o.to(o.device), tol, keep=heads, nonfinite_ok=case != "typical")
            if why is None and final is not None:
                why = mismatch(final, ref_s.to(final.device), tol, keep=(0, 1), nonfinite_ok=case != "typical")
                why = f"its final state {why}" if why else None
            elif why is not None:
                why = f"its output {why}"
            if why is not None:
                why = f"{why} on {case} inputs of length {T}"
                break
        if why is None:
            o, final = runs[0][3]
            return Variant(l2norm, final is not None, o.dtype, final.dtype if final is not None else None, layout)
        closest = f"{'with' if l2norm else 'without'} an l2norm of q and k, the state {layout}"
        reasons.append((matched, f"{why} (closest: {closest})"))
    return "differs from the gated delta rule: " + max(reasons, key=lambda r: r[0])[1]
