"""How the kernels choose a config (``lowering/triton_autotune.py``): the shared-memory
estimates against what the compiler gave on sm_90, and the ``GRAPHDELTA_AUTOTUNE`` modes."""
import pytest
import torch
import triton

from graphdelta.lowering import triton_autotune, triton_chunk  # noqa: F401 (defines the kernels)
from graphdelta.lowering.triton_autotune import HOPPER_SHARED_LIMIT, TUNED, candidates

# Shared memory (bytes) that Triton 3.9 compiled for sm_90, bf16, K = V = 128, C = 64
# (examples/compile_kernels_offline.py --all-configs): kernel -> per-channel gate ->
# {(BV, warps, stages): bytes}. Configs over HOPPER_SHARED_LIMIT fail to launch.
COMPILED = {
    "chunk_state_scan_kernel": {
        False: {(64, 4, 2): 147968, (64, 4, 3): 214016, (64, 8, 2): 164352, (64, 8, 3): 230400,
                (32, 4, 3): 189440, (16, 4, 3): 177152},
        True: {(64, 4, 2): 180224, (64, 4, 3): 278528, (64, 8, 2): 196608, (64, 8, 3): 294912,
               (32, 4, 2): 163840, (32, 8, 3): 253952, (16, 4, 2): 155648, (16, 4, 3): 241664},
    },
    "chunk_output_kernel": {False: {(64, 4, 2): 110592, (32, 8, 3): 83968},
                            True: {(64, 4, 2): 102400, (32, 8, 3): 75776}},
    "chunk_kkt_kernel": {False: {(None, 4, 2): 65536}, True: {(None, 8, 3): 40960}},
    "recompute_w_u_kernel": {False: {(None, 4, 2): 49152}, True: {(None, 8, 3): 49152}},
}
ARGS = dict(C=64, BK=128, BC=16, BV=64, K=128, V=128, k=torch.empty(0, dtype=torch.bfloat16))


def config_of(kernel: str, bv, warps: int, stages: int) -> triton.Config:
    return next(c for c in TUNED[kernel][1] if c.kwargs.get("BV") == bv and c.num_warps == warps
                and c.num_stages == stages)


@pytest.mark.parametrize("kernel", list(COMPILED))
def test_estimates_keep_only_configs_that_fit(kernel):
    """Each estimate is at least what the compiler gave (never a config kept that cannot
    launch), and within 24 KB of it (no config dropped that fits, at these shapes)."""
    estimate = TUNED[kernel][2]
    for per_channel, table in COMPILED[kernel].items():
        for (bv, warps, stages), actual in table.items():
            got = estimate(config_of(kernel, bv, warps, stages), {**ARGS, "PER_CHANNEL": per_channel})
            assert actual <= got <= actual + 24 * 1024, (per_channel, bv, warps, stages, actual, got)
            assert (got <= HOPPER_SHARED_LIMIT) == (actual <= HOPPER_SHARED_LIMIT)


def test_kda_state_scan_drops_its_three_stage_configs_at_k128():
    _, configs, estimate = TUNED["chunk_state_scan_kernel"]
    args = {**ARGS, "PER_CHANNEL": True}
    kept = candidates(configs, args, "1", HOPPER_SHARED_LIMIT, estimate)
    assert {c.num_stages for c in kept} == {2} and len(kept) == 6
    assert candidates(configs, args, "all", HOPPER_SHARED_LIMIT, estimate) == configs
    assert candidates(configs, args, "0", HOPPER_SHARED_LIMIT, estimate) == kept[:1]


def test_nothing_fits_leaves_the_smallest():
    """A launch no config fits still gets one (its failure then names the kernel)."""
    _, configs, estimate = TUNED["chunk_state_scan_kernel"]
    kept = candidates(configs, {**ARGS, "PER_CHANNEL": True}, "1", 64 * 1024, estimate)
    assert len(kept) == 1 and kept[0].kwargs["BV"] == 16 and kept[0].num_stages == 2


def test_prune_runs_first():
    _, configs, _ = TUNED["chunk_state_scan_kernel"]
    kept = candidates(configs, ARGS, "1", HOPPER_SHARED_LIMIT, None,
                      prune=lambda cs, args: [c for c in cs if c.kwargs["BV"] == 32])
    assert len(kept) == 4 and all(c.kwargs["BV"] == 32 for c in kept)


def test_mode_is_checked(monkeypatch):
    monkeypatch.setenv("GRAPHDELTA_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="GRAPHDELTA_AUTOTUNE must be one of .* got 'fast'"):
        triton_autotune.mode()
    monkeypatch.setenv("GRAPHDELTA_AUTOTUNE", "ALL")
    assert triton_autotune.mode() == "all"


def test_limit_without_a_gpu_is_hoppers():
    if not torch.cuda.is_available():
        assert triton_autotune.shared_memory_limit() == HOPPER_SHARED_LIMIT
    else:
        assert triton_autotune.shared_memory_limit() >= 48 * 1024
