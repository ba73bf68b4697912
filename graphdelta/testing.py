"""Fuzzing harness: hypothesis strategies that draw valid gated-delta problems, adapters that
run any implementation with the fla signature on them, and a checker against the float64
reference.

A problem is drawn as a :class:`ProblemSpec` (plain numbers and flags plus a seed), so a
failing case prints as a one-line reproducible snippet and hypothesis shrinks it on its
fields; :meth:`ProblemSpec.build` turns it into tensors.

Tolerances (relative Frobenius error ``||out - ref|| / ||ref||`` against the float64 reference
run on the same, dtype-rounded inputs) are per dtype in :data:`TOLERANCES`: float32 keeps
~1e-6 in practice, the bound leaves room for TF32-free GPU reductions in another order;
bfloat16 and float16 are dominated by rounding the output to 8 / 11 mantissa bits (measured
~3e-3 and ~4e-4). Outputs are compared with the reference rounded to the output dtype, the
best answer that dtype can hold.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st

from graphdelta import reference
from graphdelta.lowering.contract import state_shape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCES = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GATE_REGIMES = ("zero", "mild", "steep", "mixed")


@dataclass(frozen=True)
class ProblemSpec:
    """Everything that defines one gated-delta problem; ``build()`` makes the tensors."""

    B: int = 1
    T: int = 64
    H: int = 1
    group: int = 1  # HV // H
    K: int = 16
    V: int = 16
    dtype: str = "float32"
    per_channel_gate: bool = False
    gate: str = "mixed"
    state_layout: str = "kv"
    initial_state: bool = False
    seqlens: tuple[int, ...] | None = None  # varlen: lengths summing to T, with B == 1
    l2norm_in_kernel: bool = False
    scale: float | None = None
    seed: int = 0

    @property
    def HV(self) -> int:
        return self.H * self.group

    @property
    def N(self) -> int:
        return self.B if self.seqlens is None else len(self.seqlens)

    def build(self, device: str | torch.device = "cpu") -> "Problem":
        gen = torch.Generator().manual_seed(self.seed)
        dtype = DTYPES[self.dtype]

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        B, T, H, HV, K, V = self.B, self.T, self.H, self.HV, self.K, self.V
        q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, HV, V)
        if not self.l2norm_in_kernel:
            # Real models normalize k; an unnormalized k makes the delta rule itself diverge.
            k = reference.l2norm(k)
        beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
        beta[..., : min(T, 1)] = 1.0  # the edge values beta = 0 and 1 always appear
        beta[:, T // 2 : T // 2 + 1] = 0.0
        g = self._gate((B, T, HV, K) if self.per_channel_gate else (B, T, HV), gen)
        h0 = None
        if self.initial_state:
            h0 = randn(*state_shape(self.N, HV, K, V, self.state_layout)) * 0.5
        cu = None
        if self.seqlens is not None:
            cu = torch.tensor([0, *torch.tensor(self.seqlens).cumsum(0).tolist()], dtype=torch.int32)
        tensors = [x.to(dtype).to(device) for x in (q, k, v, g, beta)]
        return Problem(
            self, *tensors,
            initial_state=None if h0 is None else h0.float().to(device),
            cu_seqlens=None if cu is None else cu.to(device),
        )

    def _gate(self, shape, gen) -> torch.Tensor:
        u = torch.rand(*shape, generator=gen, dtype=torch.float64)
        if self.gate == "zero":
            return torch.zeros(shape, dtype=torch.float64)
        if self.gate == "mild":
            return -0.1 * u
        if self.gate == "steep":
            return -30.0 * u
        # mixed: a log-sigmoid-like spread from exactly 0 to -30
        g = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen, dtype=torch.float64) * 4)
        g = g.flatten()
        g[:: 7] = 0.0
        g[3 :: 11] = -30.0
        return g.view(shape)


@dataclass
class Problem:
    spec: ProblemSpec
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None

    def kwargs(self) -> dict:
        """Keyword arguments for a function with fla's ``chunk_gated_delta_rule`` signature."""
        return dict(
            q=self.q, k=self.k, v=self.v, g=self.g, beta=self.beta, scale=self.spec.scale,
            initial_state=self.initial_state, output_final_state=True, cu_seqlens=self.cu_seqlens,
            use_qk_l2norm_in_kernel=self.spec.l2norm_in_kernel, state_layout=self.spec.state_layout,
        )

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        kw = self.kwargs()
        for name in ("q", "k", "v", "g", "beta", "initial_state"):
            if kw[name] is not None:
                kw[name] = kw[name].detach().cpu().double()
        if kw["cu_seqlens"] is not None:
            kw["cu_seqlens"] = kw["cu_seqlens"].cpu()
        return reference.gated_delta_rule(**kw)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, with a floor on the denominator for all-zero references."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    floor = 1e-6 * max(ref.numel(), 1) ** 0.5
    return ((out - ref).norm() / max(ref.norm().item(), floor)).item()


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every uninitialized allocation (``torch.empty``) with NaN, so that an output element
    an implementation forgets to write shows up as NaN."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


@dataclass
class CheckResult:
    output_error: float
    state_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.output_error <= self.tolerance and self.state_error <= self.tolerance


def check(impl: Callable, problem: Problem) -> CheckResult:
    """Run ``impl(**problem.kwargs())`` and compare with the float64 reference.

    Raises AssertionError (with the reproducible spec) when an output is not finite, has the
    wrong shape or dtype, or is off by more than the dtype's tolerance.
    """
    with poisoned_allocations():
        out, state = impl(**problem.kwargs())
    ref_out, ref_state = problem.reference()
    spec = problem.spec
    where = f"\nreproduce with: check(IMPL, {spec!r}.build())"
    assert out.shape == ref_out.shape, f"output shape {tuple(out.shape)} != {tuple(ref_out.shape)}{where}"
    assert out.dtype == problem.v.dtype, f"output dtype {out.dtype} != {problem.v.dtype}{where}"
    assert state is not None and state.shape == ref_state.shape, (
        f"final state shape {None if state is None else tuple(state.shape)} != {tuple(ref_state.shape)}{where}"
    )
    assert torch.isfinite(out).all(), f"output has {(~torch.isfinite(out)).sum()} non-finite elements{where}"
    assert torch.isfinite(state).all(), f"final state has non-finite elements{where}"
    tol = TOLERANCES[problem.v.dtype]
    # The best answer in the output dtype is the reference rounded to it: with steep gates a
    # float16 output can be below float16's range, where it flushes to zero.
    best = ref_out.to(out.dtype)
    result = CheckResult(relative_error(out, best), relative_error(state, ref_state), tol)
    assert result.ok, (
        f"relative error output {result.output_error:.3g}, state {result.state_error:.3g} "
        f"> tolerance {tol:g}{where}"
    )
    return result


# ----------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Capabilities:
    """What an implementation supports; the strategy draws only problems within it."""

    per_channel_gate: bool = True
    varlen: bool = True
    vk_layout: bool = True
    custom_scale: bool = True
    dtypes: tuple[str, ...] = tuple(DTYPES)
    max_T: int = 200
    max_dim: int = 64


LENGTHS = (1, 2, 3, 16, 63, 64, 65, 100, 128, 129, 200)


@st.composite
def problem_specs(draw, caps: Capabilities = Capabilities()) -> ProblemSpec:
    """Valid problems: odd and chunk-boundary lengths, GVA ratios 1/2/4, head dims 16..128,
    both layouts, varlen splits (with length-1 sequences), initial states, gates from exactly 0
    to -30, beta from 0 to 1, with and without in-kernel l2norm."""
    T = draw(st.sampled_from([t for t in LENGTHS if t <= caps.max_T]))
    dims = [d for d in (16, 32, 64, 128) if d <= caps.max_dim]
    varlen = caps.varlen and T >= 2 and draw(st.booleans())
    seqlens = None
    if varlen:
        cuts = draw(st.lists(st.integers(1, T - 1), min_size=1, max_size=4, unique=True))
        bounds = [0, *sorted(cuts), T]
        seqlens = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return ProblemSpec(
        B=1 if varlen else draw(st.integers(1, 3)),
        T=T,
        H=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 4])),
        K=draw(st.sampled_from(dims)),
        V=draw(st.sampled_from(dims)),
        dtype=draw(st.sampled_from(caps.dtypes)),
        per_channel_gate=caps.per_channel_gate and draw(st.booleans()),
        gate=draw(st.sampled_from(GATE_REGIMES)),
        state_layout=draw(st.sampled_from(["kv", "vk"] if caps.vk_layout else ["kv"])),
        initial_state=draw(st.booleans()),
        seqlens=seqlens,
        l2norm_in_kernel=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5])) if caps.custom_scale else None,
        seed=draw(st.integers(0, 2**16)),
    )



def peak_memory_growth(fn: Callable[[], object]) -> tuple[object, int | None]:
    """``(fn(), bytes)``: how far the process's peak resident memory rose above its resident
    memory before ``fn`` (Linux resets the peak, VmHWM, when 5 is written to
    ``/proc/self/clear_refs``). ``bytes`` is None where that cannot be done. Used by the
    tensor-parallel tests and ``benchmarks/tp.py`` to show what loading by slices holds."""
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
    except (OSError, StopIteration):
        return fn(), None
    result = fn()
    return result, status("VmHWM:") - before
