"""Top eigenpairs of a symmetric operator A (the curvature C, or −C, or a projection of it)
by Lanczos with full reorthogonalisation.

Lanczos builds an orthonormal basis Q_k of the Krylov space span{q, Aq, …, A^{k−1}q} in
which A is tridiagonal, T_k = Q_kᵀ A Q_k; the Ritz pairs (θ_i, Q_k s_i) of T_k converge
first at the ends of the spectrum. Every new vector is reorthogonalised against all
previous ones (twice, "twice is enough"), which keeps Q_k orthonormal to round-off and
avoids ghost eigenvalues. A Ritz pair has residual ‖A y_i − θ_i y_i‖ = |β_k s_{k,i}|;
iteration stops when the top m residuals are below ``tol · |θ_1|``. The top-m solver
restarts thickly (keeping the leading Ritz vectors) so that it never holds more than
``basis_size`` vectors; stochastic Lanczos quadrature uses the plain tridiagonal recursion.

Backends: ``"torch"`` (any device, the default), ``"scipy"`` (ARPACK ``eigsh`` through
the LinearOperator adapter) and ``"cupy"`` (``cupyx.scipy.sparse.linalg.eigsh`` on CUDA).
Cost of a top-m fit: about 20m products or fewer (Ritz convergence), memory basis_size·M.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..operators import CurvatureOperator, LinearOperator, Scaled
from ..validation import check_choice, check_integer, check_number
from .base import CurvatureBackend, State, expect_shape

_METHODS = ("torch", "scipy", "cupy")


StopRule = Callable[[list, list, float], bool]


def lanczos_tridiagonal(operator: LinearOperator, start: Tensor, max_iter: int, *,
                        stop: StopRule | None = None,
                        restart: torch.Generator | None = None) -> tuple[list[float], list[float], Tensor]:
    """Lanczos with full reorthogonalisation from ``start`` (M,).

    Returns the diagonal α (k,) and off-diagonal β (k−1,) of T_k = Q_kᵀ A Q_k and the basis
    Q_k (M, k). After each step ``stop(alphas, betas, β_next)`` may end the iteration. When
    the Krylov space becomes invariant (β ≈ 0), iteration ends, or, given a ``restart``
    generator, continues from a fresh random vector orthogonal to Q_k (β = 0 in T).
    """
    M = operator.shape[0]
    dtype, device = operator.dtype, operator.device
    Q = torch.empty(M, max_iter + 1, dtype=dtype, device=device)
    Q[:, 0] = start.to(device=device, dtype=dtype) / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max_iter):
        w = operator.matvec(Q[:, j])
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


def basis_size_for(m: int, basis_size: int | None = None) -> int:
    """Vectors the thick-restart Lanczos holds for m eigenpairs: ``basis_size`` or, by
    default, max(2m + 1, m + 10) — ARPACK's default for m ≥ 9, which keeps restarts few (the peak
    memory of a top-m fit is this many M-vectors)."""
    return basis_size or max(2 * m + 1, m + 10)


class _Basis:
    """The Lanczos basis Q (M × k_max) stored as two allocations, the first m columns
    ("head") and the rest ("tail"), so that the m Ritz vectors can be formed in place in
    the head and the tail freed: the peak is k_max vectors and the result holds only m."""

    _ROWS = 1 << 16  # rows per block of an in-place rotation (k_max · 64 Ki entries of scratch)

    def __init__(self, M: int, m: int, k_max: int, dtype: torch.dtype, device: torch.device) -> None:
        self.m = min(m, k_max)
        self.head = torch.empty(M, self.m, dtype=dtype, device=device)
        self.tail = torch.empty(M, k_max - self.m, dtype=dtype, device=device)

    def _blocks(self, k: int) -> tuple[Tensor, Tensor]:
        return self.head[:, :min(k, self.m)], self.tail[:, :max(0, k - self.m)]

    def column(self, j: int) -> Tensor:
        return self.head[:, j] if j < self.m else self.tail[:, j - self.m]

    def set_column(self, j: int, v: Tensor) -> None:
        self.column(j).copy_(v)

    def coefficients(self, w: Tensor, k: int) -> Tensor:
        """Q[:, :k]ᵀ w, shape (k,)."""
        head, tail = self._blocks(k)
        return torch.cat([head.T @ w, tail.T @ w])

    def combine(self, c: Tensor, k: int) -> Tensor:
        """Q[:, :k] c, shape (M,)."""
        head, tail = self._blocks(k)
        return head @ c[:head.shape[1]] + tail @ c[head.shape[1]:]

    def orthogonalise(self, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """w − Q Qᵀ w against the first k columns, twice ("twice is enough"); returns the
        result and the summed coefficients Qᵀ w."""
        coeff = self.coefficients(w, k)
        w = w - self.combine(coeff, k)
        again = self.coefficients(w, k)
        return w - self.combine(again, k), coeff + again

    def rotate(self, S: Tensor, k: int) -> None:
        """Q[:, :p] ← Q[:, :k] S for S of shape (k, p), in place by blocks of rows."""
        p = S.shape[1]
        head, tail = self._blocks(k)
        for r0 in range(0, head.shape[0], self._ROWS):
            rows = slice(r0, r0 + self._ROWS)
            new = torch.cat([head[rows], tail[rows]], dim=1) @ S
            self.head[rows, :min(p, self.m)] = new[:, :self.m]
            if p > self.m:
                self.tail[rows, :p - self.m] = new[:, self.m:]

    def release_head(self) -> Tensor:
        """Free the tail and hand over the head (M × m)."""
        self.tail = self.tail.new_empty(0, 0)
        return self.head


def lanczos_top(operator: LinearOperator, m: int, *, tol: float = 1e-10, max_iter: int | None = None,
                seed: int = 0, basis_size: int | None = None) -> tuple[Tensor, Tensor, dict]:
    """Top-m eigenpairs (algebraically largest first) of the symmetric ``operator`` A
    by thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation.

    At most ``basis_size`` vectors of length M are held (default max(2m + 1, m + 10)), so the
    memory is O(m·M) however many iterations convergence takes. Each step appends
    A q_j orthogonalised (twice) against the basis Q and records the projections as
    column j of T = QᵀAQ. When the basis is full, Rayleigh–Ritz on T keeps the leading
    Ritz vectors Y = QS, and the last residual direction continues the Krylov space
    (T becomes diag(θ) bordered by the coupling β·S_{k,:}). A Ritz pair's residual is
    ‖A y_i − θ_i y_i‖ = β|S_{k,i}|; iteration stops when the top m are ≤ tol·|θ_1| or after
    ``max_iter`` HVPs (default max(50, 20m)). The Ritz vectors are formed in place, so the
    peak memory is ``basis_size`` vectors and the result keeps m. Returns values ``(m,)``,
    orthonormal vectors ``(M, m)`` and diagnostics (HVPs, restarts, the largest relative
    Ritz residual).
    """
    M = operator.shape[0]
    if not 1 <= m <= M:
        raise InputError(f"m must lie in [1, {M}]; got {m}.")
    k_max = min(M, basis_size_for(m, basis_size))
    if k_max <= m and k_max < M:
        raise InputError(f"basis_size must exceed m = {m}; got {basis_size}.")
    max_iter = max_iter or max(50, 20 * m)
    dtype, device = operator.dtype, operator.device
    gen = torch.Generator().manual_seed(seed)

    def random_direction() -> Tensor:
        return torch.randn(M, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    Q = _Basis(M, m, k_max, dtype, device)
    T = np.zeros((k_max, k_max))
    q = random_direction()
    Q.set_column(0, q / q.norm())
    hvps0 = operator.num_hvps
    k, steps, restarts = 1, 0, 0  # k: basis vectors held; the last one is expanded next
    residual = float("inf")
    while True:
        w = operator.matvec(Q.column(k - 1))
        steps += 1
        w, coeff = Q.orthogonalise(w, k)
        column = coeff.to(torch.float64).cpu().numpy()
        T[:k, k - 1] = column
        T[k - 1, :k] = column
        beta = w.norm().item()
        invariant = beta <= 1e-12 * max(1.0, float(np.abs(np.diag(T)[:k]).max()))
        full = k == k_max
        if not (full or invariant or steps >= max_iter):
            Q.set_column(k, w / beta)
            T[k, k - 1] = T[k - 1, k] = beta
            k += 1
            continue
        theta, S = np.linalg.eigh(T[:k, :k])
        theta, S = theta[::-1], S[:, ::-1]
        top = min(m, k)
        residual = float(np.max(np.abs(beta * S[k - 1, :top])) / max(abs(theta[0]), 1e-300))
        if k >= m and (residual <= tol or steps >= max_iter or k == M):
            break
        if invariant and not full:
            # invariant Krylov space (repeated eigenvalues, e.g. a null space): grow it with a fresh direction
            w, _ = Q.orthogonalise(random_direction(), k)
            Q.set_column(k, w / w.norm())
            k += 1
            continue
        # thick restart: keep the leading p Ritz vectors and continue from the residual direction
        p = min(k - 1, m + (k_max - m) // 2)
        Q.rotate(torch.as_tensor(S[:, :p].copy(), dtype=dtype, device=device), k)
        coupling = 0.0 if invariant else beta
        T[:] = 0.0
        T[np.arange(p), np.arange(p)] = theta[:p]
        T[p, :p] = T[:p, p] = coupling * S[k - 1, :p]
        if invariant:
            w, _ = Q.orthogonalise(random_direction(), p)
            w = w / w.norm()
        else:
            w = w / beta
        Q.set_column(p, w)
        k = p + 1
        restarts += 1
    values = theta[:m].copy()
    Q.rotate(torch.as_tensor(S[:, :m].copy(), dtype=dtype, device=device), k)
    vectors = Q.release_head()
    info = {"iterations": steps, "hvps": operator.num_hvps - hvps0, "restarts": restarts, "basis_size": k_max,
            "max_relative_residual": residual, "converged": residual <= tol}
    return torch.as_tensor(values, dtype=dtype, device=device), vectors, info


def _arpack_top(operator: CurvatureOperator, m: int, tol: float, seed: int) -> tuple[Tensor, Tensor, dict]:
    from scipy.sparse.linalg import eigsh

    hvps0 = operator.num_hvps
    v0 = np.random.default_rng(seed).standard_normal(operator.shape[0])
    values, vectors = eigsh(operator.to_scipy(), k=m, which="LA", tol=tol, v0=v0)
    order = np.argsort(values)[::-1]
    info = {"hvps": operator.num_hvps - hvps0, "method": "scipy"}
    return (torch.as_tensor(values[order].copy(), dtype=operator.dtype, device=operator.device),
            torch.as_tensor(vectors[:, order].copy(), dtype=operator.dtype, device=operator.device), info)


def _cupy_top(operator: CurvatureOperator, m: int, tol: float, seed: int) -> tuple[Tensor, Tensor, dict]:
    import cupy
    from cupyx.scipy.sparse.linalg import eigsh

    hvps0 = operator.num_hvps
    v0 = cupy.asarray(np.random.default_rng(seed).standard_normal(operator.shape[0]))
    values, vectors = eigsh(operator.to_cupy(), k=m, which="LA", tol=tol, v0=v0)
    order = cupy.argsort(values)[::-1]
    info = {"hvps": operator.num_hvps - hvps0, "method": "cupy"}
    return (torch.from_dlpack(values[order].copy()).to(operator.dtype),
            torch.from_dlpack(vectors[:, order].copy()).to(operator.dtype), info)


def smallest_eigenvalue(operator: LinearOperator, *, tol: float = 1e-6, max_iter: int | None = None,
                        seed: int = 0) -> tuple[float, dict]:
    """λ_min of a symmetric operator as the top eigenvalue of −A by thick-restart Lanczos.

    The Ritz value is an upper bound of the true λ_min that converges to it; ``tol`` is the
    relative Ritz residual (relative to |λ_min|). Returns the value and the Lanczos diagnostics.
    This is how ``damping="auto"`` finds λ_min when no backend knows it exactly.
    """
    M = operator.shape[0]
    values, _, info = lanczos_top(Scaled(operator, -1.0), 1, tol=tol, seed=seed,
                                  max_iter=max_iter or min(max(50, M), 1000), basis_size=min(M, 20))
    return -float(values[0]), info


class LanczosCurvature(CurvatureBackend):
    """Top-m eigenpairs of C (matrix-free), for LEES and as the basis of a low-rank inverse.

    Parameters
    ----------
    m:
        Eigenpairs computed by ``fit`` (``eigh`` with a larger m recomputes).
    tol:
        Relative Ritz-residual tolerance.
    max_iter:
        Operator products at most (default max(50, 20m)).
    basis_size:
        Lanczos vectors held at once (default max(2m + 1, m + 10)); memory is basis_size·M.
    seed:
        Seed of the start vector.
    method:
        ``"torch"``, ``"scipy"`` (ARPACK) or ``"cupy"``.
    """

    name = "lanczos"
    roles = frozenset({"eigen"})

    def __init__(self, m: int = 20, tol: float = 1e-10, max_iter: int | None = None, seed: int = 0,
                 method: str = "torch", basis_size: int | None = None) -> None:
        super().__init__()
        check_choice("method", method, _METHODS, where=self.name)
        check_integer("m", m, 1, where=self.name)
        check_number("tol", tol, high=1, strict=True, where=self.name)
        check_integer("max_iter", max_iter, 1, allow_none=True, where=self.name)
        check_integer("basis_size", basis_size, 1, allow_none=True, where=self.name)
        check_integer("seed", seed, where=self.name)
        self.m, self.tol, self.max_iter, self.seed, self.method = m, float(tol), max_iter, seed, method
        self.basis_size = basis_size
        self.values: Tensor | None = None
        self.vectors: Tensor | None = None

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        M = operator.shape[0]
        return {"lanczos_basis": min(M, basis_size_for(self.m, self.basis_size)) * M * operator.dtype.itemsize}

    def _compute(self, m: int) -> None:
        t0 = time.perf_counter()
        operator = self.operator
        if self.method == "torch":
            values, vectors, info = lanczos_top(operator, m, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
                                                basis_size=self.basis_size)
        elif self.method == "scipy":
            values, vectors, info = _arpack_top(operator, m, self.tol, self.seed)
        else:
            values, vectors, info = _cupy_top(operator, m, self.tol, self.seed)
        self.values, self.vectors = values, vectors
        self.diagnostics = {**info, "m": m, "seconds": time.perf_counter() - t0}

    def fit(self, operator: CurvatureOperator) -> LanczosCurvature:
        self._mark_fitted(operator)
        self._compute(min(self.m, operator.shape[0]))
        return self

    def state_dict(self) -> State:
        return {"values": self.values, "vectors": self.vectors, "diagnostics": dict(self.diagnostics)}

    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        if state["values"] is None or state["vectors"] is None:
            raise ValueError("no eigenpairs stored")
        expect_shape(state["vectors"], (operator.shape[0], state["values"].numel()), "vectors")
        self.values, self.vectors = state["values"], state["vectors"]
        self.diagnostics = dict(state["diagnostics"])
        self._mark_fitted(operator)

    def eigh(self, m: int) -> tuple[Tensor, Tensor]:
        self._check_m(m)
        operator = self.operator
        if m == 0:
            M = operator.shape[0]
            return (torch.empty(0, dtype=operator.dtype, device=operator.device),
                    torch.empty(M, 0, dtype=operator.dtype, device=operator.device))
        if self.values is None or self.values.numel() < m:
            self._compute(m)
        return self.values[:m], self.vectors[:, :m]  # type: ignore[index]
