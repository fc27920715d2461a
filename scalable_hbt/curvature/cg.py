"""Conjugate gradients on H_δ = H + δI with exact full-data HVPs, many right-hand sides at once.

For each column b of B the iteration (optionally preconditioned, z = P r)

.. math::

    α = \\frac{r^T z}{p^T H_δ p}, \\quad x ← x + αp, \\quad r ← r − α H_δ p, \\quad
    β = \\frac{r_+^T z_+}{r^T z}, \\quad p ← z_+ + βp

runs for all unconverged columns of a block together (blocks of the operator's
``max_vectors`` columns), so each iteration costs one batched HVP pass.
CG needs H_δ positive definite: a direction with pᵀH_δp ≤ 0 is negative curvature, and the
solver stops with an :class:`IndefiniteDampingError` naming the Rayleigh quotient found.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import IndefiniteDampingError, InputError
from ..hessian import HessianOperator
from .base import CurvatureBackend

Preconditioner = Callable[[Tensor, float], Tensor]


class CGCurvature(CurvatureBackend):
    """Batched (preconditioned) conjugate gradients for (H + δI)⁻¹ V.

    Parameters
    ----------
    rtol:
        Stop a column when ‖r‖ ≤ rtol·‖b‖.
    max_iter:
        Iterations at most (default 10·M capped at 1000); not converging is reported in
        ``diagnostics`` and warned, never silent.
    preconditioner:
        ``P(R, δ) ≈ (H + δI)⁻¹ R`` for ``R (M, k)``, e.g. a fitted K-FAC backend's ``solve``.
    """

    name = "cg"
    collective_solve = True

    def __init__(self, rtol: float = 1e-10, max_iter: int | None = None,
                 preconditioner: Preconditioner | CurvatureBackend | None = None) -> None:
        super().__init__()
        self.rtol, self.max_iter = rtol, max_iter
        self.preconditioner = preconditioner

    def fit(self, hessian: HessianOperator) -> CGCurvature:
        self._hessian = hessian
        if isinstance(self.preconditioner, CurvatureBackend) and not self.preconditioner.fitted:
            self.preconditioner.fit(hessian)
        return self

    def _precondition(self, R: Tensor, damping: float) -> Tensor:
        if self.preconditioner is None:
            return R
        if isinstance(self.preconditioner, CurvatureBackend):
            return self.preconditioner.solve(R, damping)
        return self.preconditioner(R, damping)

    def solve(self, V: Tensor, damping: float) -> Tensor:
        """X ≈ (H + δI)⁻¹ V for ``V`` of shape ``(M, k)``. The columns are solved in blocks of
        the operator's ``max_vectors`` (each block's HVPs are one batched pass), so the solver
        holds about seven (M, max_vectors) arrays whatever k is."""
        H = self.hessian
        M = H.shape[0]
        if V.ndim != 2 or V.shape[0] != M:
            raise InputError(f"expected right-hand sides of shape (M, k) with M = {M}; got {tuple(V.shape)}.")
        t0, hvps0 = time.perf_counter(), H.num_hvps
        max_iter = self.max_iter or min(10 * M, 1000)
        X = torch.empty_like(V)
        iterations, residual, converged = 0, 0.0, True
        for block in torch.arange(V.shape[1], device=V.device).split(H.max_vectors):
            X[:, block], its, res, done = self._solve_block(V[:, block], damping, max_iter)
            iterations, residual, converged = max(iterations, its), max(residual, res), converged and done
        self.diagnostics = {"iterations": iterations, "hvps": H.num_hvps - hvps0, "max_relative_residual": residual,
                            "converged": converged, "seconds": time.perf_counter() - t0}
        if not converged:
            warnings.warn(f"cg did not converge in {max_iter} iterations: relative residual {residual:.2e} > "
                          f"rtol = {self.rtol:.1e}; raise max_iter, add a preconditioner or increase the damping.",
                          RuntimeWarning, stacklevel=2)
        return X

    def _solve_block(self, V: Tensor, damping: float, max_iter: int) -> tuple[Tensor, int, float, bool]:
        """CG on the columns of ``V`` together; returns X, iterations, the largest relative
        residual and whether every column converged."""
        H = self.hessian
        X = torch.zeros_like(V)
        R = V.clone()
        b_norm = V.norm(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
        Z = self._precondition(R, damping)
        P = Z.clone()
        rz = (R * Z).sum(0)
        del Z
        active = R.norm(dim=0) > self.rtol * b_norm
        it = 0
        while active.any() and it < max_iter:
            idx = active.nonzero().flatten()
            Pa = P[:, idx]
            HP = H.matmat(Pa).add_(Pa, alpha=damping)
            curvature = (Pa * HP).sum(0)
            bad = curvature <= 0
            if bad.any():
                j = int(bad.nonzero()[0])
                rayleigh = (curvature[j] / Pa[:, j].square().sum()).item() - damping
                raise IndefiniteDampingError(rayleigh, damping, where=f"cg (iteration {it + 1}, pᵀH_δp ≤ 0)")
            alpha = rz[idx] / curvature
            X[:, idx] += alpha * Pa
            R[:, idx] -= alpha * HP
            del HP
            Za = self._precondition(R[:, idx], damping)
            rz_new = (R[:, idx] * Za).sum(0)
            P[:, idx] = Za + (rz_new / rz[idx]) * Pa
            rz[idx] = rz_new
            active[idx] = R[:, idx].norm(dim=0) > self.rtol * b_norm[idx]
            it += 1
        return X, it, (R.norm(dim=0) / b_norm).max().item(), not bool(active.any())
