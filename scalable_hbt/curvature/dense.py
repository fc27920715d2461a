"""The exact dense backend: the correctness oracle for small models.

H is assembled column block by column block from batched HVPs, symmetrised,
H ← (H + Hᵀ)/2, and diagonalised once in float64, H = Q Λ Qᵀ. Then exactly

.. math::

    (H + δI)^{-1} V = Q\\,\\mathrm{diag}\\big(1/(λ_j + δ)\\big)\\,Q^T V,

and the top-m eigenpairs are the last m columns of Q (reversed). Refuses up front,
naming the size, when the M × M matrices would not fit.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import DenseTooLargeError, IndefiniteDampingError
from ..hessian import HessianOperator
from ..memory import available_bytes, format_bytes
from .base import CurvatureBackend

# H, its eigenvectors and LAPACK's workspace, in float64, plus a working copy in the model dtype.
_DENSE_MATRICES = 3.5


class DenseCurvature(CurvatureBackend):
    """Exact eigendecomposition of the full Hessian.

    Parameters
    ----------
    chunk:
        Basis vectors per pass over the data during assembly (default: the operator's
        ``max_vectors``).
    max_memory:
        Bytes the dense matrices may use; default: what the device has available.
    cache_graphs:
        Keep each training chunk's gradient graph during assembly (see
        :meth:`HessianOperator.cached_graphs`): ≈ 2× faster, but holds the graphs of all
        training data in memory at once; switch off for large n.
    """

    name = "dense"

    def __init__(self, chunk: int | None = None, max_memory: int | None = None, cache_graphs: bool = True) -> None:
        super().__init__()
        self.chunk = chunk
        self.max_memory = max_memory
        self.cache_graphs = cache_graphs
        self.eigenvalues: Tensor | None = None   # (M,) ascending, float64
        self.eigenvectors: Tensor | None = None  # (M, M) float64, columns

    @staticmethod
    def required_bytes(M: int) -> int:
        """Memory the dense path needs for M parameters (≈ 3.5 float64 M × M matrices)."""
        return int(_DENSE_MATRICES * 8 * M * M)

    def _guard(self, hessian: HessianOperator) -> None:
        M = hessian.shape[0]
        need = self.required_bytes(M)
        have = self.max_memory if self.max_memory is not None else available_bytes(hessian.device)
        if need > have:
            raise DenseTooLargeError(
                f"the dense Hessian of M = {M:,} parameters needs about {format_bytes(need)} "
                f"(M² float64 numbers for H, its eigenvectors and LAPACK workspace), but only "
                f"{format_bytes(have)} is available on {hessian.device}. Use the matrix-free backends "
                "instead: inverse='cg' or 'lissa' (or 'kfac'/'ekfac') and eigen='lanczos'."
            )

    def fit(self, hessian: HessianOperator) -> DenseCurvature:
        self._guard(hessian)
        t0 = time.perf_counter()
        hvps0 = hessian.num_hvps
        if self.cache_graphs:
            with hessian.cached_graphs():
                H = hessian.dense(self.chunk).to(torch.float64)
        else:
            H = hessian.dense(self.chunk).to(torch.float64)
        asym = ((H - H.T).norm() / H.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()
        H = 0.5 * (H + H.T)
        evals, evecs = torch.linalg.eigh(H)
        del H
        self.eigenvalues, self.eigenvectors = evals, evecs
        self._hessian = hessian
        self.diagnostics = {
            "hvps": hessian.num_hvps - hvps0,
            "relative_asymmetry": asym,
            "lambda_min": evals[0].item(),
            "lambda_max": evals[-1].item(),
            "seconds": time.perf_counter() - t0,
        }
        return self

    def _spectrum(self) -> tuple[Tensor, Tensor]:
        if self.eigenvalues is None or self.eigenvectors is None:
            self.hessian  # raises the "not fitted" error
        return self.eigenvalues, self.eigenvectors  # type: ignore[return-value]

    def check_damping(self, damping: float) -> None:
        """Raise :class:`IndefiniteDampingError` unless λ_min(H) + δ > 0."""
        lam_min = self._spectrum()[0][0].item()
        if lam_min + damping <= 0:
            raise IndefiniteDampingError(lam_min, damping, where="dense backend")

    def solve(self, V: Tensor, damping: float) -> Tensor:
        evals, Q = self._spectrum()
        self.check_damping(damping)
        V64 = V.to(torch.float64)
        out = Q @ ((Q.T @ V64) / (evals + damping).unsqueeze(1))
        return out.to(V.dtype)

    def eigh(self, m: int) -> tuple[Tensor, Tensor]:
        self._check_m(m)
        evals, Q = self._spectrum()
        dtype = self.hessian.dtype
        M = evals.numel()
        idx = torch.arange(M - 1, M - 1 - m, -1, device=evals.device)
        return evals[idx].to(dtype), Q[:, idx].to(dtype)

    def min_eigenvalue(self) -> float:
        return self._spectrum()[0][0].item()
