"""Checks shared by the CUDA-graph tests of the in-place pool kernels."""
import torch


def assert_replay_matches_eager(static_out, eager_out, pool, eager_pool, before, slots, n_slots):
    """The replayed graph gave eager's output and pool; slots no row used are untouched, and the
    padded rows (slot -1) output zeros."""
    assert torch.equal(static_out, eager_out)
    assert torch.equal(pool, eager_pool)
    used = slots[slots >= 0].tolist()
    untouched = [s for s in range(n_slots) if s not in used]
    assert torch.equal(pool[untouched], before[untouched])
    assert not static_out[(slots < 0).nonzero().squeeze(1)].any()
