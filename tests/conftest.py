"""Test set-up: Triton kernels run on CPU tensors under the interpreter when there is no GPU,
hypothesis runs a small example count by default (profile ``ci``; ``fuzz`` for long runs,
chosen with HYPOTHESIS_PROFILE=fuzz), tests marked ``slow`` run only with GRAPHDELTA_SLOW=1, and
each pytest-xdist worker uses one torch thread."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker process per CPU (the README's test command): one thread each,
    # so that the workers do not contend for the cores (inductor's CPU code waits at a barrier
    # for every parallel loop, and a thread that lost its core holds all the others up).
    torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from graphdelta.testing import poisoned_allocations  # noqa: E402

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poisoned():
    """Every ``torch.empty``-style allocation is NaN-filled, so an element a kernel forgets to
    write shows up."""
    with poisoned_allocations():
        yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GRAPHDELTA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set GRAPHDELTA_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
