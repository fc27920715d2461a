"""A low-rank-plus-damping inverse from the top-m eigenpairs, and the deflation step it shares
with LiSSA.

With the top eigenpairs (Λ_m, V_m) of C, a right-hand side splits into its part on span(V_m),
which is solved exactly, and the rest:

.. math::

    (C + δI)^{-1} v = V_m\\,\\mathrm{diag}\\big(1/(λ_i + δ)\\big)\\,V_m^T v + (C + δI)^{-1} v_⊥,
    \\qquad v_⊥ = (I − V_m V_m^T)\\, v .

The low-rank backend treats the unresolved spectrum as 0, (C + δI)⁻¹ v_⊥ ≈ v_⊥ / δ: exact on
span(V_m), and for the flat directions. LiSSA instead runs its recursion on v_⊥.
Cost per solve: two (M × m) products with k columns; memory: the m eigenvectors.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import IndefiniteDampingError, InputError
from ..operators import CurvatureOperator
from ..validation import check_bool
from .base import State
from .lanczos import LanczosCurvature, smallest_eigenvalue


def deflate(values: Tensor, vectors: Tensor, V: Tensor, damping: float, where: str) -> tuple[Tensor, Tensor]:
    """(V_m diag(1/(λ_i + δ)) V_mᵀ V, (I − V_m V_mᵀ) V): the exact solve on the span of the
    eigenvectors ``vectors (M, m)`` and the part of ``V (M, k)`` left outside it. Raises
    :class:`IndefiniteDampingError` when some λ_i + δ ≤ 0."""
    if (values + damping <= 0).any():
        raise IndefiniteDampingError(float(values.min()), damping, where=where, evidence="estimate")
    coeff = vectors.T @ V
    return vectors @ (coeff / (values + damping).unsqueeze(1)), V - vectors @ coeff


class LowRankCurvature(LanczosCurvature):
    """(C + δI)⁻¹ ≈ V_m diag(1/(λ_i + δ)) V_mᵀ + (I − V_m V_mᵀ)/δ from Lanczos's top-m eigenpairs.

    The formula treats the spectrum outside span(V_m) as 0, so it cannot see negative curvature
    there; with ``check_curvature`` (default) ``fit`` also estimates λ_min by a short Lanczos run
    on −C and ``solve`` refuses a damping with λ̂_min + δ ≤ 0 (the Ritz value λ̂_min is an upper
    bound of λ_min, so a refusal is never wrong; a λ_min it misses is not caught).
    Other parameters as :class:`LanczosCurvature`.
    """

    name = "lowrank"
    roles = frozenset({"inverse", "eigen"})

    def __init__(self, m: int = 20, tol: float = 1e-10, max_iter: int | None = None, seed: int = 0,
                 method: str = "torch", basis_size: int | None = None, check_curvature: bool = True) -> None:
        super().__init__(m=m, tol=tol, max_iter=max_iter, seed=seed, method=method, basis_size=basis_size)
        check_bool("check_curvature", check_curvature, where=self.name)
        self.check_curvature = check_curvature
        self.lambda_min = float("nan")

    def fit(self, operator: CurvatureOperator) -> LowRankCurvature:
        super().fit(operator)
        if self.check_curvature:
            M = operator.shape[0]
            self.lambda_min, _ = smallest_eigenvalue(operator, tol=1e-3, max_iter=min(M, 60), seed=self.seed + 2)
            self.diagnostics["lambda_min_estimate"] = self.lambda_min
        return self

    def state_dict(self) -> State:
        return {**super().state_dict(), "lambda_min": self.lambda_min}

    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        super().load_state_dict(state, operator)
        self.lambda_min = float(state["lambda_min"])

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        M = operator.shape[0]
        return {**super().memory_estimate(operator, columns), "solve_work": 2 * M * columns * operator.dtype.itemsize}

    def solve(self, V: Tensor, damping: float) -> Tensor:
        if damping <= 0:
            raise InputError("the low-rank inverse needs damping δ > 0 (it treats the unresolved spectrum as 0).")
        if self.lambda_min + damping <= 0:
            raise IndefiniteDampingError(self.lambda_min, damping, where=self.name, evidence="estimate")
        values, vectors = self.eigh(self.m if self.values is None else self.values.numel())
        on_span, rest = deflate(values, vectors, V, damping, where=self.name)
        return on_span + rest / damping
