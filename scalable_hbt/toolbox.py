"""The :class:`Toolbox` facade: one curvature computation, four methods (DESIGN §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import methods
from .cache import CurvatureCache, fit_cached
from .curvature import CurvatureBackend, make_backend
from .data import DataLike
from .errors import IndefiniteDampingError, InputError
from .hessian import HessianOperator, HVPMode
from .objective import Labels, Objective, TestLoss

AUTO_DAMPING_MARGIN = 0.01


class Toolbox:
    """Influence, similarity, RelatIF, RUE and the LEES extrapolation score from one curvature fit.

    Parameters
    ----------
    objective:
        The trained model, loss, training data and weight decay.
    damping:
        δ in H_δ = H + δI, or ``"auto"``: δ = max(−λ_min, 0) + 0.01 (the paper's rule,
        λ_min from the dense spectrum or a Lanczos/ARPACK estimate); the chosen δ is in
        ``toolbox.damping`` and ``toolbox.diagnostics``. A δ that leaves H_δ indefinite is
        an :class:`~scalable_hbt.errors.IndefiniteDampingError` naming λ_min.
    inverse:
        Backend for H_δ⁻¹ (influence, similarity, RelatIF, RUE): a registered name or an
        instance.
    eigen:
        Backend for the top eigenpairs (LEES).
    rue_damping:
        δ' for RUE; default δ + 1 (the RUE authors want H_δ' with smallest eigenvalue ≈ 1).
    hvp_mode, max_vectors, cache_graphs:
        Passed to the :class:`HessianOperator` (``cache_graphs=True`` keeps the training
        chunks' gradient graphs between Hessian products: ≈ 1.8× faster iterative solvers on
        small networks, for the memory of those graphs).
    inverse_options, eigen_options:
        Keyword arguments for the backends' constructors.
    cache_dir:
        Folder of the on-disk curvature cache (safetensors + JSON manifest per backend,
        keyed by a fingerprint of parameters, data, loss, weight decay, damping and backend
        settings); ``None`` = no cache. A second ``fit`` with the same inputs loads instead of
        computing; a damaged entry is detected, announced and recomputed.
    """

    def __init__(self, objective: Objective, damping: float | str = 0.2, inverse: str | CurvatureBackend = "dense",
                 eigen: str | CurvatureBackend = "dense", *, rue_damping: float | None = None,
                 hvp_mode: HVPMode = "reverse-over-reverse", max_vectors: int = 32, cache_graphs: bool = False,
                 inverse_options: dict[str, Any] | None = None, eigen_options: dict[str, Any] | None = None,
                 cache_dir: str | Path | None = None) -> None:
        if not isinstance(objective, Objective):
            raise InputError(f"Toolbox needs an Objective; got {type(objective).__name__}.")
        if not (damping == "auto" or (isinstance(damping, (int, float)) and damping >= 0 and damping == damping)):
            raise InputError(f"damping must be a number ≥ 0 or 'auto'; got {damping!r}.")
        self.objective = objective
        self.hessian = HessianOperator(objective, mode=hvp_mode, max_vectors=max_vectors, cache_graphs=cache_graphs)
        self._requested_damping = damping
        self._rue_damping = rue_damping
        self.inverse = make_backend(inverse, "inverse", inverse_options)
        same = (isinstance(inverse, str) and inverse == eigen and not inverse_options and not eigen_options)
        self.eigen = self.inverse if same else make_backend(eigen, "eigen", eigen_options)
        self._normalizers: dict[str, CurvatureBackend] = {}
        self._shifts: tuple[tuple[int, int, float], Tensor] | None = None  # RUE's last (key, Δθ (M, B))
        self._damping: float | None = None if damping == "auto" else float(damping)
        self.cache = None if cache_dir is None else CurvatureCache(cache_dir)

    # ------------------------------------------------------------------ fitting
    def fit(self) -> Toolbox:
        """Compute the curvature once (inverse and eigen backends) and settle the damping."""
        for backend in (self.inverse, self.eigen):  # the same object twice is fine: fitted → skipped
            fit_cached(backend, self.hessian, self.cache, self._cache_extra())
        lam_min = self._known_min_eigenvalue()
        if self._requested_damping == "auto":
            if lam_min is None:
                lam_min = self._estimate_min_eigenvalue()
            self._damping = max(-lam_min, 0.0) + AUTO_DAMPING_MARGIN
        elif lam_min is not None and lam_min + self._damping <= 0:  # type: ignore[operator]
            raise IndefiniteDampingError(lam_min, self._damping, where="Toolbox.fit")  # type: ignore[arg-type]
        return self

    def _cache_extra(self) -> dict[str, Any]:
        """Toolbox settings that enter the cache key besides the objective and the backend."""
        return {"damping": self._requested_damping, "hvp_mode": self.hessian.mode,
                "max_vectors": self.hessian.max_vectors}

    def _known_min_eigenvalue(self) -> float | None:
        for backend in (self.inverse, self.eigen):
            lam = backend.min_eigenvalue()
            if lam is not None:
                return lam
        return None

    def _estimate_min_eigenvalue(self) -> float:
        """λ_min(H) by ARPACK on the matrix-free operator (used when no backend knows it)."""
        from scipy.sparse.linalg import eigsh

        value = eigsh(self.hessian.to_scipy(), k=1, which="SA", tol=1e-6, return_eigenvectors=False)[0]
        return float(value)

    def _ensure_fitted(self) -> None:
        if self._damping is None or not (self.inverse.fitted and self.eigen.fitted):
            self.fit()

    @property
    def damping(self) -> float:
        """δ used for influence, similarity and RelatIF (fits first when ``damping='auto'``)."""
        self._ensure_fitted()
        return self._damping  # type: ignore[return-value]

    @property
    def rue_damping(self) -> float:
        """δ' used by RUE: δ + 1 unless given."""
        return self.damping + 1.0 if self._rue_damping is None else float(self._rue_damping)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """Damping, HVP count and each backend's own diagnostics."""
        return {"damping": self._damping, "hvps": self.hessian.num_hvps, "hvp_mode": self.hessian.mode,
                "inverse": {"name": self.inverse.name, **self.inverse.diagnostics},
                "eigen": {"name": self.eigen.name, **self.eigen.diagnostics}}

    def _normalizer(self, normalizer: str | CurvatureBackend | None) -> CurvatureBackend:
        if normalizer is None:
            return self.inverse
        if isinstance(normalizer, CurvatureBackend):
            backend = normalizer
        elif normalizer == self.inverse.name:
            return self.inverse
        else:
            backend = self._normalizers.get(normalizer) or make_backend(normalizer, "inverse")
            self._normalizers[normalizer] = backend
        fit_cached(backend, self.hessian, self.cache, self._cache_extra())
        return backend

    # ------------------------------------------------------------------ methods
    def influence(self, X_test: DataLike, y_test: Tensor | None = None, *, labels: Labels = "true",
                  test_loss: TestLoss = "objective") -> Tensor:
        """I(z_r, z_t) = (1/n) g_tᵀ H_δ⁻¹ g_r, shape ``(T, n)``; > 0 means z_r helps z_t."""
        self._ensure_fitted()
        return methods.influence(self.objective, self.inverse, self.damping, X_test, y_test,
                                 labels=labels, test_loss=test_loss)

    def similarity(self, X_test: DataLike, y_test: Tensor | None = None, *, labels: Labels = "true",
                   test_loss: TestLoss = "objective") -> Tensor:
        """S(z_r, z_t) = (g_tᵀ H_δ⁻¹ g_r)², shape ``(T, n)``."""
        self._ensure_fitted()
        return methods.similarity(self.objective, self.inverse, self.damping, X_test, y_test,
                                  labels=labels, test_loss=test_loss)

    def relatif(self, X_test: DataLike, y_test: Tensor | None = None, *,
                normalizer: str | CurvatureBackend | None = None, labels: Labels = "true",
                test_loss: TestLoss = "objective") -> Tensor:
        """I_R(z_r, z_t) = I(z_r, z_t) / ‖H_δ⁻¹ g_r‖, shape ``(T, n)``; the normaliser comes
        from ``normalizer`` (default: the Toolbox's inverse backend)."""
        self._ensure_fitted()
        return methods.relatif(self.objective, self.inverse, self.damping, X_test, y_test,
                               normalizer=self._normalizer(normalizer), labels=labels, test_loss=test_loss)

    def rue(self, X_test: DataLike, y_test: Tensor | None = None, *, n_bootstrap: int = 50,
            seed: int | torch.Generator = 0, method: str = "bootstrap", labels: Labels = "true",
            test_loss: TestLoss = "objective") -> Tensor:
        """RUE(z_t) = Var_b ℓ(z_t, θ̃ + Δθ_b) at δ' = δ + 1, shape ``(T,)``; ``method="analytic"``
        gives the closed form for the linearised loss."""
        self._ensure_fitted()
        shifts = None
        if method == "bootstrap" and not isinstance(seed, torch.Generator):
            shifts = self.bootstrap_shifts(n_bootstrap, seed)
        return methods.rue(self.objective, self.inverse, self.rue_damping, X_test, y_test,
                           n_bootstrap=n_bootstrap, seed=seed, method=method, labels=labels, test_loss=test_loss,
                           shifts=shifts)

    def bootstrap_shifts(self, n_bootstrap: int = 50, seed: int = 0) -> Tensor:
        """RUE's parameter shifts Δθ_b = −H_δ'⁻¹ (1/n) Σ_i (w_b,i − 1) g_i, shape ``(M, B)``.

        They do not depend on the test points, so the last set is kept (B·M numbers) and
        reused by every :meth:`rue` call with the same ``n_bootstrap``, ``seed`` and δ':
        RUE over many test chunks solves the B systems once."""
        self._ensure_fitted()
        key = (int(n_bootstrap), int(seed), self.rue_damping)
        if self._shifts is None or self._shifts[0] != key:
            self._shifts = None  # free the old set before the new one is computed
            weights = methods.bootstrap_weights(self.objective.n, n_bootstrap, seed)
            self._shifts = key, methods.bootstrap_shifts(self.objective, self.inverse, self.rue_damping, weights)
        return self._shifts[1]

    def extrapolation_score(self, X_test: DataLike, y_test: Tensor | None = None, *, labels: Labels = "predicted",
                            m: int | str | None = None, threshold: float | None = 0.1,
                            test_loss: TestLoss = "objective", m_max: int = 100) -> Tensor:
        """E_m(z_t) = ‖(I − V_m V_mᵀ) g_t‖, shape ``(T,)`` (the norm, as the reference code).

        m: an integer; ``"auto"`` (convergence rule); or ``None`` with the threshold rule
        (eigenvalues > ``threshold`` removed, never fewer than 2). The m used is in
        ``toolbox.last_m``.
        """
        self._ensure_fitted()
        scores, self.last_m = methods.extrapolation_score(
            self.objective, self.eigen, X_test, y_test, labels=labels, m=m, threshold=threshold,
            test_loss=test_loss, m_max=m_max)
        return scores
