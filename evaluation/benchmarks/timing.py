"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["median_time"]


def median_time(fn: Callable[[], Any], repeats: int, *, warmup: bool = False) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn`` and the last call's result.

    Each call is preceded by ``gc.collect()`` (so one call's garbage is not collected inside the
    next timing); ``warmup=True`` makes one untimed call first (first-use costs: allocator,
    kernels, lazy imports).

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    if warmup:
        fn()
    times: list[float] = []
    out: Any = None
    for _ in range(repeats):
        out = None  # free the previous result before timing the next call
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
