"""What the two snapshot examples share: Born-rule sampling of the exact ground states, and the
time / HVP / peak-memory record of each phase of a run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from scalable_hbt.memory import PeakMemory, format_bytes, resident_bytes
from scalable_hbt.physics import V1_TRANSITION, ground_states

T = TypeVar("T")


def bayes_accuracy(L: int, train_v1: tuple[float, ...], test_v1: tuple[float, ...]) -> dict[str, float]:
    """The best accuracy any classifier of single snapshots trained on ``train_v1`` can reach,
    from the exact Born probabilities: the Bayes rule decides CDW-I where the equal mixture of
    the CDW-I training distributions is more likely than the Luttinger-liquid one; returned per
    test V1 (the probability that a snapshot drawn at that V1 gets its phase) and for the
    training mixture itself (``"train"``)."""
    train = np.asarray(train_v1, dtype=float)
    P = ground_states(L, list(train_v1), progress=False) ** 2
    ll, cdw = P[train <= V1_TRANSITION].mean(axis=0), P[train > V1_TRANSITION].mean(axis=0)
    cdw_decision = cdw > ll
    out = {"train": float(0.5 * (ll[~cdw_decision].sum() + cdw[cdw_decision].sum()))}
    Q = ground_states(L, list(test_v1), progress=False) ** 2
    for v, q in zip(test_v1, Q):
        out[f"{v:g}"] = float(q[cdw_decision].sum() if v > V1_TRANSITION else q[~cdw_decision].sum())
    return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


class Phases:
    """Time, HVPs and peak memory of each phase of a run: the resident set size sampled during
    the phase (``PeakMemory``), reported above the resident size when the run started (torch and
    the libraries imported). HVPs are summed over the operators in ``operators``."""

    def __init__(self, progress: bool) -> None:
        self.baseline = resident_bytes()
        self.rows: dict[str, dict[str, float]] = {}
        self.operators: list[Any] = []
        self.progress = progress

    def hvps(self) -> float:
        return float(sum(op.num_hvps for op in self.operators))

    def __call__(self, name: str, fn: Callable[[], T]) -> T:
        t0, h0 = time.perf_counter(), self.hvps()
        with PeakMemory() as mem:
            out = fn()
        row = {"seconds": time.perf_counter() - t0, "hvps": self.hvps() - h0,
               "peak_above_baseline": mem.peak - self.baseline, "phase_increase": mem.increase}
        self.rows[name] = row
        if self.progress:
            print(f"{name:<40} {row['seconds']:8.1f} s  {row['hvps']:7.0f} HVPs  peak "
                  f"{format_bytes(row['peak_above_baseline'])} above the baseline", flush=True)
        return out

    def peak(self) -> int:
        return int(max(r["peak_above_baseline"] for r in self.rows.values()))
