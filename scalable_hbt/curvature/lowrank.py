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
from .lanczos import LanczosCurvature


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

    Knows only the top of the spectrum, so an indefinite C + δI is caught only where it shows
    there (λ_i + δ ≤ 0 for a computed λ_i); ``damping="auto"`` estimates λ_min separately.
    """

    name = "lowrank"
    roles = frozenset({"inverse", "eigen"})

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        M = operator.shape[0]
        return {**super().memory_estimate(operator, columns), "solve_work": 2 * M * columns * operator.dtype.itemsize}

    def solve(self, V: Tensor, damping: float) -> Tensor:
        if damping <= 0:
            raise InputError("the low-rank inverse needs damping δ > 0 (it treats the unresolved spectrum as 0).")
        values, vectors = self.eigh(self.m if self.values is None else self.values.numel())
        on_span, rest = deflate(values, vectors, V, damping, where=self.name)
        return on_span + rest / damping
