"""Cost measurements in the benchmark's units: seconds, one full-data gradient, peak memory."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

from scalable_hbt import Objective
from scalable_hbt.memory import PeakMemory

T = TypeVar("T")
MIB = 2 ** 20


def gradient_seconds(objective: Objective, rounds: int = 3) -> float:
    """Median wall time of one full-data gradient ∇L(θ̃) (the benchmark's unit of time)."""
    objective.gradient()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        objective.gradient()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()`` with its wall time in seconds and its peak resident memory above the start in MiB."""
    gc.collect()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, mem.increase / MIB
