"""LiSSA: the stochastic Neumann-series recursion for (H + δI)⁻¹ V (Agarwal et al. 2017;
Koh & Liang 2017), with mini-batch HVPs, many right-hand sides at once, optional
deflation of the top of the spectrum and, with full-batch steps, Chebyshev acceleration.

With A = H + δI and a scale s > λ_max(A), the Neumann series
A⁻¹ = (1/s) Σ_{j≥0} (I − A/s)^j is summed by the recursion

.. math::

    h_0 = v, \\qquad h_j = v + \\big(I − (H_{B_j} + δI)/s\\big)\\, h_{j−1}, \\qquad x = h_J / s,

where H_{B_j} is the curvature of a fresh mini-batch B_j (``CurvatureOperator.minibatch_matmat``)
at every step, so E[H_B] = H. For V of shape ``(M, k)`` all k columns advance together:
one mini-batch product on an ``(M, k)`` block per step. The error contracts like ρ^J with
ρ = max(1 − (λ_min + δ)/s, (λ_max + δ)/s − 1), so about ln(1/ε)/−ln ρ steps are needed:
(s / (λ_min + δ))·ln(1/ε) with the mini-batch scale s > λ_max + δ, and about half that with
full-batch steps, whose scale sits at the middle of the spectrum; ``repeats``
independent runs (different batches) are averaged to reduce the mini-batch noise.

Chebyshev acceleration (full-batch steps, the default there). When every step is the exact
product and the fit knows an interval [a, b] holding the spectrum of A on the complement of
the deflated space — a = 0.9·(λ̂_min + δ) (the Ritz estimate λ̂_min is an upper bound of the
true λ_min, hence the margin), b = 1.1·(λ̂ + δ) — the same step g_j = v + (I − A/s)h_j at
s = (a + b)/2 is extrapolated with the previous iterate (Chebyshev semi-iteration, Golub &
Varga 1961):

.. math::

    h_{−1} = 0,\\quad h_0 = v, \\qquad h_{j} = h_{j−2} + ω_{j+1}\\,(g_{j−1} − h_{j−2}), \\qquad x = h_J / s,

    ω_2 = 2/(2 − ρ̄^2), \\quad ω_{m+1} = 1/(1 − ρ̄^2 ω_m/4), \\quad ρ̄ = (b − a)/(b + a).

After J steps the error on the complement is T_{J+1}((s − λ)/((b − a)/2)) / T_{J+1}(1/ρ̄) times the
initial one, at most 2σ^{J+1}/(1 + σ^{2(J+1)}) with σ = (√κ − 1)/(√κ + 1), κ = b/a, against
Richardson's ρ^{J+1} ≈ ((κ − 1)/(κ + 1))^{J+1}: about (√κ/2)·ln(2/ε) steps instead of
(κ/2)·ln(1/ε). The weights are fixed by [a, b] alone (no inner products), the fixed point is
the same, the result deterministic; one more (M, block) array is held (h_{j−2}). With noisy
mini-batch products the extrapolation amplifies the noise, so mini-batch steps keep the
plain recursion.

Mini-batch noise. Plain LiSSA's error has a noise floor of order σ/√(μ s) (σ the spread of
the mini-batch Hessians, μ = λ_min + δ) that only repeats (1/√r) or tail averaging reduce.
With ``variance_reduction=True`` the product is estimated with a control variate,
H h ≈ H_B h − H_B h̃ + H h̃, with an anchor h̃ whose exact product is recomputed every two
epochs (2⌈n/b⌉ steps); the noise then shrinks with ‖h − h̃‖ → 0 and the iteration converges to the exact
solution although every step uses a genuinely stochastic mini-batch.

Deflation. With the top-k eigenpairs (Λ_k, V_k) of H from Lanczos (computed once in
``fit``, or taken from an eigen backend), v = V_k c + v_⊥ with c = V_kᵀv; the span is solved exactly,
V_k diag(1/(λ_i + δ)) c, and the recursion runs only on the complement with every
mini-batch product projected, P H_B P with P = I − V_k V_kᵀ. Its scale is then set by
λ_{k+1}, the largest eigenvalue left in the complement, so far fewer steps are needed.

Stability. The recursion converges only if every eigenvalue of I − (H_B + δI)/s lies in
(−1, 1): s too small (< (λ_max + δ)/2) or negative curvature (λ_min + δ ≤ 0) makes ‖h_j‖
grow without bound (Chebyshev: the same region, λ + δ ∈ (0, a + b)). That is detected (‖h_j‖
beyond 10·(j + 1)·‖v‖, the bound of a non-expanding recursion — 10·(j + 1)²·‖v‖ with Chebyshev,
whose iterate h_j = s·q(A)v has |s·q(λ)| ≤ (j + 1)² there — or non-finite), and so is a result
whose one-product residual estimate ‖(C + δI)x − v‖/‖v‖ reaches 1 (no better than x = 0); both are reported as a
:class:`~scalable_hbt.errors.SolverDivergenceError` naming the cause, the scale used and the
scale to use instead. Negative curvature (λ_min + δ ≤ 0) is an
:class:`~scalable_hbt.errors.IndefiniteDampingError`, as in every backend.

Cost: ``repeats``·J products per block of columns (+ one for the residual estimate):
mini-batch products with J ≈ (s/μ)·ln(1/ε), full-data products with J ≈ (√κ/2)·ln(2/ε)
(Chebyshev, κ = b/a above) or ≈ (κ/2)·ln(1/ε) (``acceleration=None``); plus the fit (Lanczos
for the top k + 1 eigenpairs, none when an eigen backend is shared, and λ_min); memory ≈ six
(M, block) arrays (seven with Chebyshev) and the k deflated eigenvectors.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..errors import DAMPING_MARGIN, IndefiniteDampingError, InputError, SolverDivergenceError
from ..log import progress_bar
from ..operators import CurvatureOperator, MiniBatch, Projected, project_out
from ..validation import check_bool, check_choice, check_integer, check_number
from .base import CurvatureBackend, State, expect_shape
from .lanczos import lanczos_top, smallest_eigenvalue
from .lowrank import deflate as deflated_split

MAX_AUTOMATIC_DEPTH = 5000
"""The automatic depth is capped here (with a warning naming κ); an explicit ``depth`` is not."""
SCALE_MARGIN = 1.1
"""s = 1.1 × the largest curvature estimate: every step's I − (H_B + δI)/s stays within (−1, 1)."""
FLOOR_MARGIN = 0.9
"""Chebyshev's interval starts at a = 0.9·(λ̂_min + δ): the Ritz estimate λ̂_min is an upper bound of
λ_min, and an eigenvalue a fraction η below a costs only a factor ≈ (2/ε)^{η/2} of the accuracy."""
ACCELERATIONS = ("auto", "chebyshev")
SCALE_BATCHES = 3
"""Mini-batch Hessians whose top eigenvalue is estimated for the automatic scale (b < n)."""
GROWTH_LIMIT = 10.0
"""Divergence: ‖h_j‖ > 10·(j + 1)·‖v‖, beyond the bound (j + 1)‖v‖ of a non-expanding recursion."""
CHECK_EVERY = 10
"""Steps between divergence checks."""


def chebyshev_degree(sigma: float, target: float) -> int:
    """The smallest degree m ≥ 1 with 2σ^m/(1 + σ^{2m}) ≤ ε (= 1/T_m((1 + σ²)/(1 − σ²)), the error
    bound of the degree-m Chebyshev iterate), for σ in [0, 1) and ε in (0, 1].

    2t/(1 + t²) ≤ ε for t = σ^m ≤ t* = ε/(1 + √(1 − ε²)), so m = ⌈ln t*/ln σ⌉, checked against the
    bound itself for rounding."""
    if sigma <= 0:
        return 1
    if sigma >= 1:
        return MAX_AUTOMATIC_DEPTH + 2  # no contraction: the automatic depth's cap applies

    def bound(m: int) -> float:
        return 2 * sigma**m / (1 + sigma ** (2 * m))

    t_star = target / (1 + math.sqrt(1 - target * target))
    m = max(1, math.ceil(math.log(t_star) / math.log(sigma)))
    while m > 1 and bound(m - 1) <= target:
        m -= 1
    while bound(m) > target:
        m += 1
    return m


class LiSSACurvature(CurvatureBackend):
    """Stochastic (LiSSA) inverse-curvature products x ≈ (C + δI)⁻¹ v, batched over columns.

    ``solve(V, δ)`` takes ``V`` of shape ``(M, k)`` and returns ``(M, k)``. ``eigh`` is not
    provided and ``min_eigenvalue`` returns ``None`` (its λ_min is only a Ritz estimate).

    Parameters
    ----------
    The recursion:

    depth:
        Recursion steps J per run (one product each). ``None``: from the estimated spectrum of the
        (deflated) problem, at most 5000 — with Chebyshev the smallest J with
        2σ^{J+1}/(1 + σ^{2(J+1)}) ≤ ``target`` (σ = (√κ − 1)/(√κ + 1), κ = b/a of the interval
        [a, b]); otherwise J = ⌈ln(1/``target``) / −ln ρ⌉ with ρ the estimated contraction factor
        per step (full batch), or ⌈(s / (λ̂_min + δ)) · ln(1/``target``)⌉ (mini-batches).
    acceleration:
        ``"chebyshev"``: Chebyshev semi-iteration on the interval [0.9·(λ̂_min + δ), 1.1·(λ̂ + δ)]
        (module docstring); needs full-batch steps, the λ_min estimate (``check_curvature``) and
        the automatic scale. ``None``: the plain recursion. ``"auto"`` (default): Chebyshev when
        those hold, else the plain recursion.
    repeats:
        Independent runs averaged.
    scale:
        s, fixed (the plain recursion). ``None``: with Chebyshev s = (a + b)/2; with mini-batches
        s = 1.1·max(λ̂ + δ, (λ̂_B + δ)/1.5); otherwise with full-batch steps and a λ_min estimate
        s = (1.1·(λ̂ + δ) + λ̂_min + δ)/2 (:meth:`scale_for`); λ̂ the largest eigenvalue of C on the
        complement of the deflated space (λ_max, or λ_{k+1} when deflating) and λ̂_B the largest
        over three mini-batch curvatures (b < n only).
    target:
        ε in the automatic depth: the bound on the relative error of the recursion's part of x
        when the spectrum lies where the fit estimated it.
    rtol:
        Optional early stop of a run when ‖g_j − h_j‖ ≤ rtol·‖v_⊥‖ for every column, checked every
        10 steps; g_j − h_j = v_⊥ − P(H_B + δI)h_j/s is the (mini-batch) residual of x = h_j/s,
        and for the plain recursion the update h_{j+1} − h_j.

    The mini-batches:

    batch_size:
        Samples b per mini-batch; ``None`` (default) is every training point, so every step is a
        full-data step: deterministic, and the operator's cached graphs apply. With b < n the
        mini-batches are drawn afresh at every step, with replacement between steps, so E[h_j]
        follows the exact recursion and averaging ``repeats`` is unbiased.
    variance_reduction:
        Use the control variate H_B h − H_B h̃ + H h̃ for H h (an SVRG-style LiSSA): the
        mini-batch noise vanishes as h_j converges, so the recursion reaches the exact solve;
        each step costs a mini-batch product on 2k columns, each anchor k full-data products.
    seed:
        Seeds the mini-batches and the Lanczos start vectors. Same seed, same result.

    The spectrum (estimated in ``fit``):

    deflate:
        k, the number of top eigenpairs solved exactly (default 10; 0: plain LiSSA).
    eigen:
        An eigen backend (e.g. the Toolbox's Lanczos or dense backend) whose top k + 1
        eigenpairs are used for the deflation and the scale instead of a Lanczos run of
        LiSSA's own; its accuracy then governs the deflation. A Toolbox hands over its eigen
        backend when this is unset (:meth:`accept_eigenpairs`).

    The defaults — ten deflated eigenpairs, full-batch steps, the automatic scale and depth —
    are the configuration measured best (``benchmarks/SOLVERS.md``, ``benchmarks/RESULTS.md``).
    lanczos_tol:
        Relative Ritz-residual tolerance (relative to λ_max) of LiSSA's own eigenpairs. Keep it
        tight when one eigenvalue stands far above the rest: a loose tolerance stops Lanczos
        before λ_2..λ_k have converged and deflation removes the wrong directions.
    check_curvature:
        Estimate λ_min in ``fit`` (a short Lanczos run on −C). It sets the automatic depth and
        lets ``solve`` refuse a damping with λ_min + δ ≤ 0 at once; without it the divergence
        check catches the growth.

    The result:

    estimate_residual:
        Compute ‖(C + δI)x − v‖/‖v‖ with one full-data product at the end of ``solve``; a
        residual ≥ 1 (no better than x = 0) raises :class:`SolverDivergenceError`.
    warn_residual:
        Warn (``RuntimeWarning``) when the estimated relative residual exceeds this (``None``: never).
    progress:
        Show a progress bar (default: the objective's setting).
    """

    name = "lissa"
    roles = frozenset({"inverse"})
    collective_solve = True

    def __init__(self, depth: int | None = None, batch_size: int | None = None, repeats: int = 1,
                 scale: float | None = None, deflate: int = 10, seed: int = 0, *, target: float = 1e-3,
                 rtol: float | None = None, acceleration: str | None = "auto",
                 variance_reduction: bool = False, estimate_residual: bool = True, warn_residual: float | None = 0.1,
                 lanczos_tol: float = 1e-10, check_curvature: bool = True, eigen: CurvatureBackend | None = None,
                 progress: bool | None = None) -> None:
        super().__init__()
        for key, value in (("depth", depth), ("batch_size", batch_size)):
            check_integer(key, value, 1, allow_none=True, where="lissa")
        check_integer("repeats", repeats, 1, where="lissa")
        check_integer("deflate", deflate, 0, where="lissa")
        check_integer("seed", seed, where="lissa")
        check_number("scale", scale, strict=True, allow_none=True, where="lissa")
        check_number("rtol", rtol, strict=True, allow_none=True, where="lissa")
        for key, value in (("target", target), ("lanczos_tol", lanczos_tol)):
            check_number(key, value, high=1, strict=True, where="lissa")
        check_number("warn_residual", warn_residual, strict=True, allow_none=True, where="lissa")
        for key, value in (("variance_reduction", variance_reduction), ("estimate_residual", estimate_residual),
                           ("check_curvature", check_curvature)):
            check_bool(key, value, where="lissa")
        if acceleration is not None:
            check_choice("acceleration", acceleration, ACCELERATIONS, where="lissa")
        if acceleration == "chebyshev":
            conflict = ("a fixed scale (scale=...)" if scale is not None else
                        "check_curvature=False (its interval needs the λ_min estimate)" if not check_curvature
                        else None)
            if conflict is not None:
                raise InputError(f"lissa: acceleration='chebyshev' takes its step and interval from the fit's "
                                 f"spectrum estimates and cannot be combined with {conflict}. Drop that option, "
                                 "or use acceleration=None for the plain recursion.")
        if eigen is not None and not isinstance(eigen, CurvatureBackend):
            raise InputError(f"lissa: eigen must be a curvature backend (e.g. LanczosCurvature); got {eigen!r}.")
        self.depth, self.batch_size, self.repeats, self.scale = depth, batch_size, repeats, scale
        self.deflate, self.seed, self.target, self.rtol = deflate, seed, float(target), rtol
        self.variance_reduction, self.acceleration = bool(variance_reduction), acceleration
        self.estimate_residual, self.warn_residual = bool(estimate_residual), warn_residual
        self.lanczos_tol, self.check_curvature, self.eigen = float(lanczos_tol), bool(check_curvature), eigen
        self.progress = progress
        self.values: Tensor | None = None      # λ_1..λ_k (deflated), descending
        self.vectors: Tensor | None = None     # V_k (M, k)
        self.lambda_top: float = float("nan")  # λ_{k+1}: largest eigenvalue on the complement
        self.lambda_batch: float | None = None  # largest over sampled mini-batch curvatures (complement)
        self.lambda_min: float = float("nan")  # Ritz estimate of λ_min (an upper bound of the true one)
        self.b = 0                             # the mini-batch size in use
        self.fit_hvps = 0.0
        self.fit_diagnostics: dict[str, Any] = {}

    def accept_eigenpairs(self, eigen: CurvatureBackend) -> None:
        """Deflate with ``eigen``'s top eigenpairs instead of computing our own, unless an eigen
        backend was given or there is nothing to deflate."""
        if self.eigen is None and self.deflate > 0 and "eigen" in eigen.roles and not self.fitted:
            self.eigen = eigen

    def fit_settings(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "scale": self.scale, "deflate": self.deflate, "seed": self.seed,
                "lanczos_tol": self.lanczos_tol, "check_curvature": self.check_curvature, "eigen": self.eigen}

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        M, itemsize = operator.shape[0], operator.dtype.itemsize
        block = min(columns, operator.max_vectors) * (2 if self.variance_reduction else 1)
        arrays = 6 if self.acceleration is None else 7  # + h_{j−2} with Chebyshev
        return {"lissa_work": arrays * block * M * itemsize, "deflated_eigenvectors": (self.deflate + 1) * M * itemsize}

    # ------------------------------------------------------------------ fit
    def fit(self, operator: CurvatureOperator) -> LiSSACurvature:
        """Estimate the spectrum once: the top k + 1 eigenpairs (k = ``deflate``), λ_min, and
        the top eigenvalue of a few mini-batch curvatures on the complement (products counted)."""
        t0, hvps0 = time.perf_counter(), operator.num_hvps
        self._mark_fitted(operator)
        M, n = operator.shape[0], operator.objective.n
        k = min(self.deflate, M - 1)
        self.b = min(self.batch_size or n, n)
        if self.acceleration == "chebyshev" and self.b < n:
            raise InputError(f"lissa: acceleration='chebyshev' needs full-batch steps (every product exact); "
                             f"batch_size = {self.batch_size} < n = {n} makes every step a noisy mini-batch "
                             "product, which the extrapolation amplifies. Use batch_size=None, or "
                             "acceleration=None for the stochastic recursion.")
        need_top = self.scale is None or k > 0
        lanczos_info: dict = {}
        if need_top and self.eigen is not None:
            if not self.eigen.fitted:
                self.eigen.fit(operator)
            values, vectors = self.eigen.eigh(k + 1)
        elif need_top:
            values, vectors, lanczos_info = lanczos_top(operator, k + 1, tol=self.lanczos_tol, seed=self.seed)
        if need_top:
            self.values, self.vectors = values[:k], vectors[:, :k]  # a view: no copy of shared eigenvectors
            self.lambda_top = float(values[k])
        if self.scale is None and self.b < n:
            gen = torch.Generator().manual_seed(self.seed + 7919)
            basis = self.vectors if k > 0 else None
            tops = []
            for _ in range(SCALE_BATCHES):
                idx = torch.randperm(n, generator=gen)[: self.b].sort().values
                v, _, _ = lanczos_top(Projected(MiniBatch(operator, idx), basis), 1, tol=1e-2, max_iter=min(M, 30),
                                      basis_size=min(M, 6), seed=self.seed + 1)
                tops.append(float(v[0]))
            self.lambda_batch = max(tops)
        if self.check_curvature:  # λ_min sets the automatic depth and names negative curvature up front
            self.lambda_min = self._estimate_lambda_min()
        self.fit_hvps = operator.num_hvps - hvps0
        self.fit_diagnostics = {
            "deflated": k, "lambda_deflated": None if self.values is None else self.values.tolist(),
            "lambda_top_complement": self.lambda_top, "lambda_top_minibatch": self.lambda_batch,
            "lambda_min_estimate": self.lambda_min, "batch_size": self.b, "fit_hvps": self.fit_hvps,
            "lanczos_iterations": lanczos_info.get("iterations"), "fit_seconds": time.perf_counter() - t0}
        self.diagnostics = dict(self.fit_diagnostics)
        return self

    def _estimate_lambda_min(self) -> float:
        """Ritz estimate of λ_min(C) by a short Lanczos run on −C (≥ the true λ_min)."""
        M = self.operator.shape[0]
        return smallest_eigenvalue(self.operator, tol=1e-3, max_iter=min(M, 60), seed=self.seed + 2)[0]

    _SCALARS = ("lambda_top", "lambda_batch", "lambda_min", "fit_hvps", "b")

    def state_dict(self) -> State:
        state: State = {k: getattr(self, k) for k in self._SCALARS}
        state.update(values=self.values, vectors=self.vectors, fit_diagnostics=dict(self.fit_diagnostics),
                     diagnostics=dict(self.diagnostics))
        return state

    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        if state["vectors"] is not None:
            expect_shape(state["vectors"], (operator.shape[0], state["values"].numel()), "vectors")
        for k in self._SCALARS:
            setattr(self, k, state[k])
        self.b = int(state["b"])
        self.values, self.vectors = state["values"], state["vectors"]
        self.fit_diagnostics = dict(state["fit_diagnostics"])
        self.diagnostics = dict(state["diagnostics"])
        self._mark_fitted(operator)

    # ------------------------------------------------------------------ parameters of one solve
    def _full_batch(self) -> bool:
        """Every step is an exact full-data product: the spectrum bounds of the complement hold
        for every step, so the scale may sit between them."""
        return self.lambda_batch is None and self.b >= self.operator.objective.n

    def chebyshev(self) -> bool:
        """Whether ``solve`` runs the Chebyshev recursion: ``acceleration`` is set, the steps are
        full-batch, the scale automatic and the fit has estimated λ_min and the complement's top."""
        return (self.acceleration is not None and self.scale is None and self._full_batch()
                and math.isfinite(self.lambda_min) and math.isfinite(self.lambda_top))

    def interval(self, damping: float) -> tuple[float, float]:
        """Chebyshev's interval [a, b] = [0.9·(λ̂_min + δ), 1.1·max(λ̂ + δ, λ̂_min + δ)] for damping δ:
        the estimated spectrum of C + δI on the complement of the deflated space (λ̂ its top
        eigenvalue), widened by the margins of the two estimates."""
        mu = self.lambda_min + damping
        return FLOOR_MARGIN * mu, SCALE_MARGIN * max(self.lambda_top + damping, mu)

    def scale_for(self, damping: float) -> float:
        """The scale s used with damping δ (the given ``scale``, or the automatic rule).

        Mini-batch steps: s = 1.1·max(λ̂ + δ, (λ̂_B + δ)/1.5), above every step's curvature.
        Full-batch steps with a λ_min estimate: s = (1.1·(λ̂ + δ) + (λ̂_min + δ))/2, the midpoint
        of the complement's spectrum (its top with the 10 % margin), which minimises the
        contraction factor max|1 − (λ + δ)/s| of the exact recursion.
        Chebyshev: s = (a + b)/2, the middle of :meth:`interval`."""
        if self.scale is not None:
            return float(self.scale)
        if self.chebyshev():
            a, b = self.interval(damping)
            return (a + b) / 2
        top = self.lambda_top + damping
        mu = self.lambda_min + damping
        if self._full_batch() and math.isfinite(mu) and 0 < mu < top:
            return (SCALE_MARGIN * top + mu) / 2
        if self.lambda_batch is not None:
            top = max(top, (self.lambda_batch + damping) / 1.5)
        return SCALE_MARGIN * max(top, 1e-12)

    def contraction(self, damping: float, scale: float) -> float:
        """ρ = max(1 − (λ̂_min + δ)/s, (λ̂ + δ)/s − 1): the factor by which one exact step shrinks the
        error on the complement (λ̂ its top eigenvalue); NaN without a λ_min estimate."""
        mu = self.lambda_min + damping
        return max(1 - mu / scale, (self.lambda_top + damping) / scale - 1)

    def chebyshev_contraction(self, damping: float) -> float:
        """σ = (√κ − 1)/(√κ + 1) with κ = b/a of :meth:`interval`: Chebyshev's asymptotic error
        factor per step."""
        a, b = self.interval(damping)
        root = math.sqrt(b / a)
        return (root - 1) / (root + 1)

    def depth_for(self, damping: float, scale: float) -> int:
        """Recursion steps J for damping δ and scale s (the given ``depth``, or the automatic rule):
        with Chebyshev J = m − 1 for the smallest degree m with 2σ^m/(1 + σ^{2m}) ≤ ε
        (:func:`chebyshev_degree`, σ from :meth:`chebyshev_contraction`; h_0 = v is the degree-1
        iterate and needs no product); otherwise J = ⌈ln(1/ε) / −ln ρ⌉ (:meth:`contraction`) for
        full-batch steps, ⌈(s/(λ̂_min + δ))·ln(1/ε)⌉ (its bound, with the mini-batch scale's
        ρ = 1 − (λ̂_min + δ)/s) for mini-batch steps."""
        if self.depth is not None:
            return self.depth
        mu = self.lambda_min + damping
        if not (mu > 0 and math.isfinite(scale / mu)):  # no λ_min estimate: the cap
            return MAX_AUTOMATIC_DEPTH
        rho = self.contraction(damping, scale)
        kappa_text = f"s/(λ_min + δ) ≈ {scale / mu:.3g}"
        if self.chebyshev():
            depth = chebyshev_degree(self.chebyshev_contraction(damping), self.target) - 1
            a, b = self.interval(damping)
            kappa_text = f"b/a ≈ {b / a:.3g} on Chebyshev's interval"
        elif self._full_batch() and 0 < rho < 1:
            depth = math.ceil(math.log(1 / self.target) / -math.log(rho))
        else:
            depth = math.ceil(scale / mu * math.log(1 / self.target))
        if depth > MAX_AUTOMATIC_DEPTH:
            warnings.warn(
                f"lissa: the automatic depth would be {depth} steps (condition number {kappa_text}); "
                f"using {MAX_AUTOMATIC_DEPTH}. The result may not have converged: deflate more eigenpairs, raise "
                "the damping, or use inverse='cg'.", RuntimeWarning, stacklevel=3)
            return MAX_AUTOMATIC_DEPTH
        return max(1, depth)

    def _negative_curvature(self, damping: float, found: float | None = None) -> IndefiniteDampingError:
        lam = self.lambda_min if found is None else min(found, self.lambda_min)
        return IndefiniteDampingError(lam, damping, where="lissa (negative curvature: the recursion would grow "
                                                          "without bound)", evidence="estimate")

    # ------------------------------------------------------------------ solve
    def solve(self, V: Tensor, damping: float) -> Tensor:
        """x ≈ (C + δI)⁻¹ V for ``V`` of shape ``(M, k)``; returns ``(M, k)``.

        Runs ``repeats`` recursions h_j = v_⊥ + P(I − (C_{B_j} + δI)/s)h_{j−1} (with Chebyshev:
        that step extrapolated with h_{j−2}, module docstring) on the complement of the deflated
        space, averages x = h_J/s over the runs and adds the exact solve
        V_k diag(1/(λ_i + δ)) V_kᵀ v on the deflated span. Cost: ``repeats``·J products on each
        block of columns (+ one for the residual estimate); :meth:`depth_for` gives J. The
        columns are processed in blocks of the operator's ``max_vectors`` (every block sees the same
        mini-batch sequence, so the result does not depend on the blocking).
        """
        C = self.operator
        M = C.shape[0]
        if V.ndim != 2 or V.shape[0] != M:
            raise InputError(f"expected right-hand sides of shape (M, k) with M = {M}; got {tuple(V.shape)}.")
        if not torch.isfinite(V).all():
            raise InputError("the right-hand sides contain NaN or Inf.")
        damping = float(damping)
        t0, hvps0 = time.perf_counter(), C.num_hvps
        V = V.to(device=C.device, dtype=C.dtype)
        if self.lambda_min + damping <= 0:
            raise self._negative_curvature(damping)
        s = self.scale_for(damping)
        depth = self.depth_for(damping, s)
        cheb = self.chebyshev()
        if cheb:
            interval = self.interval(damping)
            factor = self.chebyshev_contraction(damping)
            bound = 2 * factor ** (depth + 1) / (1 + factor ** (2 * depth + 2))
        else:
            interval = None
            factor = self.contraction(damping, s) if self._full_batch() else float("nan")
            bound = factor ** (depth + 1) if 0 <= factor < 1 else float("nan")
        basis = self.vectors if self.vectors is not None and self.vectors.shape[1] > 0 else None
        if basis is not None:
            X, Vp = deflated_split(self.values, basis, V, damping, where="lissa (deflated eigenpairs)")
        else:
            X, Vp = torch.zeros_like(V), V

        blocks = torch.arange(V.shape[1], device=V.device).split(C.max_vectors)
        show = C.objective.progress if self.progress is None else self.progress
        total = len(blocks) * self.repeats * depth
        bar = progress_bar(range(total), total=total, desc="lissa", enabled=show)
        steps_run: list[int] = []
        for block in blocks:
            X_block, runs = self._recursions(Vp[:, block], damping, s, depth, basis, bar, interval)
            X[:, block] += X_block
            steps_run += runs
        for _ in bar:  # drain a bar left unfinished by an early stop
            pass
        del Vp
        lissa_hvps = C.num_hvps - hvps0
        diag = {**self.fit_diagnostics, "depth": depth, "acceleration": "chebyshev" if cheb else None,
                "interval": None if interval is None else list(interval), "contraction": factor,
                "error_bound": bound, "steps_run": steps_run,
                "stopped_early": sum(steps < depth for steps in steps_run), "column_blocks": len(blocks),
                "repeats": self.repeats,
                "scale": s, "damping": damping, "lissa_hvps": lissa_hvps, "columns": V.shape[1]}
        if self.estimate_residual:
            R = C.matmat(X).add_(X, alpha=damping).sub_(V)
            rel = R.norm(dim=0) / V.norm(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
            worst = rel.max().item() if rel.numel() else 0.0
            diag["relative_residual_max"] = worst
            diag["relative_residual_mean"] = rel.mean().item() if rel.numel() else 0.0
            if worst >= 1.0:
                col = int(rel.argmax())
                raise SolverDivergenceError(self._diagnose(
                    X[:, col], damping, s, f"lissa: the estimated relative residual ‖(C + δI)x − v‖/‖v‖ = {worst:.3g} "
                    f"≥ 1 (depth {depth}, repeats {self.repeats}, batch_size {self.b}, scale s = {s:.6g}, damping "
                    f"δ = {damping:.6g}): the result is no better than x = 0"))
            if self.warn_residual is not None and worst > self.warn_residual:
                warnings.warn(
                    f"lissa: estimated relative residual ‖(C + δI)x − v‖/‖v‖ = {worst:.2e} > {self.warn_residual:g} "
                    f"(depth {depth}, repeats {self.repeats}, batch_size {self.b}, scale {s:.4g}). Use "
                    "variance_reduction=True, more repeats or depth, a larger batch_size or a larger damping, "
                    "or inverse='cg'.", RuntimeWarning, stacklevel=2)
        diag["hvps"] = C.num_hvps - hvps0
        diag["hvps_with_fit"] = diag["hvps"] + self.fit_hvps
        diag["seconds"] = time.perf_counter() - t0
        self.diagnostics = diag
        return X

    def _recursions(self, Vp: Tensor, damping: float, s: float, depth: int, basis: Tensor | None,
                    bar: Iterator, interval: tuple[float, float] | None = None) -> tuple[Tensor, list[int]]:
        """(1/s)·(average over ``repeats`` runs of the recursion's last iterate) for the
        projected right-hand sides ``Vp`` (M, b) — zero for a zero column — and the steps
        each run took. With an ``interval`` [a, b] (s = (a + b)/2) every step is extrapolated
        with the iterate before: Chebyshev semi-iteration."""
        C, n = self.operator, self.operator.objective.n
        v_norm = Vp.norm(dim=0)
        live = (v_norm > 0).to(Vp.dtype)
        v_ref = v_norm.clamp_min(torch.finfo(Vp.dtype).tiny)
        cols = Vp.shape[1]
        control = self.variance_reduction and self.b < n
        snapshot = 2 * math.ceil(n / self.b)  # steps between anchors of the control variate: two epochs
        anchor = C_anchor = Vp  # placeholders, set at the first step of each run
        gen = torch.Generator().manual_seed(int(self.seed))
        X_sum = torch.zeros_like(Vp)
        steps_run = []
        rho2 = 0.0 if interval is None else ((interval[1] - interval[0]) / (interval[1] + interval[0])) ** 2
        growth_power = 1 if interval is None else 2  # the bound (j + 1)‖v‖, or (j + 1)²‖v‖ with Chebyshev
        for run in range(self.repeats):
            h = Vp.clone()
            h_prev = torch.zeros_like(Vp) if interval is not None else Vp  # h_{−1} = 0 (Chebyshev only)
            omega = 1.0
            last_checked = h.clone()
            j = 0
            for j in range(1, depth + 1):
                next(bar, None)
                idx = torch.randperm(n, generator=gen)[: self.b].sort().values if self.b < n else None
                if control:
                    if (j - 1) % snapshot == 0:  # new anchor h̃ with its exact full-data product
                        anchor = h.clone()
                        C_anchor = project_out(basis, C.matmat(anchor))
                    both = C.minibatch_matmat(torch.cat([h, anchor], dim=1), idx)
                    step = project_out(basis, both[:, :cols] - both[:, cols:]).add_(C_anchor)
                    del both
                elif idx is None:  # every step is the full data: the operator's graph cache applies
                    step = project_out(basis, C.matmat(h))
                else:
                    step = project_out(basis, C.minibatch_matmat(h, idx))
                g = step.add_(h, alpha=damping).div_(-s).add_(h).add_(Vp)  # v + h − (H_B h + δh)/s
                check = j % CHECK_EVERY == 0 or j == depth
                # g − h = v − (H_B + δI)h/s: the residual of x = h/s (the plain recursion's update)
                converged = (check and self.rtol is not None
                             and bool(((g - h).norm(dim=0) <= self.rtol * v_ref).all()))
                if interval is not None:  # h_j = h_{j−2} + ω_{j+1}(g_{j−1} − h_{j−2})
                    omega = 2 / (2 - rho2) if j == 1 else 1 / (1 - rho2 * omega / 4)
                    h_new = g.sub_(h_prev).mul_(omega).add_(h_prev)
                    h_prev = h
                else:
                    h_new = g
                if check:
                    norms = h_new.norm(dim=0)
                    limit = GROWTH_LIMIT * (j + 1) ** growth_power * v_ref
                    if not torch.isfinite(h_new).all() or bool((norms > limit).any()):
                        self._diverged(last_checked, damping, s, j, run)
                    last_checked.copy_(h_new)
                    if converged:
                        h = project_out(basis, h_new)
                        break
                h = project_out(basis, h_new)
            steps_run.append(j)
            X_sum.add_(h, alpha=1 / s)
        return X_sum.div_(self.repeats).mul_(live), steps_run

    def _diverged(self, h: Tensor, damping: float, s: float, step: int, run: int) -> None:
        """Name the cause of a growing recursion from its fastest-growing column and raise."""
        norms = h.norm(dim=0)
        col = int(torch.nan_to_num(norms, nan=-1.0, posinf=-1.0).argmax())
        where = f"lissa diverged at step {step} of run {run + 1} (scale s = {s:.6g}, damping δ = {damping:.6g})"
        raise SolverDivergenceError(self._diagnose(h[:, col], damping, s, where))

    def _diagnose(self, direction: Tensor, damping: float, s: float, where: str) -> str:
        """Why the recursion failed along ``direction``, from its Rayleigh quotient q (one full-data
        product): negative curvature (q + δ ≤ 0), a scale that is too small (q + δ ≥ s), or noisy
        mini-batch curvatures; the message names the damping or scale to use instead."""
        q = None
        if torch.isfinite(direction).all() and direction.norm() > 0:
            u = project_out(self.vectors, (direction / direction.norm()).unsqueeze(1))[:, 0]
            u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
            q = float(u @ self.operator.matvec(u))
        known = [v for v in (self.lambda_top, self.lambda_batch, q) if v is not None and math.isfinite(v)]
        lam_hi = max(known) if known else None
        if q is not None and q + damping <= 0:
            lam_min = self.lambda_min if math.isfinite(self.lambda_min) else self._estimate_lambda_min()
            lam = min(q, lam_min)
            raise IndefiniteDampingError(lam, damping, where=f"{where}; negative curvature", evidence="estimate")
        if q is not None and q + damping >= s:
            suggested = max(2 * s, 1.1 * (max(q, lam_hi or q) + damping))
            return (f"{where}: the scale is too small — the failing direction has curvature qᵀ(C + δI)q ≈ "
                    f"{q + damping:.6g} ≥ s, and the recursion is stable only where λ + δ < 2s (a direction's "
                    f"Rayleigh quotient understates the largest curvature in it). Use scale ≥ {suggested:.6g} (or "
                    "scale=None for the automatic λ_max estimate).")
        suggested = 2 * s if lam_hi is None else max(2 * s, 1.5 * (lam_hi + damping))
        lam_text = (f"; the estimated λ_min is {self.lambda_min:.6g}, so damping ≥ "
                    f"{abs(self.lambda_min) + DAMPING_MARGIN:.4g}" if math.isfinite(self.lambda_min) else "")
        return (f"{where}: likely the mini-batch curvatures are too noisy for this scale (their curvature exceeds "
                f"2s or has λ + δ ≤ 0). Use scale ≥ {suggested:.6g}, a larger batch_size, variance_reduction=True, "
                f"or a larger damping{lam_text}.")
