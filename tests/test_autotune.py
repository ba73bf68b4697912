"""How the kernels choose a config (``lowering/triton_autotune.py``): the shared-memory
estimates against what the compiler gave on sm_90, and the ``GRAPHDELTA_AUTOTUNE`` modes."""
import pytest
import torch
import triton

from graphdelta.lowering import triton_autotune, triton_chunk  # noqa: F401 (defines the kernels)
from graphdelta.lowering.triton_autotune import HOPPER_SHARED_LIMIT, TUNED, candidates

# Shared memory (bytes) that Triton 3.9 compiled for sm_90 at C = 64
# (examples/compile_kernels_offline.py --all-configs): (kernel, K, dtype of k, per-channel gate,
# BV, warps, stages, bytes). Configs over HOPPER_SHARED_LIMIT fail to launch.
COMPILED = [
    ("chunk_state_scan_kernel", 128, torch.bfloat16, False, bv, w, s, n) for bv, w, s, n in (
        (64, 4, 2, 147968), (64, 4, 3, 214016), (64, 8, 2, 164352), (64, 8, 3, 230400), (32, 4, 3, 189440),
        (16, 4, 3, 177152), (64, 4, 1, 81920), (32, 4, 1, 57344), (16, 4, 1, 45056))
] + [
    ("chunk_state_scan_kernel", 128, torch.bfloat16, True, bv, w, s, n) for bv, w, s, n in (
        (64, 4, 2, 180224), (64, 4, 3, 278528), (64, 8, 2, 196608), (64, 8, 3, 294912), (32, 4, 2, 163840),
        (32, 8, 3, 253952), (16, 4, 2, 155648), (16, 4, 3, 241664))
] + [
    ("chunk_state_scan_kernel", 128, torch.float32, False, bv, w, s, n) for bv, w, s, n in (
        (64, 4, 2, 115200), (64, 8, 3, 197632), (32, 4, 3, 181248), (16, 8, 2, 102912))
] + [
    ("chunk_state_scan_kernel", 256, dtype, False, bv, w, s, n) for dtype, bv, w, s, n in (
        (torch.bfloat16, 64, 4, 2, 262656), (torch.bfloat16, 64, 8, 2, 311808), (torch.bfloat16, 16, 4, 2, 238080),
        (torch.bfloat16, 32, 4, 1, 106496), (torch.bfloat16, 16, 4, 1, 86016), (torch.float32, 16, 4, 2, 270848),
        (torch.float32, 32, 4, 1, 106496), (torch.float32, 16, 4, 1, 86016))
] + [
    ("chunk_output_kernel", 128, torch.bfloat16, False, 64, 4, 2, 110592),
    ("chunk_output_kernel", 128, torch.bfloat16, False, 32, 8, 3, 83968),
    ("chunk_output_kernel", 128, torch.bfloat16, True, 64, 4, 2, 102400),
    ("chunk_output_kernel", 256, torch.bfloat16, False, 64, 4, 2, 200704),
    ("chunk_kkt_kernel", 128, torch.bfloat16, False, None, 4, 2, 65536),
    ("chunk_kkt_kernel", 128, torch.bfloat16, True, None, 8, 3, 40960),
    ("chunk_kkt_kernel", 256, torch.bfloat16, False, None, 4, 2, 131072),
    ("recompute_w_u_kernel", 128, torch.bfloat16, False, None, 4, 2, 49152),
    ("recompute_w_u_kernel", 128, torch.float32, False, None, 8, 3, 65536),
    ("recompute_w_u_kernel", 256, torch.bfloat16, False, None, 4, 2, 81920),
]


def args_for(K: int, dtype: torch.dtype, per_channel: bool) -> dict:
    return dict(C=64, BK=K, BC=16, BV=64, K=K, V=K, PER_CHANNEL=per_channel, k=torch.empty(0, dtype=dtype))


ARGS = args_for(128, torch.bfloat16, False)


@pytest.mark.parametrize("kernel,K,dtype,per_channel,bv,warps,stages,actual", COMPILED)
def test_estimate_is_never_below_the_compiler_and_on_its_side_of_the_limit(kernel, K, dtype, per_channel, bv,
                                                                          warps, stages, actual):
    """A config the estimate keeps always launches, and one it drops never fits."""
    config = triton.Config({} if bv is None else {"BV": bv}, num_warps=warps, num_stages=stages)
    got = TUNED[kernel][2](config, args_for(K, dtype, per_channel))
    assert got >= actual
    assert (got <= HOPPER_SHARED_LIMIT) == (actual <= HOPPER_SHARED_LIMIT), (got, actual)


def test_only_unpipelined_state_scans_fit_at_k256():
    _, configs, estimate = TUNED["chunk_state_scan_kernel"]
    kept = candidates(configs, args_for(256, torch.bfloat16, False), "1", HOPPER_SHARED_LIMIT, estimate)
    assert kept and {c.num_stages for c in kept} == {1}


def test_kda_state_scan_drops_its_three_stage_configs_at_k128():
    _, configs, estimate = TUNED["chunk_state_scan_kernel"]
    args = {**ARGS, "PER_CHANNEL": True}
    kept = candidates(configs, args, "1", HOPPER_SHARED_LIMIT, estimate)
    assert {c.num_stages for c in kept} == {1, 2} and len(kept) == 8
    assert candidates(configs, args, "all", HOPPER_SHARED_LIMIT, estimate) == configs
    assert candidates(configs, args, "0", HOPPER_SHARED_LIMIT, estimate) == kept[:1]


def test_nothing_fits_leaves_the_smallest():
    """A launch no config fits still gets one (its failure then names the kernel)."""
    _, configs, estimate = TUNED["chunk_state_scan_kernel"]
    kept = candidates(configs, {**ARGS, "PER_CHANNEL": True}, "1", 40 * 1024, estimate)
    assert len(kept) == 1 and kept[0].kwargs["BV"] == 16 and kept[0].num_stages == 1


def test_prune_runs_first():
    _, configs, _ = TUNED["chunk_state_scan_kernel"]
    kept = candidates(configs, ARGS, "1", HOPPER_SHARED_LIMIT, None,
                      prune=lambda cs, args: [c for c in cs if c.kwargs["BV"] == 32])
    assert len(kept) == 5 and all(c.kwargs["BV"] == 32 for c in kept)


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
