"""The exact dense backend: the correctness oracle for small models.

C is assembled column block by column block from batched products, symmetrised,
C ← (C + Cᵀ)/2, and diagonalised once in float64, C = Q Λ Qᵀ. Then exactly

.. math::

    (C + δI)^{-1} V = Q\\,\\mathrm{diag}\\big(1/(λ_j + δ)\\big)\\,Q^T V,

and the top-m eigenpairs are the last m columns of Q (reversed). Cost: ⌈M / chunk⌉ passes
over the data and one O(M³) eigendecomposition; memory ≈ 3.5 float64 M × M matrices (C, its
eigenvectors, LAPACK's workspace) — refused up front, naming the size, when they would not fit.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import DenseTooLargeError
from ..memory import available_bytes, format_bytes
from ..operators import CurvatureOperator
from .base import CurvatureBackend, State, expect_shape

# C, its eigenvectors and LAPACK's workspace, in float64, plus a working copy in the model dtype.
_DENSE_MATRICES = 3.5


def dense_bytes(M: int) -> int:
    """Memory the dense path needs for M parameters (≈ 3.5 float64 M × M matrices)."""
    return int(_DENSE_MATRICES * 8 * M * M)


class DenseCurvature(CurvatureBackend):
    """Exact eigendecomposition of the full curvature matrix.

    Parameters
    ----------
    chunk:
        Basis vectors per pass over the data during assembly (default: the operator's
        ``max_vectors``).
    max_memory:
        Bytes the dense matrices may use; default: what the device has available.
    cache_graphs:
        Keep each training chunk's gradient graph during assembly (see
        :meth:`HessianOperator.cached_graphs`): faster, but holds the graphs of all training
        data in memory at once; switch off for large n.
    """

    name = "dense"
    roles = frozenset({"inverse", "eigen"})

    def __init__(self, chunk: int | None = None, max_memory: int | None = None, cache_graphs: bool = True) -> None:
        super().__init__()
        self.chunk = chunk
        self.max_memory = max_memory
        self.cache_graphs = cache_graphs
        self.eigenvalues: Tensor | None = None   # (M,) ascending, float64
        self.eigenvectors: Tensor | None = None  # (M, M) float64, columns

    required_bytes = staticmethod(dense_bytes)

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        M = operator.shape[0]
        return {"dense_matrices": dense_bytes(M), "solve_work": 2 * 8 * M * columns}

    def _guard(self, operator: CurvatureOperator) -> None:
        M = operator.shape[0]
        need = dense_bytes(M)
        have = self.max_memory if self.max_memory is not None else available_bytes(operator.device)
        if need > have:
            raise DenseTooLargeError(
                f"the dense {operator.kind} of M = {M:,} parameters needs about {format_bytes(need)} "
                f"(M² float64 numbers for the matrix, its eigenvectors and LAPACK workspace), but only "
                f"{format_bytes(have)} is available on {operator.device}. Use the matrix-free backends "
                "instead: inverse='cg' or 'lissa' (or 'kfac'/'ekfac') and eigen='lanczos'."
            )

    def fit(self, operator: CurvatureOperator) -> DenseCurvature:
        self._guard(operator)
        t0 = time.perf_counter()
        hvps0 = operator.num_hvps
        if self.cache_graphs:
            with operator.cached_graphs():
                C = operator.dense(self.chunk).to(torch.float64)
        else:
            C = operator.dense(self.chunk).to(torch.float64)
        asym = ((C - C.T).norm() / C.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()
        C = 0.5 * (C + C.T)
        evals, evecs = torch.linalg.eigh(C)
        del C
        self.eigenvalues, self.eigenvectors = evals, evecs
        self._mark_fitted(operator)
        self.diagnostics = {
            "hvps": operator.num_hvps - hvps0,
            "relative_asymmetry": asym,
            "lambda_min": evals[0].item(),
            "lambda_max": evals[-1].item(),
            "seconds": time.perf_counter() - t0,
        }
        return self

    def state_dict(self) -> State:
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors, "diagnostics": dict(self.diagnostics)}

    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        M = operator.shape[0]
        expect_shape(state["eigenvalues"], (M,), "eigenvalues")
        expect_shape(state["eigenvectors"], (M, M), "eigenvectors")
        self.eigenvalues, self.eigenvectors = state["eigenvalues"], state["eigenvectors"]
        self.diagnostics = dict(state["diagnostics"])
        self._mark_fitted(operator)

    def _spectrum(self) -> tuple[Tensor, Tensor]:
        if self.eigenvalues is None or self.eigenvectors is None:
            self.operator  # raises the "not fitted" error
        return self.eigenvalues, self.eigenvectors  # type: ignore[return-value]

    def solve(self, V: Tensor, damping: float) -> Tensor:
        evals, Q = self._spectrum()
        self.check_damping(damping)
        V64 = V.to(torch.float64)
        out = Q @ ((Q.T @ V64) / (evals + damping).unsqueeze(1))
        return out.to(V.dtype)

    def inverse_quadratic(self, G: Tensor, damping: float) -> Tensor:
        """Σ_j (q_jᵀ g)² / (λ_j + δ) for each row g of ``G``."""
        evals, Q = self._spectrum()
        self.check_damping(damping)
        coeff = G.to(torch.float64) @ Q
        return (coeff.square() / (evals + damping)).sum(dim=1).to(G.dtype)

    def eigh(self, m: int) -> tuple[Tensor, Tensor]:
        self._check_m(m)
        evals, Q = self._spectrum()
        dtype = self.operator.dtype
        M = evals.numel()
        idx = torch.arange(M - 1, M - 1 - m, -1, device=evals.device)
        return evals[idx].to(dtype), Q[:, idx].to(dtype)

    def min_eigenvalue(self) -> float:
        return self._spectrum()[0][0].item()

