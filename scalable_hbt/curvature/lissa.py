"""LiSSA: the stochastic Neumann-series recursion for (H + δI)⁻¹ V (Agarwal et al. 2017;
Koh & Liang 2017), with mini-batch HVPs, many right-hand sides at once and optional
deflation of the top of the spectrum.

With A = H + δI and a scale s > λ_max(A), the Neumann series
A⁻¹ = (1/s) Σ_{j≥0} (I − A/s)^j is summed by the recursion

.. math::

    h_0 = v, \\qquad h_j = v + \\big(I − (H_{B_j} + δI)/s\\big)\\, h_{j−1}, \\qquad x = h_J / s,

where H_{B_j} is the Hessian of a fresh mini-batch B_j (``HessianOperator.minibatch_matmat``)
at every step, so E[H_B] = H. For V of shape ``(M, k)`` all k columns advance together:
one mini-batch product on an ``(M, k)`` block per step. The error contracts like
(1 − (λ_min + δ)/s)^J, so about (s / (λ_min + δ))·ln(1/ε) steps are needed; ``repeats``
independent runs (different batches) are averaged to reduce the mini-batch noise, and
optionally the iterates of the last part of each run are averaged as well.

Mini-batch noise. Plain LiSSA's error has a noise floor of order σ/√(μ s) (σ the spread of
the mini-batch Hessians, μ = λ_min + δ) that only repeats (1/√r) or tail averaging reduce.
With ``variance_reduction=True`` the product is estimated with a control variate,
H h ≈ H_B h − H_B h̃ + H h̃, with an anchor h̃ whose exact product is recomputed every few
steps; the noise then shrinks with ‖h − h̃‖ → 0 and the iteration converges to the exact
solution although every step uses a genuinely stochastic mini-batch.

Deflation. With the top-k eigenpairs (Λ_k, V_k) of H from Lanczos (computed once in
``fit``), v = V_k c + v_⊥ with c = V_kᵀv; the span is solved exactly,
V_k diag(1/(λ_i + δ)) c, and the recursion runs only on the complement with every
mini-batch product projected, P H_B P with P = I − V_k V_kᵀ. Its scale is then set by
λ_{k+1}, the largest eigenvalue left in the complement, so far fewer steps are needed.

Stability. The recursion converges only if every eigenvalue of I − (H_B + δI)/s lies in
(−1, 1): s too small (< (λ_max + δ)/2) or negative curvature (λ_min + δ ≤ 0) makes ‖h_j‖
grow without bound. That is detected (‖h_j‖ beyond ``growth_limit``·(j + 1)·‖v‖, the bound
of a non-expanding recursion, or non-finite) and reported as a
:class:`~scalable_hbt.errors.SolverDivergenceError` naming the cause, the scale used and
the scale or damping to use instead.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Literal

import torch
from torch import Tensor

from ..errors import InputError, SolverDivergenceError
from ..hessian import HessianOperator
from ..progress import progress_bar
from .base import CurvatureBackend
from .lanczos import lanczos_top

Sampling = Literal["shuffle", "replacement"]


class _Operator:
    """A symmetric operator for :func:`lanczos_top`: ``sign · P H_B P`` (or the full H),
    with HVP accounting forwarded to the underlying :class:`HessianOperator`."""

    def __init__(self, hessian: HessianOperator, indices: Tensor | None = None, basis: Tensor | None = None,
                 sign: float = 1.0) -> None:
        self.h, self.indices, self.basis, self.sign = hessian, indices, basis, sign

    shape = property(lambda self: self.h.shape)
    dtype = property(lambda self: self.h.dtype)
    device = property(lambda self: self.h.device)
    num_hvps = property(lambda self: self.h.num_hvps)

    def matvec(self, v: Tensor) -> Tensor:
        if self.basis is not None:
            v = v - self.basis @ (self.basis.T @ v)
        w = self.h.matvec(v) if self.indices is None else self.h.minibatch_matmat(v, self.indices)
        if self.basis is not None:
            w = w - self.basis @ (self.basis.T @ w)
        return self.sign * w


class LiSSACurvature(CurvatureBackend):
    """Stochastic (LiSSA) inverse-Hessian products x ≈ (H + δI)⁻¹ v, batched over columns.

    ``solve(V, δ)`` takes ``V`` of shape ``(M, k)`` and returns ``(M, k)``. ``eigh`` is not
    provided and ``min_eigenvalue`` returns ``None`` (its λ_min is only a Ritz estimate).

    Parameters
    ----------
    depth:
        Recursion steps J per run. ``None``: chosen from the estimated condition number of
        the (deflated) problem, J = ⌈(s / (λ̂_min + δ)) · ln(1/``target``)⌉ (plus the averaged
        tail), capped at ``max_depth``.
    batch_size:
        Samples b per mini-batch Hessian (default: the objective's ``batch_size``, at most n).
        ``batch_size = n`` makes every step a full-data step (deterministic).
    repeats:
        Independent runs averaged.
    scale:
        s, fixed. ``None``: s = ``scale_margin``·max(λ̂ + δ, (λ̂_B + δ)/1.5), with λ̂ the largest
        eigenvalue of H on the complement of the deflated space (λ_max, or λ_{k+1} when
        deflating) and λ̂_B the largest over ``scale_batches`` mini-batch Hessians (b < n only),
        which keeps every step's I − (H_B + δI)/s within (−1, 1) with room to spare.
    deflate:
        k, the number of top eigenpairs solved exactly (0: plain LiSSA).
    seed:
        Seeds the mini-batch sampling (and the Lanczos start vectors). Same seed, same result.
    rtol:
        Optional early stop of a run when ‖h_j − h_{j−1}‖ ≤ rtol·‖v_⊥‖ for every column (the
        update is the mini-batch residual v − (H_B + δI)x); checked every ``check_every`` steps.
    sampling:
        ``"replacement"`` (default): every mini-batch is drawn afresh, independent of the past,
        so E[h_j] follows the exact recursion and averaging ``repeats`` is unbiased.
        ``"shuffle"``: mini-batches run through random permutations of the data (epochs); the
        batches of one epoch are dependent, which biases plain LiSSA (not the
        variance-reduced recursion, whose fixed point is exact either way).
    variance_reduction:
        Use the control variate H_B h − H_B h̃ + H h̃ for H h, with an anchor h̃ and its exact
        full-data product refreshed every ``snapshot_every`` steps (an SVRG-style LiSSA). The
        mini-batch noise then vanishes as h_j converges, so the recursion reaches the exact
        (H + δI)⁻¹v with genuinely stochastic mini-batches; each step costs a mini-batch
        product on 2k columns, each anchor k full-data products.
    snapshot_every:
        Steps between anchors (default 2⌈n/b⌉, two epochs).
    tail_average:
        Fraction of extra steps, relative to the burn-in J, whose iterates are averaged (0:
        the classic last iterate). Averaging cuts the mini-batch noise at little cost.
    target:
        ε in the automatic depth.
    estimate_residual:
        Compute ‖(H + δI)x − v‖/‖v‖ with one full-data product at the end of ``solve``.
    warn_residual:
        Warn (``RuntimeWarning``) when the estimated relative residual exceeds this (``None``: never).
    eigenpairs:
        An eigen backend (e.g. the Toolbox's ``LanczosCurvature`` or ``DenseCurvature``) whose
        top k + 1 eigenpairs are used for the deflation and the scale instead of a Lanczos run
        of LiSSA's own: no second set of eigenvectors is computed or held. Its accuracy then
        governs the deflation.
    lanczos_tol:
        Relative Ritz-residual tolerance (relative to λ_max) of the eigenpairs computed in
        ``fit``. Keep it tight: with one outlying eigenvalue (λ_max ≈ 1857 against λ_2 ≈ 0.03
        on the paper's CNN) a loose tolerance stops Lanczos before λ_2..λ_k have converged
        and deflation removes the wrong directions.
    check_curvature:
        Estimate λ_min(H) in ``fit`` (a short Lanczos run on −H). It sets the automatic depth and
        lets ``solve`` refuse a damping with λ_min + δ ≤ 0 at once; without it (or when the Ritz
        estimate misses the negative curvature) the divergence check catches the growth.
    growth_limit:
        Divergence threshold: ‖h_j‖ > growth_limit·(j + 1)·‖v‖.
    progress:
        Show a progress bar (default: the objective's setting).
    """

    name = "lissa"
    collective_solve = True

    def __init__(self, depth: int | None = None, batch_size: int | None = None, repeats: int = 1,
                 scale: float | None = None, deflate: int = 0, seed: int = 0, rtol: float | None = None, *,
                 max_depth: int = 5000, scale_margin: float = 1.1, scale_batches: int = 3,
                 sampling: Sampling = "replacement", tail_average: float = 0.0, target: float = 1e-3,
                 variance_reduction: bool = False, snapshot_every: int | None = None,
                 estimate_residual: bool = True, warn_residual: float | None = 0.1, lanczos_tol: float = 1e-10,
                 growth_limit: float = 10.0, check_every: int = 10, check_curvature: bool = True, progress: bool | None = None,
                 eigenpairs: CurvatureBackend | None = None) -> None:
        super().__init__()
        if depth is not None and int(depth) < 1:
            raise InputError(f"depth must be ≥ 1; got {depth}.")
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size must be ≥ 1; got {batch_size}.")
        if int(repeats) < 1:
            raise InputError(f"repeats must be ≥ 1; got {repeats}.")
        if scale is not None and not (scale > 0 and math.isfinite(scale)):
            raise InputError(f"scale must be a finite number > 0; got {scale!r}.")
        if int(deflate) < 0:
            raise InputError(f"deflate must be ≥ 0; got {deflate}.")
        if sampling not in ("shuffle", "replacement"):
            raise InputError(f"sampling must be 'shuffle' or 'replacement'; got {sampling!r}.")
        if not 0 < target < 1:
            raise InputError(f"target must lie in (0, 1); got {target}.")
        if tail_average < 0:
            raise InputError(f"tail_average must be ≥ 0; got {tail_average}.")
        self.depth = None if depth is None else int(depth)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.repeats, self.scale, self.deflate, self.seed, self.rtol = int(repeats), scale, int(deflate), seed, rtol
        self.max_depth, self.scale_margin, self.scale_batches = int(max_depth), float(scale_margin), int(scale_batches)
        self.sampling, self.tail_average, self.target = sampling, float(tail_average), float(target)
        self.estimate_residual, self.lanczos_tol = estimate_residual, lanczos_tol
        self.eigenpairs = eigenpairs
        self.warn_residual = warn_residual
        self.growth_limit, self.check_every, self.progress = float(growth_limit), max(1, int(check_every)), progress
        self.check_curvature = bool(check_curvature)
        self.variance_reduction = bool(variance_reduction)
        self.snapshot_every = None if snapshot_every is None else max(1, int(snapshot_every))
        self.values: Tensor | None = None      # λ_1..λ_k (deflated), descending
        self.vectors: Tensor | None = None     # V_k (M, k)
        self.lambda_top: float = float("nan")  # λ_{k+1}: largest eigenvalue on the complement
        self.lambda_batch: float | None = None  # largest over sampled mini-batch Hessians (complement)
        self.lambda_min: float = float("nan")  # Ritz estimate of λ_min (an upper bound of the true one)
        self.fit_hvps = 0.0

    # ------------------------------------------------------------------ fit
    def fit(self, hessian: HessianOperator) -> LiSSACurvature:
        """Estimate the spectrum once: the top k + 1 eigenpairs (k = ``deflate``), λ_min, and
        the top eigenvalue of a few mini-batch Hessians on the complement (HVPs counted)."""
        t0, hvps0 = time.perf_counter(), hessian.num_hvps
        self._hessian = hessian
        M, n = hessian.shape[0], hessian.objective.n
        k = min(self.deflate, M - 1)
        self.b = min(self.batch_size or hessian.objective.batch_size, n)
        need_top = self.scale is None or k > 0
        lanczos_info: dict = {}
        if need_top and self.eigenpairs is not None:
            if not self.eigenpairs.fitted:
                self.eigenpairs.fit(hessian)
            values, vectors = self.eigenpairs.eigh(k + 1)
        elif need_top:
            values, vectors, lanczos_info = lanczos_top(hessian, k + 1, tol=self.lanczos_tol, seed=self.seed)
        if need_top:
            self.values, self.vectors = values[:k], vectors[:, :k]  # a view: no copy of shared eigenvectors
            self.lambda_top = float(values[k])
        if self.scale is None and self.b < n and self.scale_batches > 0:
            gen = torch.Generator().manual_seed(self.seed + 7919)
            basis = self.vectors if k > 0 else None
            tops = []
            for _ in range(self.scale_batches):
                idx = torch.randperm(n, generator=gen)[: self.b].sort().values
                v, _, _ = lanczos_top(_Operator(hessian, idx, basis), 1, tol=1e-2, max_iter=min(M, 30),
                                      basis_size=min(M, 6), seed=self.seed + 1)
                tops.append(float(v[0]))
            self.lambda_batch = max(tops)
        if self.check_curvature:  # λ_min sets the automatic depth and names negative curvature up front
            self.lambda_min = self._estimate_lambda_min()
        self.fit_hvps = hessian.num_hvps - hvps0
        self.fit_diagnostics = {
            "deflated": k, "lambda_deflated": None if self.values is None else self.values.tolist(),
            "lambda_top_complement": self.lambda_top, "lambda_top_minibatch": self.lambda_batch,
            "lambda_min_estimate": self.lambda_min, "batch_size": self.b, "fit_hvps": self.fit_hvps,
            "lanczos_iterations": lanczos_info.get("iterations"), "fit_seconds": time.perf_counter() - t0}
        self.diagnostics = dict(self.fit_diagnostics)
        return self

    def _estimate_lambda_min(self) -> float:
        """Ritz estimate of λ_min(H) by a short Lanczos run on −H (≥ the true λ_min)."""
        H = self.hessian
        v, _, _ = lanczos_top(_Operator(H, sign=-1.0), 1, tol=1e-3, max_iter=min(H.shape[0], 60), seed=self.seed + 2)
        return -float(v[0])

    # ------------------------------------------------------------------ parameters of one solve
    def scale_for(self, damping: float) -> float:
        """The scale s used with damping δ (the given ``scale``, or the automatic rule)."""
        if self.scale is not None:
            return float(self.scale)
        top = self.lambda_top + damping
        if self.lambda_batch is not None:
            top = max(top, (self.lambda_batch + damping) / 1.5)
        return self.scale_margin * max(top, 1e-12)

    def depth_for(self, damping: float, scale: float) -> tuple[int, int]:
        """(burn-in steps J, averaged tail steps) for damping δ and scale s."""
        if self.depth is not None:
            burn = self.depth
        else:
            mu = self.lambda_min + damping
            kappa = scale / mu if mu > 0 else float("inf")  # nan (no estimate) → max_depth
            burn = self.max_depth if not (mu > 0 and math.isfinite(kappa)) else math.ceil(kappa * math.log(1 / self.target))
        burn = max(1, min(burn, self.max_depth))
        return burn, int(round(self.tail_average * burn))

    def snapshot_for(self, damping: float, scale: float) -> int:
        """Steps between anchors of the control variate (default: two epochs, 2⌈n/b⌉)."""
        if self.snapshot_every is not None:
            return self.snapshot_every
        return 2 * math.ceil(self.hessian.objective.n / self.b)

    def _negative_curvature(self, damping: float, found: float | None = None) -> SolverDivergenceError:
        lam = self.lambda_min if found is None else min(found, self.lambda_min)
        return SolverDivergenceError(
            f"lissa: H + δI has negative curvature: λ_min(H) ≈ {lam:.6g} (Ritz estimate), so with damping "
            f"δ = {damping:.6g} the smallest eigenvalue of H + δI is ≈ {lam + damping:.6g} ≤ 0 and the recursion "
            f"grows without bound. Use a larger damping, ≥ {abs(lam) + 0.01:.4g} (|λ_min| + 0.01), or damping='auto'.")

    # ------------------------------------------------------------------ solve
    def solve(self, V: Tensor, damping: float) -> Tensor:
        """x ≈ (H + δI)⁻¹ V for ``V`` of shape ``(M, k)``; returns ``(M, k)``.

        Runs ``repeats`` recursions h_j = v_⊥ + P(I − (H_{B_j} + δI)/s)h_{j−1} on the
        complement of the deflated space, averages x = h_J/s over the runs and adds the
        exact solve V_k diag(1/(λ_i + δ)) V_kᵀ v on the deflated span. The columns are
        processed in blocks of the operator's ``max_vectors`` (every block sees the same
        mini-batch sequence, so the result does not depend on the blocking); the recursion
        holds about six (M, block) arrays, so ``max_vectors`` bounds the solver's memory.
        """
        H = self.hessian
        M = H.shape[0]
        if V.ndim != 2 or V.shape[0] != M:
            raise InputError(f"expected right-hand sides of shape (M, k) with M = {M}; got {tuple(V.shape)}.")
        if not torch.isfinite(V).all():
            raise InputError("the right-hand sides contain NaN or Inf.")
        damping = float(damping)
        t0, hvps0 = time.perf_counter(), H.num_hvps
        V = V.to(device=H.device, dtype=H.dtype)
        if self.lambda_min + damping <= 0:
            raise self._negative_curvature(damping)
        s = self.scale_for(damping)
        burn, tail = self.depth_for(damping, s)
        basis = self.vectors if self.vectors is not None and self.vectors.shape[1] > 0 else None
        if basis is not None:
            C = basis.T @ V
            if (self.values + damping <= 0).any():  # type: ignore[operator]
                raise self._negative_curvature(damping, float(self.values.min()))  # type: ignore[union-attr]
            X = basis @ (C / (self.values + damping).unsqueeze(1))  # type: ignore[operator]
            Vp = V - basis @ C
            del C
        else:
            X, Vp = torch.zeros_like(V), V

        blocks = torch.arange(V.shape[1], device=V.device).split(H.max_vectors)
        show = H.objective.progress if self.progress is None else self.progress
        total = len(blocks) * self.repeats * (burn + tail)
        bar = progress_bar(range(total), total=total, desc="lissa", enabled=show)
        steps_run: list[int] = []
        stopped_early = 0
        for block in blocks:
            X_block, runs, early = self._recursions(Vp[:, block], damping, s, burn, tail, basis, bar)
            X[:, block] += X_block
            steps_run += runs
            stopped_early += early
        for _ in bar:  # drain a bar left unfinished by an early stop
            pass
        del Vp
        lissa_hvps = H.num_hvps - hvps0
        diag = {**self.fit_diagnostics, "depth": burn, "tail_steps": tail, "steps_run": steps_run,
                "column_blocks": len(blocks),
                "stopped_early": stopped_early, "repeats": self.repeats, "scale": s, "damping": damping,
                "sampling": self.sampling, "lissa_hvps": lissa_hvps, "columns": V.shape[1]}
        if self.estimate_residual:
            R = H.matmat(X).add_(X, alpha=damping).sub_(V)
            rel = R.norm(dim=0) / V.norm(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
            diag["relative_residual_max"] = rel.max().item() if rel.numel() else 0.0
            diag["relative_residual_mean"] = rel.mean().item() if rel.numel() else 0.0
            if self.warn_residual is not None and diag["relative_residual_max"] > self.warn_residual:
                warnings.warn(
                    f"lissa: estimated relative residual ‖(H + δI)x − v‖/‖v‖ = {diag['relative_residual_max']:.2e} > "
                    f"{self.warn_residual:g} (depth {burn}, repeats {self.repeats}, batch_size {self.b}, scale {s:.4g}). "
                    "Use variance_reduction=True, more repeats or depth, a larger batch_size or a larger damping.",
                    RuntimeWarning, stacklevel=2)
        diag["hvps"] = H.num_hvps - hvps0
        diag["hvps_with_fit"] = diag["hvps"] + self.fit_hvps
        diag["seconds"] = time.perf_counter() - t0
        self.diagnostics = diag
        return X

    def _recursions(self, Vp: Tensor, damping: float, s: float, burn: int, tail: int, basis: Tensor | None,
                    bar) -> tuple[Tensor, list[int], int]:
        """(1/s)·(average over ``repeats`` runs of the recursion's tail-averaged iterate) for the
        projected right-hand sides ``Vp`` (M, b) — zero for a zero column — with the steps each
        run took and how many stopped early at ``rtol``."""
        H, n = self.hessian, self.hessian.objective.n

        def project_(X: Tensor) -> Tensor:  # in place: X ← (I − V_k V_kᵀ) X
            return X if basis is None else X.sub_(basis @ (basis.T @ X))

        v_norm = Vp.norm(dim=0)
        live = (v_norm > 0).to(Vp.dtype)
        v_ref = v_norm.clamp_min(torch.finfo(Vp.dtype).tiny)
        cols = Vp.shape[1]
        control = self.variance_reduction and self.b < n
        snapshot = self.snapshot_for(damping, s)
        anchor = H_anchor = Vp  # placeholders, set at the first step of each run
        gen = torch.Generator().manual_seed(int(self.seed))
        X_sum = torch.zeros_like(Vp)
        steps_run, stopped_early = [], 0
        for r in range(self.repeats):
            h = Vp.clone()
            acc = torch.zeros_like(Vp)
            n_acc = 0
            sampler = self._sampler(gen, n)
            last_checked = h.clone()
            j = 0
            for j in range(1, burn + tail + 1):
                next(bar, None)
                idx = next(sampler)
                if control:
                    if (j - 1) % snapshot == 0:  # new anchor h̃ with its exact full-data product
                        anchor = h.clone()
                        H_anchor = project_(H.matmat(anchor))
                    both = H.minibatch_matmat(torch.cat([h, anchor], dim=1), idx)
                    step = project_(both[:, :cols] - both[:, cols:]).add_(H_anchor)
                    del both
                elif self.b >= n:  # every step is the full data: the operator's graph cache applies
                    step = project_(H.matmat(h))
                else:
                    step = project_(H.minibatch_matmat(h, idx))
                h_new = step.add_(h, alpha=damping).div_(-s).add_(h).add_(Vp)  # v + h − (H_B h + δh)/s
                if j % self.check_every == 0 or j == burn + tail:
                    norms = h_new.norm(dim=0)
                    if not torch.isfinite(h_new).all() or bool((norms > self.growth_limit * (j + 1) * v_ref).any()):
                        self._diverged(last_checked, damping, s, j, r)
                    last_checked.copy_(h_new)
                    if (self.rtol is not None and j >= 1
                            and bool(((h_new - h).norm(dim=0) <= self.rtol * v_ref).all())):
                        h = project_(h_new)
                        stopped_early += 1
                        acc, n_acc = h, 1  # the early-stopped iterate replaces any partial average
                        break
                h = project_(h_new)
                if j > burn:
                    acc.add_(h)
                    n_acc += 1
            steps_run.append(j)
            X_sum.add_(acc / n_acc if n_acc else h, alpha=1 / s)
        return X_sum.div_(self.repeats).mul_(live), steps_run, stopped_early

    def _sampler(self, gen: torch.Generator, n: int):
        """Endless stream of sorted index tensors of size b (full data when b = n)."""
        b = self.b
        if b >= n:
            full = torch.arange(n)
            while True:
                yield full
        if self.sampling == "replacement":
            while True:
                yield torch.randperm(n, generator=gen)[:b].sort().values
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - b + 1, b):
                yield perm[i:i + b].sort().values

    def _diverged(self, h: Tensor, damping: float, s: float, step: int, run: int) -> None:
        """Name the cause of a growing recursion from the Rayleigh quotient of its fastest-growing
        column (one full-data HVP) and raise."""
        H = self.hessian
        norms = h.norm(dim=0)
        col = int(torch.nan_to_num(norms, nan=-1.0, posinf=-1.0).argmax())
        u = h[:, col]
        where = f"lissa diverged at step {step} of run {run + 1} (scale s = {s:.6g}, damping δ = {damping:.6g})"
        q = None
        if torch.isfinite(u).all() and u.norm() > 0:
            u = u / u.norm()
            if self.vectors is not None and self.vectors.shape[1] > 0:
                u = u - self.vectors @ (self.vectors.T @ u)
                u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
            q = float(u @ H.matvec(u))  # Rayleigh quotient of H along the growing direction
        lam_hi = max(v for v in (self.lambda_top, self.lambda_batch, q) if v is not None and math.isfinite(v)) \
            if any(v is not None and math.isfinite(v) for v in (self.lambda_top, self.lambda_batch, q)) else None
        if q is not None and q + damping <= 0:
            if not math.isfinite(self.lambda_min):  # name the full negative curvature, not just this direction's
                self.lambda_min = self._estimate_lambda_min()
            err = self._negative_curvature(damping, q)
            raise SolverDivergenceError(f"{where}: {str(err).removeprefix('lissa: ')}")
        if q is not None and q + damping >= s:
            suggested = max(2 * s, 1.1 * (max(q, lam_hi or q) + damping))
            raise SolverDivergenceError(
                f"{where}: the scale is too small — the growing direction has curvature qᵀ(H + δI)q ≈ "
                f"{q + damping:.6g} ≥ s, so |1 − (λ + δ)/s| > 1 there. Use scale ≥ {suggested:.6g} (or scale=None "
                f"for the automatic λ_max estimate).")
        suggested = 2 * s if lam_hi is None else max(2 * s, 1.5 * (lam_hi + damping))
        raise SolverDivergenceError(
            f"{where}: ‖h_j‖ exceeded {self.growth_limit:g}·(j + 1)·‖v‖. Likely the mini-batch Hessians are too "
            f"noisy for this scale (their curvature exceeds 2s or has λ + δ ≤ 0). Use scale ≥ {suggested:.6g}, a "
            f"larger batch_size, or a larger damping (negative curvature makes the recursion grow without bound; "
            f"the estimated λ_min(H) is {self.lambda_min:.6g}, so damping ≥ {abs(self.lambda_min) + 0.01:.4g}).")
