"""Top eigenpairs of H by Lanczos with full reorthogonalisation, and a low-rank inverse.

Lanczos builds an orthonormal basis Q_k of the Krylov space span{q, Hq, …, H^{k−1}q} in
which H is tridiagonal, T_k = Q_kᵀ H Q_k; the Ritz pairs (θ_i, Q_k s_i) of T_k converge
first at the ends of the spectrum. Every new vector is reorthogonalised against all
previous ones (twice, "twice is enough"), which keeps Q_k orthonormal to round-off and
avoids ghost eigenvalues. A Ritz pair has residual ‖H y_i − θ_i y_i‖ = |β_k s_{k,i}|;
iteration stops when the top m residuals are below ``tol · |θ_1|``.

Backends: ``"torch"`` (any device, the default), ``"scipy"`` (ARPACK ``eigsh`` through
the LinearOperator adapter) and ``"cupy"`` (``cupyx.scipy.sparse.linalg.eigsh`` on CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, SolverDivergenceError
from ..hessian import HessianOperator
from .base import CurvatureBackend

_METHODS = ("torch", "scipy", "cupy")


StopRule = Callable[[list, list, float], bool]


def lanczos_tridiagonal(hessian: HessianOperator, start: Tensor, max_iter: int, *,
                        stop: StopRule | None = None,
                        restart: torch.Generator | None = None) -> tuple[list[float], list[float], Tensor]:
    """Lanczos with full reorthogonalisation from ``start`` (M,).

    Returns the diagonal α (k,) and off-diagonal β (k−1,) of T_k = Q_kᵀ H Q_k and the basis
    Q_k (M, k). After each step ``stop(alphas, betas, β_next)`` may end the iteration. When
    the Krylov space becomes invariant (β ≈ 0), iteration ends, or, given a ``restart``
    generator, continues from a fresh random vector orthogonal to Q_k (β = 0 in T).
    """
    M = hessian.shape[0]
    dtype, device = hessian.dtype, hessian.device
    Q = torch.empty(M, max_iter + 1, dtype=dtype, device=device)
    Q[:, 0] = start.to(device=device, dtype=dtype) / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max_iter):
        w = hessian.matvec(Q[:, j])
        alphas.append(torch.dot(w, Q[:, j]).item())
        basis = Q[:, : j + 1]
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - basis @ (basis.T @ w)
        beta = w.norm().item()
        k = j + 1
        if k == max_iter or (stop is not None and stop(alphas, betas, beta)):
            break
        if beta <= 1e-12 * max(1.0, max(abs(a) for a in alphas)):
            if restart is None:
                break
            # Invariant Krylov space (repeated eigenvalues, e.g. a null space): continue in its complement.
            w = torch.randn(M, generator=restart, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(2):
                w = w - basis @ (basis.T @ w)
            beta_next, w = 0.0, w / w.norm()
        else:
            beta_next, w = beta, w / beta
        betas.append(beta_next)
        Q[:, j + 1] = w
    return alphas, betas, Q[:, : len(alphas)]


def tridiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    """The symmetric tridiagonal matrix T with diagonal α and off-diagonal β."""
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def lanczos_top(hessian: HessianOperator, m: int, *, tol: float = 1e-10, max_iter: int | None = None,
                seed: int = 0, check_every: int = 5) -> tuple[Tensor, Tensor, dict]:
    """Top-m eigenpairs (algebraically largest first) of the symmetric operator ``hessian``.

    Iterates until the top m Ritz residuals |β_k s_{k,i}| are ≤ tol·|θ_1| (checked every
    ``check_every`` steps). Returns values ``(m,)``, orthonormal vectors ``(M, m)`` and
    diagnostics (iterations, HVPs, the largest relative Ritz residual).
    """
    M = hessian.shape[0]
    if not 1 <= m <= M:
        raise InputError(f"m must lie in [1, {M}]; got {m}.")
    max_iter = min(M, max_iter or max(2 * m + 20, 50))
    gen = torch.Generator().manual_seed(seed)
    hvps0 = hessian.num_hvps
    state: dict = {"residual": float("inf")}

    def converged(alphas: list, betas: list, beta: float) -> bool:
        k = len(alphas)
        if k < m or (k % check_every and k != max_iter):
            return False
        theta, S = np.linalg.eigh(tridiagonal(alphas, betas))
        top = S[:, ::-1][:, :m]
        state["residual"] = float(np.max(np.abs(beta * top[-1, :])) / max(abs(theta[-1]), 1e-300))
        return state["residual"] <= tol

    start = torch.randn(M, generator=gen, dtype=torch.float64)
    alphas, betas, Q = lanczos_tridiagonal(hessian, start, max_iter, stop=converged, restart=gen)
    if len(alphas) < m:
        raise SolverDivergenceError(f"Lanczos stopped after {len(alphas)} iterations with fewer than m = {m} Ritz "
                                    "pairs; raise max_iter.")
    theta, S = np.linalg.eigh(tridiagonal(alphas, betas))
    values, small = theta[::-1][:m].copy(), S[:, ::-1][:, :m].copy()
    vectors = Q @ torch.as_tensor(small, dtype=hessian.dtype, device=hessian.device)
    info = {"iterations": len(alphas), "hvps": hessian.num_hvps - hvps0,
            "max_relative_residual": state["residual"], "converged": state["residual"] <= tol}
    return torch.as_tensor(values, dtype=hessian.dtype, device=hessian.device), vectors, info


def _arpack_top(hessian: HessianOperator, m: int, tol: float, seed: int) -> tuple[Tensor, Tensor, dict]:
    from scipy.sparse.linalg import eigsh

    hvps0 = hessian.num_hvps
    v0 = np.random.default_rng(seed).standard_normal(hessian.shape[0])
    values, vectors = eigsh(hessian.to_scipy(), k=m, which="LA", tol=tol, v0=v0)
    order = np.argsort(values)[::-1]
    info = {"hvps": hessian.num_hvps - hvps0, "method": "scipy"}
    return (torch.as_tensor(values[order].copy(), dtype=hessian.dtype, device=hessian.device),
            torch.as_tensor(vectors[:, order].copy(), dtype=hessian.dtype, device=hessian.device), info)


def _cupy_top(hessian: HessianOperator, m: int, tol: float, seed: int) -> tuple[Tensor, Tensor, dict]:
    import cupy
    from cupyx.scipy.sparse.linalg import eigsh

    hvps0 = hessian.num_hvps
    values, vectors = eigsh(hessian.to_cupy(), k=m, which="LA", tol=tol)
    order = cupy.argsort(values)[::-1]
    info = {"hvps": hessian.num_hvps - hvps0, "method": "cupy"}
    return (torch.from_dlpack(values[order].copy()).to(hessian.dtype),
            torch.from_dlpack(vectors[:, order].copy()).to(hessian.dtype), info)


class LanczosCurvature(CurvatureBackend):
    """Top-m eigenpairs of H (matrix-free), for LEES and as the basis of a low-rank inverse.

    Parameters
    ----------
    m:
        Eigenpairs computed by ``fit`` (``eigh`` with a larger m recomputes).
    tol:
        Relative Ritz-residual tolerance.
    max_iter:
        Lanczos iterations at most (default max(2m + 20, 50), capped at M).
    seed:
        Seed of the start vector.
    method:
        ``"torch"``, ``"scipy"`` or ``"cupy"``.
    """

    name = "lanczos"

    def __init__(self, m: int = 20, tol: float = 1e-10, max_iter: int | None = None, seed: int = 0,
                 method: str = "torch") -> None:
        super().__init__()
        if method not in _METHODS:
            raise InputError(f"method must be one of {_METHODS}; got {method!r}.")
        self.m, self.tol, self.max_iter, self.seed, self.method = int(m), tol, max_iter, seed, method
        self.values: Tensor | None = None
        self.vectors: Tensor | None = None

    def _compute(self, m: int) -> None:
        t0 = time.perf_counter()
        if self.method == "torch":
            values, vectors, info = lanczos_top(self.hessian, m, tol=self.tol, max_iter=self.max_iter, seed=self.seed)
        elif self.method == "scipy":
            values, vectors, info = _arpack_top(self.hessian, m, self.tol, self.seed)
        else:
            values, vectors, info = _cupy_top(self.hessian, m, self.tol, self.seed)
        self.values, self.vectors = values, vectors
        self.diagnostics = {**info, "m": m, "seconds": time.perf_counter() - t0}

    def fit(self, hessian: HessianOperator) -> LanczosCurvature:
        self._hessian = hessian
        self._compute(min(self.m, hessian.shape[0]))
        return self

    def eigh(self, m: int) -> tuple[Tensor, Tensor]:
        self._check_m(m)
        if m == 0:
            M = self.hessian.shape[0]
            return (torch.empty(0, dtype=self.hessian.dtype, device=self.hessian.device),
                    torch.empty(M, 0, dtype=self.hessian.dtype, device=self.hessian.device))
        if self.values is None or self.values.numel() < m:
            self._compute(m)
        return self.values[:m], self.vectors[:, :m]  # type: ignore[index]


class LowRankCurvature(LanczosCurvature):
    """Low-rank-plus-damping inverse from the top-m eigenpairs V_m, Λ_m:

    .. math::

        (H + δI)^{-1} ≈ V_m\\,\\mathrm{diag}\\big(1/(λ_i + δ)\\big) V_m^T + \\tfrac1δ (I − V_m V_m^T),

    exact on span(V_m), and treating the rest of the spectrum as 0 (the flat directions).
    """

    name = "lowrank"

    def solve(self, V: Tensor, damping: float) -> Tensor:
        if damping <= 0:
            raise InputError("the low-rank inverse needs damping δ > 0 (it treats the unresolved spectrum as 0).")
        values, vectors = self.eigh(self.m if self.values is None else self.values.numel())
        coeff = vectors.T @ V
        return vectors @ (coeff / (values + damping).unsqueeze(1)) + (V - vectors @ coeff) / damping
