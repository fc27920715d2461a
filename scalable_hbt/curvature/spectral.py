"""Spectral summaries of H without forming it: Hutchinson's trace and stochastic Lanczos quadrature.

Hutchinson: for Rademacher vectors z (entries ±1), E[zᵀHz] = tr(H), and
Var[zᵀHz] = 2(‖H‖_F² − Σ_i H_ii²); the estimate averages N draws, computed in batches
of HVPs.

Stochastic Lanczos quadrature (SLQ; Golub & Meurant; Ghorbani et al. 2019): the spectral
density ρ(λ) = (1/M) Σ_i δ(λ − λ_i) is estimated from k Lanczos steps started at a
normalised Rademacher vector v. With T_k = S Θ Sᵀ, the Gauss quadrature nodes are the
Ritz values θ_j and the weights w_j = S_{1j}², so that Σ_j w_j f(θ_j) = vᵀ f(H) v exactly
for polynomials f of degree < 2k. Averaging over runs and smoothing each node with a
Gaussian of width σ gives ρ on a grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..operators import LinearOperator
from .lanczos import lanczos_tridiagonal, tridiagonal


def _rademacher(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1


def hutchinson_trace(operator: LinearOperator, n_samples: int = 100, *, seed: int = 0,
                     batch: int = 16) -> tuple[float, float]:
    """tr(H) ≈ (1/N) Σ_s z_sᵀ H z_s over N Rademacher vectors; returns (estimate, standard error)."""
    if n_samples < 2:
        raise InputError(f"n_samples must be ≥ 2 to estimate an error; got {n_samples}.")
    M = operator.shape[0]
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, n_samples, batch):
        Z = _rademacher((M, min(batch, n_samples - start)), gen).to(device=operator.device, dtype=operator.dtype)
        samples.append((Z * operator.matmat(Z)).sum(0).to(torch.float64).cpu())
    values = torch.cat(samples)
    return values.mean().item(), (values.std() / np.sqrt(n_samples)).item()


@dataclass
class SpectralDensity:
    """SLQ result: per run, Gauss quadrature nodes ``(runs, k)`` and weights ``(runs, k)``
    (each run's weights sum to 1)."""

    nodes: np.ndarray
    weights: np.ndarray

    def density(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """ρ(λ) on ``grid``: the average over runs of Σ_j w_j N(λ; θ_j, σ²)."""
        diff = grid[None, None, :] - self.nodes[:, :, None]
        gauss = np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        return (self.weights[:, :, None] * gauss).sum(1).mean(0)

    def moment(self, power: int) -> float:
        """(1/M) tr(H^power) estimated by the quadrature."""
        return float((self.weights * self.nodes**power).sum(1).mean())


def spectral_density(operator: LinearOperator, steps: int = 80, runs: int = 4, *, seed: int = 0) -> SpectralDensity:
    """Nodes and weights of stochastic Lanczos quadrature (``steps`` Lanczos steps, ``runs`` start vectors)."""
    M = operator.shape[0]
    steps = min(steps, M)
    gen = torch.Generator().manual_seed(seed)
    nodes = np.zeros((runs, steps))
    weights = np.zeros((runs, steps))
    for r in range(runs):
        alphas, betas, _ = lanczos_tridiagonal(operator, _rademacher((M,), gen), steps)
        theta, S = np.linalg.eigh(tridiagonal(alphas, betas))
        k = len(theta)  # fewer than ``steps`` when the Krylov space became invariant: exact then
        nodes[r, :k], weights[r, :k] = theta, S[0, :] ** 2
    return SpectralDensity(nodes, weights)
