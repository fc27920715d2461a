"""How cost grows: time and peak memory as M and n grow.

Every point is one fresh process (``scaling_worker.py``), so that each peak-memory number
belongs to one operation alone. The model family is an MLP whose hidden width sets M
(input 64, two hidden layers of width w, 10 classes); the data are random.

* M family (n = 256): M ≈ 1e3 … 1e6 (quick) or … 1e7 (full) for a full-data HVP, Lanczos
  top-20, LiSSA (fit + one solve) and the K-FAC fit; the dense fit for M ≤ a few thousand.
* n family (M ≈ 1e5): n = 256 … 4096 (quick) or … 16384 (full) for the HVP and the K-FAC fit.

For every operation the log-log slope of seconds (and of peak memory) against M or n is
fitted by least squares, ``numpy.polyfit(log M, log t, 1)``, over the points whose time
is ≥ 10 ms (below that, fixed overheads dominate). The dense path's wall is
M_wall = max{M : ``DenseCurvature.required_bytes(M)`` ≤ available memory}
(≈ 3.5 float64 M × M matrices), marked on the plots by ``report.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from settings import DEVICE, QUICK

from scalable_hbt.curvature import DenseCurvature
from scalable_hbt.memory import available_bytes

WORKER = Path(__file__).with_name("scaling_worker.py")
ROOT = WORKER.parent.parent   # the checkout's package goes first on the worker's path
M_SIZES = [1_000, 10_000, 100_000, 1_000_000] + ([] if QUICK else [3_000_000, 10_000_000])
DENSE_SIZES = [500, 1_000, 2_000] + ([] if QUICK else [4_000])
N_SIZES = [256, 1_024, 4_096] + ([] if QUICK else [16_384])
N_FAMILY_M = 100_000
M_FAMILY_N = 256
TIMEOUT = 900 if QUICK else 3600
MIN_SECONDS = 0.01


def run_worker(op: str, M: int, n: int) -> dict:
    """One measurement in a subprocess; raises with the worker's stderr if it fails."""
    cmd = [sys.executable, str(WORKER), "--op", op, "--M", str(M), "--n", str(n), "--device", DEVICE]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"scaling worker {op} M={M} n={n} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loglog_slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log y against log x over the points with y > 0 (None if < 2 points)."""
    pts = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    xs, ys = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(xs, ys, 1)[0])


def slopes(points: list[dict], family: str) -> list[dict]:
    """Fitted slopes of time and peak memory per operation, against ``family`` ("M" or "n")."""
    out = []
    for op in dict.fromkeys(p["op"] for p in points):
        mine = [p for p in points if p["op"] == op and p["family"] == family and p["seconds"] >= MIN_SECONDS]
        out.append({"op": op, "family": family, "points": len(mine),
                    "time_slope": loglog_slope([p[family] for p in mine], [p["seconds"] for p in mine]),
                    "memory_slope": loglog_slope([p[family] for p in mine], [p["peak_bytes"] for p in mine])})
    return out


def dense_wall(budget: int) -> int:
    """Largest M whose dense fit fits into ``budget`` bytes: required_bytes(M) = c·M² ≤ budget."""
    c = DenseCurvature.required_bytes(1)
    return int(np.sqrt(budget / c))


def measure_all() -> list[dict]:
    points = []
    for M in M_SIZES:
        for op in ("hvp", "lanczos", "lissa", "kfac"):
            points.append({**run_worker(op, M, M_FAMILY_N), "family": "M"})
    for M in DENSE_SIZES:
        points.append({**run_worker("dense", M, M_FAMILY_N), "family": "M"})
    for n in N_SIZES:
        for op in ("hvp", "kfac"):
            points.append({**run_worker(op, N_FAMILY_M, n), "family": "n"})
    return points


def test_scaling(benchmark):
    """All sizes in one round; slopes and the dense wall go to the report."""
    result: dict[str, list[dict]] = {}
    benchmark.pedantic(lambda: result.update(points=measure_all()), rounds=1, iterations=1)
    points = result["points"]
    budget = available_bytes(torch.device(DEVICE))
    benchmark.extra_info.update(
        kind="scaling", points=points, slopes=slopes(points, "M") + slopes(points, "n"),
        dense_wall={"M": dense_wall(budget), "budget_bytes": budget, "bytes_per_M2": DenseCurvature.required_bytes(1)},
        families={"M": {"n": M_FAMILY_N, "sizes": M_SIZES, "dense_sizes": DENSE_SIZES},
                  "n": {"M": N_FAMILY_M, "sizes": N_SIZES}})
    assert all(np.isfinite(p["seconds"]) for p in points)
