"""One backend of the cost-model benchmark in a fresh process: its HVPs and peak memory.

Usage (``test_solvers.py`` runs it, one process per (problem, backend), so that one
measurement's allocations do not hide the next one's peak)::

    python benchmarks/cost_worker.py PROBLEM BACKEND

Prints one JSON object: the problem's sizes, the spectrum quantities the cost model needs
(λ_max, λ_{d+1} for d = ``LISSA_DEFLATE``, λ_min, from Lanczos runs made before the
measurement and not counted), the damping δ = max(−λ_min, 0) + ``DAMPING_OFFSET``, and
per phase (fit, solve) the full-data HVPs (``CurvatureOperator.num_hvps``), the seconds and
the peak resident memory above the phase's start (``scalable_hbt.memory.PeakMemory``), plus
the backend's diagnostics.

Problems: MLPs Linear(d_in→w)·Tanh·Linear(w→10) at their seeded initialisation on random
data (one chunk, wd 1e-3, float64): ``small`` (d_in 32, w 64, M = 2,762, n = 512; every
backend, dense included) and ``wide`` (d_in 256, w 1024, M = 273,418, n = 64; every matrix-free
backend, where the (M, k) work arrays dominate the memory).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from scalable_hbt import Objective  # noqa: E402
from scalable_hbt.curvature import make_backend, lanczos_top, smallest_eigenvalue  # noqa: E402
from scalable_hbt.memory import PeakMemory  # noqa: E402
from scalable_hbt.operators import HessianOperator  # noqa: E402

PROBLEMS = {"small": (32, 64, 512), "wide": (256, 1024, 64)}
"""(input dimension, hidden width, training points n) of each problem."""
CLASSES, WEIGHT_DECAY = 10, 1e-3
RHS = 8
"""Right-hand sides of the solves: the gradients of the first 8 training points."""
LISSA_DEFLATE = 10
"""LiSSA's default deflation d (the cost model needs λ_{d+1})."""
DAMPING_OFFSET = 0.1
BACKEND_OPTIONS: dict[str, dict] = {"dense": {}, "cg": {"rtol": 1e-8}, "lissa": {"progress": False},
                                    "lanczos": {"m": 20}, "lowrank": {"m": 20}, "kfac": {}, "ekfac": {}}
"""Each backend with its defaults, except CG's rtol (1e-8, the cost model's ln(2/rtol) term) and
the m = 20 eigenpairs of the eigen backends (their default, spelled out)."""


def build(problem: str) -> Objective:
    d_in, width, n = PROBLEMS[problem]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, CLASSES)).double().eval()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return Objective(model, "cross_entropy", (X, y), weight_decay=WEIGHT_DECAY, batch_size=n,
                     dtype=torch.float64, progress=False)


def spectrum(obj: Objective) -> dict[str, float]:
    """λ_1, λ_{d+1} and λ_min of the Hessian (Lanczos, tight tolerances; on a separate operator)."""
    op = HessianOperator(obj)
    values, _, _ = lanczos_top(op, LISSA_DEFLATE + 1, tol=1e-8, seed=5)
    lam_min = smallest_eigenvalue(op, tol=1e-6, max_iter=300, seed=6)[0]
    return {"lambda_max": float(values[0]), "lambda_d1": float(values[LISSA_DEFLATE]), "lambda_min": float(lam_min)}


def measure(problem: str, backend_name: str) -> dict:
    obj = build(problem)
    spec = spectrum(obj)
    damping = max(-spec["lambda_min"], 0.0) + DAMPING_OFFSET
    V = obj.gradients(*obj.train.take(range(RHS))).T.contiguous()  # (M, RHS)
    backend = make_backend(backend_name, "inverse" if backend_name not in ("lanczos",) else "eigen",
                           dict(BACKEND_OPTIONS[backend_name]))
    op = HessianOperator(obj)
    out: dict = {"problem": problem, "backend": backend_name, "M": obj.num_params, "n": obj.n, "k": RHS,
                 "max_vectors": op.max_vectors, "damping": damping, **spec,
                 "options": {k: v for k, v in BACKEND_OPTIONS[backend_name].items() if k != "progress"},
                 "memory_estimate": backend.memory_estimate(op, RHS)}
    phases = {"fit": lambda: backend.fit(op)}
    if "inverse" in backend.roles:
        phases["solve"] = lambda: backend.solve(V, damping)
    for phase, run in phases.items():
        h0, t0 = op.num_hvps, time.perf_counter()
        with PeakMemory() as mem:
            run()
        out[phase] = {"hvps": op.num_hvps - h0, "seconds": time.perf_counter() - t0, "peak_bytes": max(mem.increase, 0)}
    out["diagnostics"] = {k: v for k, v in backend.diagnostics.items()
                          if isinstance(v, (int, float, str, bool)) or v is None}
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
