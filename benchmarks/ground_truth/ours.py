"""This project's backends as ``Attribution``s, and their RUE and LEES values, on one trained model.

Every row is one ``scalable_hbt.Toolbox`` built on the workload's ``Objective`` with the same
damping δ; its cost (Toolbox construction, fit and the influence of all T test points, with
``test_loss="loss"``: the quantity the retrains measure) is timed in this process, in seconds and
in full-data gradients, with the peak memory and the HVPs the operator counted.

Backends (budgets from ``Budget``): ``dense`` (only where M ≤ ``DENSE_MAX``), ``cg`` on the
Hessian and on the GGN, ``lowrank`` (top-m Lanczos eigenpairs + δ on the rest: Arnoldi-style),
``lissa`` (mini-batches of n/10 when n ≥ 1000, full batch otherwise; 10 deflated eigenpairs),
``kfac`` and ``ekfac`` (both approximate the GGN).

The damping, ``choose_damping``: δ = max(−λ_min(H), 0) + 10⁻²·λ_max(H), both by Lanczos on the
exact Hessian, so that H + δI is positive definite and every backend's problem has a condition
number ≤ ~10² (CG then converges in tens of iterations, as the quick budget needs: its cost is
iterations × T HVPs). kronfluence's default, 0.1 × the mean eigenvalue of its factors, is of the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scalable_hbt import Objective, Toolbox
from scalable_hbt.curvature import LanczosCurvature, smallest_eigenvalue
from scalable_hbt.operators import HessianOperator

from .measure import measured
from .workload import Attribution, Workload

DENSE_MAX = 1000
"""Largest M for the dense oracle here: its fit is M HVPs (≈ M gradients), which the quick budget affords
only for the paper's CNN."""
DENSE_LABEL = "dense (Hessian)"
RUE_BOOTSTRAP = 50
LANCZOS_M = 20


@dataclass(frozen=True)
class Budget:
    """Iteration budgets of the iterative backends (quick vs full)."""

    cg_rtol: float = 1e-4
    cg_max_iter: int = 100
    lowrank_m: int = 20
    lissa_depth: int = 200

    @classmethod
    def for_size(cls, size: str) -> Budget:
        return cls() if size != "full" else cls(cg_rtol=1e-6, cg_max_iter=300, lowrank_m=50, lissa_depth=1000)


def build_objective(workload: Workload, model: nn.Module, batch_size: int = 512) -> Objective:
    """The workload's ``Objective`` on its full training set, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    return Objective(model, workload.loss, (workload.train_X, workload.train_y), weight_decay=workload.weight_decay,
                     params=workload.params, batch_size=batch_size, dtype=dtype, progress=False)


def choose_damping(objective: Objective, max_iter: int = 60) -> dict[str, float]:
    """δ = max(−λ_min, 0) + 10⁻²·λ_max of the exact Hessian (see the module docstring), each
    eigenvalue from at most ``max_iter`` Lanczos steps (the λ_min Ritz value is an upper bound; a
    backend that then meets negative curvature says so in its row)."""
    operator = HessianOperator(objective)
    top = LanczosCurvature(m=1, tol=1e-3, max_iter=max_iter).fit(operator)
    lam_max = float(top.eigh(1)[0][0])
    lam_min, _ = smallest_eigenvalue(operator, tol=1e-2, max_iter=max_iter)
    return {"damping": max(-lam_min, 0.0) + 1e-2 * lam_max, "lambda_min": lam_min, "lambda_max": lam_max,
            "hvps": operator.num_hvps}


@dataclass(frozen=True)
class Backend:
    """One row: its name in the tables, the Toolbox settings behind it, and its cost tier: 0 a
    few dozen HVPs or none (K-FAC, EK-FAC, low rank), 1 iterations × T HVPs (CG), 2 hundreds of
    HVPs or more whatever the accuracy asked (dense: M; LiSSA: depth × T)."""

    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    tier: int = 0


def backends(objective: Objective, budget: Budget) -> Iterator[Backend]:
    """The rows for this objective (dense only where it fits), cheapest tier first."""
    n, M = objective.n, objective.num_params
    cg = {"inverse": "cg", "inverse_options": {"rtol": budget.cg_rtol, "max_iter": budget.cg_max_iter}}
    m = min(budget.lowrank_m, M // 2)
    yield Backend("kfac (GGN)", {"inverse": "kfac"})
    yield Backend("ekfac (GGN)", {"inverse": "ekfac"})
    yield Backend(f"lowrank m={m}", {"inverse": "lowrank", "inverse_options": {"m": m, "tol": 1e-4}})
    yield Backend("cg (GGN)", {**cg, "curvature": "ggn"}, tier=1)
    yield Backend("cg (Hessian)", cg, tier=1)
    if M <= DENSE_MAX:  # one eigendecomposition serves the inverse and LEES (``lees_dense``)
        yield Backend(DENSE_LABEL, {"inverse": "dense", "eigen": "dense"}, tier=2)
    batch = n // 10 if n >= 1000 else None
    yield Backend("lissa" + (f" (b={batch})" if batch else " (full batch)"),
                  {"inverse": "lissa", "inverse_options": {"batch_size": batch, "depth": budget.lissa_depth,
                                                           "deflate": min(10, M // 2), "warn_residual": None}},
                  tier=2)


def toolbox(objective: Objective, backend: Backend, damping: float) -> Toolbox:
    return Toolbox(objective, damping=damping, max_vectors=128, **{"eigen": None, **backend.settings})


def _notes(tb: Toolbox) -> str:
    inv = tb.diagnostics["inverse"]
    keep = {k: inv[k] for k in ("iterations", "converged", "max_relative_residual", "depth", "residual") if k in inv}
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in keep.items())


def attribute(workload: Workload, objective: Objective, backend: Backend, damping: float,
              gradient_seconds: float) -> tuple[Attribution, Toolbox]:
    """The influence matrix (T, n) of one backend, timed; the fitted Toolbox comes back for RUE."""
    def compute() -> tuple[Tensor, Toolbox]:
        tb = toolbox(objective, backend, damping)
        return tb.influence(workload.test_X, workload.test_y, test_loss="loss"), tb

    (scores, tb), seconds, peak = measured(compute)
    return Attribution(method=f"ours: {backend.label}", scores=scores.double().numpy(), seconds=seconds,
                       gradients=seconds / gradient_seconds, peak_mib=peak, hvps=float(tb.operator.num_hvps),
                       notes=_notes(tb)), tb


def rue(tb: Toolbox, workload: Workload) -> np.ndarray:
    """Bootstrap RUE of every test point's loss (B = ``RUE_BOOTSTRAP`` draws, δ' = δ + 1), ``(T,)``."""
    return tb.rue(workload.test_X, workload.test_y, n_bootstrap=RUE_BOOTSTRAP, seed=0, test_loss="loss").double().numpy()


def lees_dense(dense: Toolbox, inputs: Tensor) -> dict[str, tuple[np.ndarray, float, float]]:
    """LEES on ``inputs`` (predicted labels) from the exact spectrum, threshold τ = 0.1, of the dense
    influence row's fitted Toolbox (its eigendecomposition is LEES's, so no second dense fit; the
    seconds are the scoring's alone). Label → (scores, seconds, peak MiB)."""
    values, seconds, peak = measured(lambda: dense.extrapolation_score(inputs, threshold=0.1))
    return {"dense, τ = 0.1 (the influence row's fit)": (values.double().numpy(), seconds, peak)}


def lees_lanczos(objective: Objective, inputs: Tensor, damping: float) -> dict[str, tuple[np.ndarray, float, float]]:
    """LEES on ``inputs`` (predicted labels) from the top m = ``LANCZOS_M`` Lanczos eigenpairs of
    the Hessian (about 2m HVPs). Label → (scores, seconds, peak MiB)."""
    m = min(LANCZOS_M, objective.num_params // 2)

    def lanczos() -> Tensor:
        return Toolbox(objective, damping=damping, inverse="cg", eigen="lanczos",
                       eigen_options={"m": m, "tol": 1e-4}).extrapolation_score(inputs, m=m)
    values, seconds, peak = measured(lanczos)
    return {f"lanczos, m = {m}": (values.double().numpy(), seconds, peak)}
