"""The cost of an attribution in the ground-truth benchmark's units.

Unit of time: one full-data gradient ∇L(θ̃) = (1/n) Σ_i ∇ℓ(z_i, θ̃) of the workload's
objective (``Objective.gradient``, the model in eval mode, the workload's dtype and
parameters), timed in the same process as the attribution it divides, so that the quotient
holds across machines and loads. Memory: the peak resident size above the process's size
when the call began (``scalable_hbt.memory.PeakMemory``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import nn

from scalable_hbt import Objective
from scalable_hbt.memory import PeakMemory

from .workload import Workload

R = TypeVar("R")


def workload_objective(workload: Workload, model: nn.Module) -> Objective:
    """The ``Objective`` of ``workload`` at the trained ``model`` (eval mode, the model's dtype)."""
    dtype = next(model.parameters()).dtype
    return Objective(model.eval(), workload.loss, (workload.train_X.to(dtype), workload.train_y),
                     weight_decay=workload.weight_decay, params=workload.params, dtype=dtype, progress=False)


def gradient_seconds(workload: Workload, model: nn.Module, repeats: int = 3) -> float:
    """Median wall time of one full-data gradient of the workload's objective (one warm-up
    call first, so one-time set-up is not counted). Cost: repeats + 1 full-data gradients."""
    objective = workload_objective(workload, model)
    objective.gradient()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        objective.gradient()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Measured(Generic[R]):
    """What ``measure`` returns: the call's result, its seconds, the seconds in gradient
    units, and its peak resident memory above the start, in MiB."""

    result: R
    seconds: float
    gradients: float
    peak_mib: float


def measure(fn: Callable[[], R], unit_seconds: float) -> Measured[R]:
    """Run ``fn()`` once, timing it and sampling its peak memory; ``unit_seconds`` is one
    full-data gradient (``gradient_seconds``) measured in this process."""
    if unit_seconds <= 0:
        raise ValueError(f"unit_seconds must be > 0 (one full-data gradient's time); got {unit_seconds}.")
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return Measured(result, seconds, seconds / unit_seconds, memory.increase / 2**20)
