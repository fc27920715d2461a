"""The dense-versus-matrix-free comparison: all four methods with the exact dense oracle and
with the matrix-free backends, side by side, with their agreement and run times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ... import Objective, Toolbox
from ...curvature import CGCurvature, LanczosCurvature, LiSSACurvature
from ...metrics import agreement
from ...physics import PhaseDataset
from .config import DemoConfig
from .report import jsonable
from .timing import timed
from .training import TrainedModel

LEES_M = 12
"""Hessian eigenvectors removed for LEES, the paper's m (its threshold rule with tau = 0.1)."""


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def matrix_free_toolbox(obj: Objective, cfg: DemoConfig, damping: float | str = "auto",
                        eigenpairs: bool = True) -> Toolbox:
    """CG inverse + Lanczos top-``LEES_M`` eigenpairs (``eigenpairs=False``: no eigen backend to fit, for the
    experiments that need no LEES); ``damping="auto"`` applies the dense path's rule with
    λ_min from ARPACK on the matrix-free operator. The paper's networks are small, so the
    training chunks' gradient graphs are kept between Hessian products (``cache_graphs``)."""
    cg = CGCurvature(rtol=1e-10, max_iter=2000)
    eigen = LanczosCurvature(m=LEES_M, tol=1e-12, max_iter=400, seed=cfg.seed) if eigenpairs else None
    return Toolbox(obj, damping=damping, inverse=cg, eigen=eigen, cache_graphs=True)


@dataclass
class MethodResults:
    """Exact arrays the figures need, the side-by-side table rows and the curvature diagnostics."""

    influence: np.ndarray
    relatif: np.ndarray
    rue: np.ndarray
    rue_analytic: np.ndarray
    lees: np.ndarray
    lees_pure_loss: np.ndarray
    lees_threshold: np.ndarray
    rows: list[dict[str, Any]]
    curvature: dict[str, Any]


def compare_backends(main: TrainedModel, picks: tuple[torch.Tensor, torch.Tensor], test: PhaseDataset,
                     test_ood: PhaseDataset, cfg: DemoConfig) -> MethodResults:
    """All four methods with the dense oracle and with the matrix-free backends, side by side."""
    obj = main.build_objective(cfg.progress)
    Xp, yp = picks
    Xt, _ = main.tensors(test)
    Xo, _ = main.tensors(test_ood)
    rows: list[dict[str, Any]] = []
    exact_out: dict[str, np.ndarray] = {}
    t: dict[str, float] = {}

    def row(method: str, backend: str, key: str, values: np.ndarray | None, **extra: Any) -> None:
        entry: dict[str, Any] = {"method": method, "backend": backend, "seconds": t[key]}
        if values is not None:
            if backend == "dense":
                exact_out[method] = values
            else:
                entry.update(agreement(exact_out[method], values))
        rows.append({**entry, **extra})

    # exact oracle
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    with timed(t, "fit/dense", log=True):
        exact.fit()
    row("fit", "dense", "fit/dense", None, damping=exact.damping, hvps=exact.operator.num_hvps)
    # matrix-free: CG inverse, Lanczos eigenpairs, at the exact δ so that the table compares
    # solvers, not dampings (the side experiments choose δ matrix-free, with ARPACK)
    free = matrix_free_toolbox(obj, cfg, damping=exact.damping)
    with timed(t, "fit/cg+lanczos", log=True):
        free.fit()
    row("fit", f"cg + lanczos (m = {LEES_M})", "fit/cg+lanczos", None, hvps=free.operator.num_hvps)
    hvps_before_lissa = free.operator.num_hvps
    lissa = Toolbox(obj, damping=free.damping, eigen=free.eigen, cache_graphs=True, operator=free.operator,
                    inverse=LiSSACurvature(deflate=10, target=1e-4, batch_size=len(main.X), seed=cfg.seed,
                                           progress=False, warn_residual=None, lanczos_tol=1e-12))
    with timed(t, "fit/lissa", log=True):
        lissa.fit()
    row("fit", "lissa (deflate 10, full batch)", "fit/lissa", None, hvps=lissa.operator.num_hvps - hvps_before_lissa)

    calls = [
        ("influence", "dense", lambda: exact.influence(Xp, yp)),
        ("influence", "cg", lambda: free.influence(Xp, yp)),
        ("influence", "lissa", lambda: lissa.influence(Xp, yp)),
        ("relatif", "dense", lambda: exact.relatif(Xp, yp)),
        ("relatif", "cg + kfac normalizer", lambda: free.relatif(Xp, yp, normalizer="kfac")),
        ("relatif", "cg + ekfac normalizer", lambda: free.relatif(Xp, yp, normalizer="ekfac")),
        ("rue_analytic", "dense", lambda: exact.rue(Xt, method="analytic", labels="predicted")),
        ("rue_bootstrap", "dense", lambda: exact.rue(Xt, n_bootstrap=50, seed=cfg.seed, labels="predicted")),
        ("rue_bootstrap", "cg", lambda: free.rue(Xt, n_bootstrap=50, seed=cfg.seed, labels="predicted")),
        ("lees", "dense", lambda: exact.extrapolation_score(Xo, m=LEES_M)),
        ("lees", "lanczos", lambda: free.extrapolation_score(Xo, m=LEES_M)),
    ]
    lees_m: dict[str, int] = {}
    for method, backend, call in calls:
        key = f"{method}/{backend}"
        with timed(t, key, log=True):
            values = to_numpy(call())
        extra = {}
        if method == "lees":
            lees_m[backend] = (exact if backend == "dense" else free).last_m
            extra["m"] = lees_m[backend]
        row(method, backend, key, values, **extra)

    # LEES of the pure loss gradient (without wd·θ̃, which every test gradient shares), and with
    # m from the threshold rule (eigenvalues > 0.1 removed, at least 2)
    lees_pure_loss = to_numpy(exact.extrapolation_score(Xo, m=LEES_M, test_loss="loss"))
    lees_threshold = to_numpy(exact.extrapolation_score(Xo, m=None, threshold=0.1))
    lees_m["dense, threshold 0.1"] = exact.last_m
    curvature = {"damping": exact.damping, "min_eigenvalue": exact.eigen.min_eigenvalue(),
                 "top_eigenvalues": to_numpy(exact.eigen.eigh(5)[0]).tolist(), "lees_m": lees_m,
                 "dense": dict(exact.diagnostics["inverse"]), "cg": dict(free.diagnostics["inverse"]),
                 "lanczos": dict(free.diagnostics["eigen"]), "lissa": dict(lissa.diagnostics["inverse"])}
    return MethodResults(exact_out["influence"], exact_out["relatif"], exact_out["rue_bootstrap"],
                         exact_out["rue_analytic"], exact_out["lees"], lees_pure_loss, lees_threshold, rows,
                         jsonable(curvature))
