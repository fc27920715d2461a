"""The curvature-backend interface every method is written against.

A backend approximates (or computes exactly) the damped inverse and/or the top of the
spectrum of a curvature operator C (the Hessian H, or the Gauss–Newton matrix):

* ``solve(V, δ)`` ≈ (C + δI)⁻¹ V for ``V`` of shape ``(M, k)``;
* ``eigh(m)`` → the m eigenpairs of C with the algebraically largest eigenvalues, in
  descending order: values ``(m,)`` and orthonormal vectors ``(M, m)``;
* ``inverse_norms(G, δ)`` → ‖(C + δI)⁻¹ g_r‖ for the rows g_r of ``G (c, M)`` (the RelatIF
  normalizer; backends with structure, such as K-FAC, override it).

So that no backend is silently uncached or mis-planned, each one also states what it keeps
after ``fit`` (``state_dict`` / ``load_state_dict``), which of its settings ``fit`` reads
(``fit_settings``, the part of the cache key that is the backend's) and how much memory it
needs (``memory_estimate``). Methods only ever call ``solve``, ``eigh`` and
``inverse_norms``, so exact-versus-approximate is a choice of backend, never a second
implementation of a method.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from ..errors import IndefiniteDampingError, InputError
from ..operators import CurvatureOperator

State = dict[str, Any]
"""A backend's fitted state: tensors and JSON-able values (nested dicts and lists allowed)."""


class UnsupportedOperation(InputError):
    """The backend does not provide the requested operation (e.g. ``eigh`` of an inverse-only backend)."""


class CurvatureBackend(ABC):
    """Base class of curvature backends.

    A subclass sets ``name`` and ``roles`` ({"inverse"}, {"eigen"} or both), implements
    ``fit`` and at least one of ``solve`` / ``eigh``, and the three bookkeeping methods
    ``state_dict``, ``load_state_dict`` and ``memory_estimate``. Registering it is one line in
    :mod:`scalable_hbt.curvature`.

    Attributes
    ----------
    diagnostics:
        What the backend did (HVPs used, iterations, residuals, timings), for reports.
    """

    name: ClassVar[str] = "abstract"
    #: What the backend can serve as: "inverse" (solve, inverse_norms) and/or "eigen" (eigh).
    roles: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``solve`` applies full-data products. Under ``torch.distributed`` those are
    #: collective operations, so every rank must call ``solve`` with the same columns.
    collective_solve: ClassVar[bool] = False

    def __init__(self) -> None:
        self.diagnostics: dict[str, Any] = {}
        self._operator: CurvatureOperator | None = None

    # ------------------------------------------------------------------ fitted state
    @property
    def operator(self) -> CurvatureOperator:
        """The curvature operator this backend was fitted on."""
        if self._operator is None:
            raise InputError(f"the {self.name!r} backend is not fitted; call fit(operator) first.")
        return self._operator

    @property
    def fitted(self) -> bool:
        return self._operator is not None

    @abstractmethod
    def fit(self, operator: CurvatureOperator) -> CurvatureBackend:
        """Do the one-off curvature computation for ``operator``; return ``self``."""

    @abstractmethod
    def state_dict(self) -> State:
        """What ``fit`` computed, as tensors and JSON-able values (what the cache stores)."""

    @abstractmethod
    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        """Restore a :meth:`state_dict` as the fit for ``operator``; raise ``ValueError`` when
        it does not fit this backend and operator (shapes, layers)."""

    @abstractmethod
    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        """Bytes, by part, the backend holds at its peak on ``operator`` (M parameters in its
        dtype) when solving ``columns`` right-hand sides at once; computes nothing."""

    def fit_settings(self) -> dict[str, Any]:
        """The settings ``fit`` reads (the backend's part of the cache key). By default every
        constructor argument, read back from the attribute of the same name; a backend whose
        ``fit`` reads fewer overrides this, so that changing a solve-only setting reuses the fit."""
        out = {}
        for pname, p in inspect.signature(type(self).__init__).parameters.items():
            if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or pname == "progress":
                continue
            out[pname] = getattr(self, pname)
        return out

    def _mark_fitted(self, operator: CurvatureOperator) -> None:
        self._operator = operator

    # ------------------------------------------------------------------ the operations methods call
    def solve(self, V: Tensor, damping: float) -> Tensor:
        """(C + δI)⁻¹ V for ``V`` of shape ``(M, k)``."""
        raise UnsupportedOperation(
            f"the {self.name!r} backend provides no inverse; choose inverse='dense' (small models) "
            "or a matrix-free inverse backend."
        )

    def eigh(self, m: int) -> tuple[Tensor, Tensor]:
        """Top-m eigenpairs of C (algebraically largest first): values ``(m,)``, vectors ``(M, m)``."""
        raise UnsupportedOperation(
            f"the {self.name!r} backend provides no eigenpairs; choose eigen='dense' (small models) "
            "or a matrix-free eigen backend."
        )

    def inverse_norms(self, G: Tensor, damping: float) -> Tensor:
        """‖(C + δI)⁻¹ g_r‖₂ for each row g_r of ``G (c, M)``; shape ``(c,)``."""
        return self.solve(G.T, damping).norm(dim=0)

    def inverse_quadratic(self, G: Tensor, damping: float) -> Tensor:
        """g_rᵀ (C + δI)⁻¹ g_r for each row g_r of ``G (c, M)``; shape ``(c,)`` (self-influence
        is this over n). Backends with a spectrum in hand override it without a solve."""
        return (G.T * self.solve(G.T, damping)).sum(dim=0)

    def accept_eigenpairs(self, eigen: CurvatureBackend) -> None:
        """Offered the Toolbox's eigen backend before fitting; a backend that can use top
        eigenpairs (LiSSA's deflation) keeps it instead of computing its own. Default: ignore it."""

    def min_eigenvalue(self) -> float | None:
        """The most negative eigenvalue of C when the backend knows it exactly, else ``None``."""
        return None

    def check_damping(self, damping: float) -> None:
        """Raise :class:`IndefiniteDampingError` when the backend knows λ_min and λ_min + δ ≤ 0."""
        lam = self.min_eigenvalue()
        if lam is not None and lam + damping <= 0:
            raise IndefiniteDampingError(lam, damping, where=f"{self.name} backend")

    @property
    def max_rank(self) -> int:
        """The largest m that ``eigh`` accepts."""
        return self.operator.shape[0]

    def _check_m(self, m: int) -> None:
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= self.max_rank:
            raise InputError(f"m must be an integer in [0, {self.max_rank}] for the {self.name!r} backend; got {m!r}.")


def expect_shape(t: Any, shape: tuple[int, ...], what: str) -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor of ``shape`` (a stored state that does not fit)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} has shape {got}, expected {tuple(shape)}")
