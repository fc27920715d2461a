"""Run settings of the benchmark suite, read once from the environment.

``HBT_BENCH_MODE``: ``quick`` (about half an hour on a 2-core CPU: the minimum of rounds, the reduced
physics grid, scaling up to M ≈ 1e6) or ``full`` (the default: more rounds, the paper's 500
points per phase, scaling up to M ≈ 1e7). ``HBT_BENCH_QUICK=1`` is another spelling of
``HBT_BENCH_MODE=quick``.

``HBT_BENCH_DEVICE``: the torch device every problem is built on (default ``cpu``).
"""

from __future__ import annotations

import os

import torch

_mode = os.environ.get("HBT_BENCH_MODE", "").strip().lower()
if not _mode:
    _mode = "quick" if os.environ.get("HBT_BENCH_QUICK", "") not in ("", "0") else "full"
if _mode not in ("quick", "full"):
    raise ValueError(f"HBT_BENCH_MODE must be 'quick' or 'full'; got {_mode!r}.")

MODE: str = _mode
QUICK: bool = MODE == "quick"
DEVICE: str = os.environ.get("HBT_BENCH_DEVICE", "cpu")

MIN_ROUNDS: int = 5
"""Interleaved rounds below which a time ratio is not reported: one round is noise, not a
measurement (``harness.Rows`` refuses a ratio measured over fewer)."""


def rounds(full: int) -> int:
    """Timed rounds of a ratio: ``MIN_ROUNDS`` in quick mode, max(full, ``MIN_ROUNDS``) in full mode."""
    return MIN_ROUNDS if QUICK else max(full, MIN_ROUNDS)


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on CPU) so that wall-clock timings are honest."""
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()
