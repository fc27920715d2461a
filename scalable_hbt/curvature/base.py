"""The curvature-backend interface every method is written against.

A backend approximates (or computes exactly) the damped inverse and/or the top of the
spectrum of H = ∇²L(θ̃):

* ``solve(V, δ)`` ≈ (H + δI)⁻¹ V for ``V`` of shape ``(M, k)``;
* ``eigh(m)`` → the m eigenpairs of H with the algebraically largest eigenvalues,
  in descending order: values ``(m,)`` and orthonormal vectors ``(M, m)``;
* ``inverse_norms(G, δ)`` → ‖(H + δI)⁻¹ g_r‖ for the rows g_r of ``G (c, M)`` (the RelatIF
  normaliser; backends with structure, such as K-FAC, override it).

Methods (influence, RelatIF, RUE, LEES) only ever call these, so exact-versus-approximate
is a choice of backend, never a second implementation of a method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from ..errors import InputError
from ..hessian import HessianOperator


class UnsupportedOperation(InputError):
    """The backend does not provide the requested operation (e.g. ``eigh`` of an inverse-only backend)."""


class CurvatureBackend(ABC):
    """Base class of curvature backends. Subclasses set ``name`` and implement ``fit``
    plus at least one of ``solve`` and ``eigh``.

    Attributes
    ----------
    diagnostics:
        What the backend did (HVPs used, iterations, residuals, timings), for reports.
    """

    name: str = "abstract"
    #: Whether ``solve`` applies full-data Hessian products. Under ``torch.distributed`` those
    #: are collective operations, so every rank must call ``solve`` with the same columns.
    collective_solve: bool = False

    def __init__(self) -> None:
        self.diagnostics: dict[str, Any] = {}
        self._hessian: HessianOperator | None = None

    @property
    def hessian(self) -> HessianOperator:
        if self._hessian is None:
            raise InputError(f"the {self.name!r} backend is not fitted; call fit(hessian) first.")
        return self._hessian

    @property
    def fitted(self) -> bool:
        return self._hessian is not None

    @abstractmethod
    def fit(self, hessian: HessianOperator) -> CurvatureBackend:
        """Do the one-off curvature computation for ``hessian``; return ``self``."""

    def solve(self, V: Tensor, damping: float) -> Tensor:
        """(H + δI)⁻¹ V for ``V`` of shape ``(M, k)``."""
        raise UnsupportedOperation(
            f"the {self.name!r} backend provides no inverse; choose inverse='dense' (small models) "
            "or a matrix-free inverse backend."
        )

    def eigh(self, m: int) -> tuple[Tensor, Tensor]:
        """Top-m eigenpairs of H (algebraically largest first): values ``(m,)``, vectors ``(M, m)``."""
        raise UnsupportedOperation(
            f"the {self.name!r} backend provides no eigenpairs; choose eigen='dense' (small models) "
            "or a matrix-free eigen backend."
        )

    def inverse_norms(self, G: Tensor, damping: float) -> Tensor:
        """‖(H + δI)⁻¹ g_r‖₂ for each row g_r of ``G (c, M)``; shape ``(c,)``."""
        return self.solve(G.T, damping).norm(dim=0)

    def min_eigenvalue(self) -> float | None:
        """The most negative eigenvalue of H when the backend knows it exactly, else ``None``."""
        return None

    @property
    def max_rank(self) -> int:
        """The largest m that ``eigh`` accepts."""
        return self.hessian.shape[0]

    def _check_m(self, m: int) -> None:
        if not 0 <= m <= self.max_rank:
            raise InputError(f"m must lie in [0, {self.max_rank}] for the {self.name!r} backend; got {m}.")
