"""Conjugate gradients on C_δ = C + δI with exact full-data products, many right-hand sides at once.

For each column b of B the iteration (optionally preconditioned, z = P r)

.. math::

    α = \\frac{r^T z}{p^T C_δ p}, \\quad x ← x + αp, \\quad r ← r − α C_δ p, \\quad
    β = \\frac{r_+^T z_+}{r^T z}, \\quad p ← z_+ + βp

runs for all unconverged columns of a block together, so each iteration costs one batched
product (``matmat``) on the block. CG needs C_δ positive definite: a direction with
pᵀC_δp ≤ 0 is negative curvature, and the solver stops with an
:class:`~scalable_hbt.errors.IndefiniteDampingError` that reports the Rayleigh quotient
pᵀCp/pᵀp it found — an upper bound on λ_min(C), not λ_min itself.

Cost: one product with the block per iteration; about (√κ/2)·ln(2/rtol) iterations for
condition number κ of C_δ (fewer with clustered eigenvalues). Memory: seven (M, block) arrays.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import IndefiniteDampingError, InputError, SolverDivergenceError
from ..operators import CurvatureOperator, LinearOperator
from ..validation import check_integer, check_number
from .base import CurvatureBackend, State

Preconditioner = Callable[[Tensor, float], Tensor]


def conjugate_gradients(operator: LinearOperator, B: Tensor, shift: float, *, rtol: float, max_iter: int,
                        precondition: Callable[[Tensor], Tensor] | None = None,
                        where: str = "cg") -> tuple[Tensor, dict[str, Any]]:
    """X ≈ (A + shift·I)⁻¹ B for the columns of ``B (M, k)`` together, one ``operator.matmat``
    per iteration on the unconverged columns.

    Returns X and ``{"iterations", "max_relative_residual", "converged"}``; raises
    :class:`IndefiniteDampingError` (``evidence="bound"``) on a direction of non-positive curvature,
    :class:`SolverDivergenceError` when a product is not finite (it would otherwise end the
    column as if converged).
    """
    X = torch.zeros_like(B)
    R = B.clone()
    b_norm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    Z = R if precondition is None else precondition(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    del Z
    active = R.norm(dim=0) > rtol * b_norm
    it = 0
    while active.any() and it < max_iter:
        idx = active.nonzero().flatten()
        Pa = P[:, idx]
        AP = operator.matmat(Pa).add_(Pa, alpha=shift)
        curvature = (Pa * AP).sum(0)
        if not torch.isfinite(curvature).all():
            j = int((~torch.isfinite(curvature)).nonzero()[0])
            raise SolverDivergenceError(
                f"{where}: the curvature product of column {int(idx[j])} is not finite (inf or NaN) at iteration "
                f"{it + 1}: the products overflow (half-precision compute_dtype?) or the model produces non-finite "
                "values; use compute_dtype=torch.bfloat16 or float32, or check the model.")
        bad = curvature <= 0
        if bad.any():
            j = int(bad.nonzero()[0])
            rayleigh = (curvature[j] / Pa[:, j].square().sum()).item() - shift
            raise IndefiniteDampingError(rayleigh, shift, where=f"{where} (iteration {it + 1}, pᵀH_δp ≤ 0)",
                                         evidence="bound")
        alpha = rz[idx] / curvature
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * AP
        del AP
        Za = R[:, idx] if precondition is None else precondition(R[:, idx])
        rz_new = (R[:, idx] * Za).sum(0)
        P[:, idx] = Za + (rz_new / rz[idx]) * Pa
        rz[idx] = rz_new
        active[idx] = R[:, idx].norm(dim=0) > rtol * b_norm[idx]
        it += 1
    info = {"iterations": it, "max_relative_residual": (R.norm(dim=0) / b_norm).max().item(),
            "converged": not bool(active.any())}
    return X, info


class CGCurvature(CurvatureBackend):
    """Batched (preconditioned) conjugate gradients for (C + δI)⁻¹ V.

    Parameters
    ----------
    rtol:
        Stop a column when ‖r‖ ≤ rtol·‖b‖.
    max_iter:
        Iterations at most (default 10·M capped at 1000); not converging is reported in
        ``diagnostics`` and warned, never silent.
    preconditioner:
        A curvature backend whose ``solve`` approximates (C + δI)⁻¹ (e.g. K-FAC; fitted on the
        same operator if it is not yet), or a function ``P(R, δ) ≈ (C + δI)⁻¹ R`` for ``R (M, k)``.
    """

    name = "cg"
    roles = frozenset({"inverse"})
    collective_solve = True

    def __init__(self, rtol: float = 1e-10, max_iter: int | None = None,
                 preconditioner: Preconditioner | CurvatureBackend | None = None) -> None:
        super().__init__()
        check_number("rtol", rtol, high=1, strict=True, where="cg")
        check_integer("max_iter", max_iter, 1, allow_none=True, where="cg")
        self.rtol, self.max_iter = float(rtol), max_iter
        self.preconditioner = preconditioner

    def fit_settings(self) -> dict[str, Any]:
        return {"preconditioner": self.preconditioner}  # rtol and max_iter are read by solve only

    def fit(self, operator: CurvatureOperator) -> CGCurvature:
        if isinstance(self.preconditioner, CurvatureBackend) and not self.preconditioner.fitted:
            self.preconditioner.fit(operator)
        self._mark_fitted(operator)
        return self

    def state_dict(self) -> State:
        pre = self.preconditioner
        if isinstance(pre, CurvatureBackend):
            return {"preconditioner": pre.state_dict()}
        return {"preconditioner": None}

    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        pre = self.preconditioner
        if (state["preconditioner"] is None) != (not isinstance(pre, CurvatureBackend)):
            raise ValueError("preconditioner presence differs")
        if isinstance(pre, CurvatureBackend):
            pre.load_state_dict(state["preconditioner"], operator)
        self._mark_fitted(operator)

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        M, itemsize = operator.shape[0], operator.dtype.itemsize
        out = {"cg_work": 7 * min(columns, operator.max_vectors) * M * itemsize}
        if isinstance(self.preconditioner, CurvatureBackend):
            out.update({f"preconditioner_{k}": v
                        for k, v in self.preconditioner.memory_estimate(operator, columns).items()})
        return out

    def _precondition(self, damping: float) -> Callable[[Tensor], Tensor] | None:
        pre = self.preconditioner
        if pre is None:
            return None
        if isinstance(pre, CurvatureBackend):
            return lambda R: pre.solve(R, damping)
        return lambda R: pre(R, damping)

    def solve(self, V: Tensor, damping: float) -> Tensor:
        """X ≈ (C + δI)⁻¹ V for ``V`` of shape ``(M, k)``. The columns are solved in blocks of
        the operator's ``max_vectors`` (each block's products are one batched pass), so the
        solver holds about seven (M, max_vectors) arrays whatever k is."""
        C = self.operator
        M = C.shape[0]
        if V.ndim != 2 or V.shape[0] != M:
            raise InputError(f"expected right-hand sides of shape (M, k) with M = {M}; got {tuple(V.shape)}.")
        t0, hvps0 = time.perf_counter(), C.num_hvps
        max_iter = self.max_iter or min(10 * M, 1000)
        precondition = self._precondition(damping)
        X = torch.empty_like(V)
        iterations, residual, converged = 0, 0.0, True
        for block in torch.arange(V.shape[1], device=V.device).split(C.max_vectors):
            X[:, block], info = conjugate_gradients(C, V[:, block], damping, rtol=self.rtol, max_iter=max_iter,
                                                    precondition=precondition)
            iterations = max(iterations, info["iterations"])
            residual = max(residual, info["max_relative_residual"])
            converged = converged and info["converged"]
        self.diagnostics = {"iterations": iterations, "hvps": C.num_hvps - hvps0, "max_relative_residual": residual,
                            "converged": converged, "seconds": time.perf_counter() - t0}
        if not converged:
            warnings.warn(f"cg did not converge in {max_iter} iterations: relative residual {residual:.2e} > "
                          f"rtol = {self.rtol:.1e}; raise max_iter, add a preconditioner or increase the damping.",
                          RuntimeWarning, stacklevel=2)
        return X
