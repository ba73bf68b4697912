"""How graphdelta's Triton kernels choose a config: ``autotune`` wraps ``triton.autotune``.

- **Shared memory.** Each autotuned kernel passes ``shared_memory(config, args)``, an estimate
  in bytes of what a config needs for the call's arguments. Configs over the device's per-block
  limit (read off the device; 227 KB on H100 and H200) are dropped before anything compiles:
  Triton would otherwise compile each one, fail to launch it and move on. The estimates are
  checked against the compiler's own numbers by ``examples/compile_kernels_offline.py`` (no
  GPU) and by ``tools/gpu_configs.py`` (on a GPU).
- **``GRAPHDELTA_AUTOTUNE``**, read when the kernels are imported:
  - unset or ``1``: time every config that fits, once per tuning key; the timings are kept in
    Triton's on-disk autotune cache, so the next process reuses them without compiling the
    losers;
  - ``0``: the first config that fits, untimed (tests, quick runs: one compilation per kernel);
  - ``all``: every config, none dropped (for tools that compile and check each one).
- **The interpreter** (``TRITON_INTERPRET=1``) runs the first config only: timing there
  measures nothing but Python.

``TUNED`` lists every kernel made here with all its configs, for the tools.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODES = ("1", "0", "all")
HOPPER_SHARED_LIMIT = 232448  # bytes per block, opt-in maximum of sm_90 (227 KB)

SharedMemory = Callable[[triton.Config, dict], int]


def mode() -> str:
    value = os.environ.get("GRAPHDELTA_AUTOTUNE", "1").strip().lower() or "1"
    if value not in MODES:
        raise ValueError(f"GRAPHDELTA_AUTOTUNE must be one of {MODES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _device_limit(device: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device)["max_shared_mem"])


def shared_memory_limit() -> int:
    """Shared memory one program may use on the current CUDA device (the opt-in maximum), in
    bytes; Hopper's when the device cannot be asked (no driver: offline compiles, CPU)."""
    try:
        from triton.runtime import driver

        return _device_limit(driver.active.get_current_device())
    except Exception:  # noqa: BLE001 - any driver without the query
        return HOPPER_SHARED_LIMIT


def fitting(configs: list[triton.Config], args: dict, shared_memory: SharedMemory | None,
            limit: int) -> list[triton.Config]:
    """The configs whose estimate is within ``limit``; the smallest one if none is (its launch
    then fails with Triton's own out-of-resources error, naming the kernel)."""
    if shared_memory is None:
        return list(configs)
    sizes = [shared_memory(c, args) for c in configs]
    kept = [c for c, size in zip(configs, sizes) if size <= limit]
    return kept or [configs[sizes.index(min(sizes))]]


def candidates(configs: list[triton.Config], args: dict, how: str, limit: int,
               shared_memory: SharedMemory | None = None,
               prune: Callable[[list[triton.Config], dict], list[triton.Config]] | None = None,
               ) -> list[triton.Config]:
    """The configs a launch with ``args`` chooses from in mode ``how`` (``GRAPHDELTA_AUTOTUNE``)
    on a device with ``limit`` bytes of shared memory per block."""
    kept = prune(configs, args) if prune is not None else list(configs)
    if how != "all":
        kept = fitting(kept, args, shared_memory, limit)
    return kept[:1] if how == "0" else kept


def _untimed(kernel_call, quantiles=None, **_: Any) -> list[float]:
    """``do_bench`` stand-in of mode 0: one config is left, nothing to time."""
    return [0.0, 0.0, 0.0]


TUNED: dict[str, tuple[Any, list[triton.Config], SharedMemory | None]] = {}


def autotune(configs: list[triton.Config], key: list[str], shared_memory: SharedMemory | None = None,
             prune: Callable[[list[triton.Config], dict], list[triton.Config]] | None = None):
    """``triton.autotune`` over ``configs`` (the first is the default: it should fit every
    shape), keyed on ``key``. ``prune(configs, args)`` drops configs that cannot help (e.g.
    tiles wider than the tensor); ``shared_memory(config, args)`` estimates a config's shared
    memory in bytes. ``args`` holds the launch's arguments by name."""
    how = mode()

    def early_config_prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # positional arguments arrive in one, keywords in the other
        return candidates(configs, args, how, shared_memory_limit(), shared_memory, prune)

    def decorate(fn):
        tuner = triton.autotune(
            configs=configs[:1] if INTERPRETED else configs, key=key,
            prune_configs_by={"early_config_prune": early_config_prune},
            do_bench=_untimed if how == "0" else None, cache_results=how == "1",
        )(fn)
        TUNED[fn.__name__] = (tuner, list(configs), shared_memory)
        return tuner

    return decorate
