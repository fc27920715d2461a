"""The :class:`Toolbox` facade: one curvature computation, every method (docs/design.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cache import CurvatureCache, fit_or_load
from .config import CurvatureConfig
from .curvature import CurvatureBackend, make_backend, smallest_eigenvalue
from .data import DataLike
from .errors import DAMPING_MARGIN, IndefiniteDampingError, InputError
from .methods import METHODS, bootstrap_shifts, bootstrap_weights, inverse_gradient_norms
from .objective import Labels, Objective, TestLoss
from .operators import CurvatureOperator, GGNOperator, HessianOperator

AUTO_DAMPING_TOLERANCE = 1e-6
"""Relative Ritz tolerance of the Lanczos estimate of λ_min behind ``damping="auto"``."""


class Toolbox:
    """Influence, similarity, RelatIF, RUE and the LEES extrapolation score from one curvature fit.

    ``Toolbox(objective, config)`` takes a :class:`~scalable_hbt.config.CurvatureConfig`;
    ``Toolbox(objective, damping=..., inverse=..., ...)`` builds one from its fields (see there
    for every option and its default: δ ``"auto"``, ``inverse="cg"``, ``eigen="lanczos"``, the
    exact Hessian). ``cache_dir`` is a folder of the on-disk curvature cache (``None``: none):
    a second fit with the same objective and fit settings loads instead of computing; a damaged
    entry is announced and recomputed. ``operator`` shares another Toolbox's operator (and so
    its HVP accounting and graph cache) instead of building a new one; without it, a backend
    instance that is already fitted brings its operator along. Every fitted backend must have
    been fitted on this Toolbox's operator — one for another objective is refused.
    """

    def __init__(self, objective: Objective, config: CurvatureConfig | None = None, *,
                 cache_dir: str | Path | None = None, operator: CurvatureOperator | None = None,
                 **settings: Any) -> None:
        if not isinstance(objective, Objective):
            raise InputError(f"Toolbox needs an Objective; got {type(objective).__name__}.")
        if config is not None and settings:
            raise InputError(f"pass either a CurvatureConfig or keyword settings, not both (got {sorted(settings)}).")
        unknown = sorted(set(settings) - set(CurvatureConfig.field_names()))
        if unknown:
            raise InputError(f"Toolbox got unknown setting(s) {unknown}; known: {CurvatureConfig.field_names()}.")
        self.config = config if config is not None else CurvatureConfig(**settings)
        self.objective = objective
        if operator is None:
            operator = next((b.operator for b in (self.config.inverse, self.config.eigen)
                             if isinstance(b, CurvatureBackend) and b.fitted), None)
        if operator is not None:
            self._check_shared(operator)
        self.operator = operator if operator is not None else self._build_operator()
        cfg = self.config
        self.inverse = make_backend(cfg.inverse, "inverse", dict(cfg.inverse_options))
        same = isinstance(cfg.inverse, str) and cfg.inverse == cfg.eigen and cfg.inverse_options == cfg.eigen_options
        self.eigen: CurvatureBackend | None = None if cfg.eigen is None else \
            self.inverse if same else make_backend(cfg.eigen, "eigen", dict(cfg.eigen_options))
        if self.eigen is not None and self.eigen is not self.inverse:
            self.inverse.accept_eigenpairs(self.eigen)
        self.cache = None if cache_dir is None else CurvatureCache(cache_dir)
        self._damping: float | None = None if cfg.damping == "auto" else float(cfg.damping)
        self._normalizers: dict[str, CurvatureBackend] = {}
        self._inverse_norms: dict[tuple[int, float], Tensor] = {}
        self._shifts: tuple[tuple[int, int, float], Tensor] | None = None  # RUE's last (key, Δθ (M, B))
        self.last_info: dict[str, dict[str, Any]] = {}
        self.lambda_min_estimate: dict[str, Any] | None = None

    def _build_operator(self) -> CurvatureOperator:
        cfg = self.config
        if cfg.curvature == "ggn":
            return GGNOperator(self.objective, max_vectors=cfg.max_vectors, cache_graphs=cfg.cache_graphs)
        return HessianOperator(self.objective, mode=cfg.hvp_mode, max_vectors=cfg.max_vectors,
                               cache_graphs=cfg.cache_graphs)

    def _check_shared(self, operator: CurvatureOperator) -> None:
        if operator.objective is not self.objective:
            raise InputError("the shared operator (or the operator a fitted backend was fitted on) belongs to "
                             "another Objective; pass unfitted backends, or build the Toolbox on that Objective.")
        settings = operator.settings()
        if settings.get("curvature") != self.config.curvature or settings.get("hvp_mode", self.config.hvp_mode) != \
                self.config.hvp_mode or operator.max_vectors != self.config.max_vectors:
            raise InputError(f"the shared operator ({settings}, max_vectors {operator.max_vectors}) does not match "
                             f"this Toolbox's curvature {self.config.curvature!r}, hvp_mode {self.config.hvp_mode!r} "
                             f"and max_vectors {self.config.max_vectors}.")

    # ------------------------------------------------------------------ fitting
    def _fit_backend(self, backend: CurvatureBackend) -> None:
        if backend.fitted:
            if backend.operator is not self.operator:
                raise InputError(
                    f"the {backend.name!r} backend was fitted on another operator (another Objective or Toolbox); "
                    "pass an unfitted backend, or share that Toolbox's operator with Toolbox(..., operator=...).")
            return
        fit_or_load(backend, self.operator, self.cache)

    def fit(self) -> Toolbox:
        """Compute the curvature once (inverse and eigen backends) and settle the damping."""
        for backend in self._backends():  # the same object twice is fine: fitted → skipped
            self._fit_backend(backend)
        lam_min = self._known_min_eigenvalue()
        if self.config.damping == "auto":
            if lam_min is None:
                lam_min = self._estimate_min_eigenvalue()
            self._damping = max(-lam_min, 0.0) + DAMPING_MARGIN
        elif lam_min is not None and lam_min + self._damping <= 0:  # type: ignore[operator]
            raise IndefiniteDampingError(lam_min, self._damping, where="Toolbox.fit")  # type: ignore[arg-type]
        return self

    def _backends(self) -> list[CurvatureBackend]:
        return [self.inverse] if self.eigen is None else [self.inverse, self.eigen]

    def _known_min_eigenvalue(self) -> float | None:
        for backend in self._backends():
            lam = backend.min_eigenvalue()
            if lam is not None:
                return lam
        return None

    def _estimate_min_eigenvalue(self) -> float:
        """λ_min(C) by Lanczos on −C (used when no backend knows it exactly)."""
        value, info = smallest_eigenvalue(self.operator, tol=AUTO_DAMPING_TOLERANCE)
        self.lambda_min_estimate = {"value": value, **info}
        return value

    def _ensure_fitted(self) -> None:
        if self._damping is None or not all(backend.fitted for backend in self._backends()):
            self.fit()

    @property
    def damping(self) -> float:
        """δ used for influence, similarity and RelatIF (fits first when ``damping='auto'``)."""
        self._ensure_fitted()
        return self._damping  # type: ignore[return-value]

    @property
    def rue_damping(self) -> float:
        """δ' used by RUE: δ + 1 unless given."""
        return self.damping + 1.0 if self.config.rue_damping is None else float(self.config.rue_damping)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """Damping, curvature, HVP count and each backend's own diagnostics."""
        out = {"damping": self._damping, "curvature": self.operator.kind, "hvps": self.operator.num_hvps,
               **self.operator.settings(),
               "inverse": {"name": self.inverse.name, **self.inverse.diagnostics},
               "eigen": None if self.eigen is None else {"name": self.eigen.name, **self.eigen.diagnostics}}
        if self.lambda_min_estimate is not None:
            out["lambda_min_estimate"] = self.lambda_min_estimate
        return out

    # ------------------------------------------------------------------ what methods reuse
    def inverse_backend(self, name: str | CurvatureBackend | None) -> CurvatureBackend:
        """A fitted inverse backend for a method that names one (RelatIF's normalizer,
        self-influence): the Toolbox's own for ``None`` or its name, another backend by name
        (built and fitted once), or an instance (fitted here)."""
        self._ensure_fitted()
        if name is None or name == self.inverse.name or name is self.inverse:
            return self.inverse
        if isinstance(name, CurvatureBackend):
            backend = name
        else:
            backend = self._normalizers.get(name) or make_backend(name, "inverse")
            self._normalizers[name] = backend
        if self.eigen is not None:
            backend.accept_eigenpairs(self.eigen)
        self._fit_backend(backend)
        return backend

    def training_inverse_norms(self, normalizer: str | CurvatureBackend | None = None) -> Tensor:
        """‖C_δ⁻¹ g_r‖ for every training point, shape ``(n,)``: computed once per normalizer
        and damping, and reused by every RelatIF call."""
        backend = self.inverse_backend(normalizer)
        key = (id(backend), self.damping)
        if key not in self._inverse_norms:
            self._inverse_norms[key] = inverse_gradient_norms(self.objective, backend, self.damping)
        return self._inverse_norms[key]

    def bootstrap_shifts(self, n_bootstrap: int = 50, seed: int = 0) -> Tensor:
        """RUE's parameter shifts Δθ_b = −C_δ'⁻¹ (1/n) Σ_i (w_b,i − 1) g_i, shape ``(M, B)``.

        They do not depend on the test points, so the last set is kept (B·M numbers) and
        reused by every :meth:`rue` call with the same ``n_bootstrap``, ``seed`` and δ'."""
        self._ensure_fitted()
        weights = bootstrap_weights(self.objective.n, n_bootstrap, seed)  # validates both
        key = (n_bootstrap, seed, self.rue_damping)
        if self._shifts is None or self._shifts[0] != key:
            self._shifts = None  # free the previous set before the new one is computed
            self._shifts = key, bootstrap_shifts(self.objective, self.inverse, self.rue_damping, weights)
        return self._shifts[1]

    # ------------------------------------------------------------------ methods
    def compute(self, method: str, X_test: DataLike | None = None, y_test: Tensor | None = None, /,
                settings: Any = None, **options: Any) -> Any:
        """Run the registered ``method`` (see :data:`scalable_hbt.methods.METHODS`) on the test
        points with ``settings`` (its settings dataclass) or ``options`` (that dataclass's
        fields); what it reports besides the result (e.g. LEES's m) is in
        ``toolbox.last_info[method]``."""
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; available: {sorted(METHODS)}.")
        entry = METHODS[method]
        if settings is not None and options:
            raise InputError("pass either a settings object or keyword options, not both.")
        if settings is None:
            settings = entry.make_settings(options)
        elif not isinstance(settings, entry.settings):
            raise InputError(f"settings of {method!r} must be a {entry.settings.__name__}; got {type(settings).__name__}.")
        if entry.domain == "test":
            if X_test is None:
                raise InputError(f"{method} needs test points: compute({method!r}, X_test, y_test).")
            self.objective.check_test_data(X_test, y_test, settings.labels)
        elif X_test is not None or y_test is not None:
            raise InputError(f"{method} is computed over the training data; it takes no test points.")
        self._ensure_fitted()
        result, info = entry.run(self, X_test, y_test, settings)
        self.last_info[method] = {**info, "settings": settings}
        return result

    def influence(self, X_test: DataLike, y_test: Tensor | None = None, *, labels: Labels = "true",
                  test_loss: TestLoss = "objective") -> Tensor:
        """I(z_r, z_t) = (1/n) g_tᵀ C_δ⁻¹ g_r, shape ``(T, n)``; > 0 means z_r helps z_t."""
        return self.compute("influence", X_test, y_test, labels=labels, test_loss=test_loss)

    def similarity(self, X_test: DataLike, y_test: Tensor | None = None, *, labels: Labels = "true",
                   test_loss: TestLoss = "objective") -> Tensor:
        """S(z_r, z_t) = (g_tᵀ C_δ⁻¹ g_r)², shape ``(T, n)``."""
        return self.compute("similarity", X_test, y_test, labels=labels, test_loss=test_loss)

    def relatif(self, X_test: DataLike, y_test: Tensor | None = None, *,
                normalizer: str | CurvatureBackend | None = None, labels: Labels = "true",
                test_loss: TestLoss = "objective") -> Tensor:
        """I_R(z_r, z_t) = I(z_r, z_t) / ‖C_δ⁻¹ g_r‖, shape ``(T, n)``; the normalizer comes
        from ``normalizer`` (default: the Toolbox's inverse backend) and is computed once."""
        return self.compute("relatif", X_test, y_test, normalizer=normalizer, labels=labels, test_loss=test_loss)

    def rue(self, X_test: DataLike, y_test: Tensor | None = None, *, n_bootstrap: int = 50,
            seed: int | torch.Generator = 0, method: str = "bootstrap", labels: Labels = "true",
            test_loss: TestLoss = "objective") -> Tensor:
        """RUE(z_t) = Var_b ℓ(z_t, θ̃ + Δθ_b) at δ' = δ + 1, shape ``(T,)``; ``method="analytic"``
        gives the closed form for the linearised loss."""
        return self.compute("rue", X_test, y_test, n_bootstrap=n_bootstrap, seed=seed, method=method, labels=labels,
                            test_loss=test_loss)

    def extrapolation_score(self, X_test: DataLike, y_test: Tensor | None = None, *, labels: Labels = "predicted",
                            m: int | str | None = None, threshold: float | None = 0.1,
                            test_loss: TestLoss = "objective", m_max: int = 100) -> Tensor:
        """E_m(z_t) = ‖(I − V_m V_mᵀ) g_t‖, shape ``(T,)`` (the norm, as the reference code).

        m: an integer; ``"auto"`` (convergence rule); or ``None`` with the threshold rule
        (eigenvalues > ``threshold`` removed, never fewer than 2). The m used is in
        ``toolbox.last_m``.
        """
        return self.compute("lees", X_test, y_test, labels=labels, m=m, threshold=threshold, test_loss=test_loss,
                            m_max=m_max)

    def self_influence(self, backend: str | CurvatureBackend | None = None) -> Tensor:
        """I(z_i, z_i) = (1/n) g_iᵀ C_δ⁻¹ g_i for every training point, shape ``(n,)``; ``backend``
        names the inverse backend (default: the Toolbox's; "ekfac" makes it one cheap pass)."""
        return self.compute("self_influence", backend=backend)

    def top_k(self, X_test: DataLike, y_test: Tensor | None = None, *, k: int = 10, score: str = "influence",
              normalizer: str | CurvatureBackend | None = None, labels: Labels = "true",
              test_loss: TestLoss = "objective") -> dict[str, Tensor]:
        """The k most helpful and most harmful training points of every test point, streamed (the
        T × n matrix is never held): ``helpful_index``/``helpful_score`` and
        ``harmful_index``/``harmful_score``, each ``(T, k)``, by influence or RelatIF."""
        return self.compute("top_k", X_test, y_test, k=k, score=score, normalizer=normalizer, labels=labels,
                            test_loss=test_loss)

    @property
    def last_m(self) -> int:
        """The m of the last extrapolation score."""
        if "lees" not in self.last_info:
            raise InputError("no extrapolation score has been computed yet.")
        return self.last_info["lees"]["m"]
