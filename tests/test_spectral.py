"""Hutchinson trace and stochastic Lanczos quadrature against the brute-force Hessian."""

from __future__ import annotations

import numpy as np
import torch

from scalable_hbt import HessianOperator
from scalable_hbt.curvature.lanczos import lanczos_tridiagonal, tridiagonal
from scalable_hbt.curvature.spectral import hutchinson_trace, spectral_density
from conftest import brute_force_hessian, make_problem


def test_hutchinson_trace_within_its_statistical_error():
    obj = make_problem("cnn")
    H = brute_force_hessian(obj)
    N = 400
    estimate, stderr = hutchinson_trace(HessianOperator(obj), N, seed=1)
    # the exact standard deviation of one Rademacher sample: sqrt(2 (‖H‖_F² − Σ H_ii²))
    sigma = torch.sqrt(2 * (H.square().sum() - H.diagonal().square().sum())).item() / np.sqrt(N)
    assert abs(estimate - H.trace().item()) <= 4 * sigma
    assert 0.7 * sigma <= stderr <= 1.3 * sigma


def test_slq_quadrature_is_exact_for_low_degree_polynomials():
    obj = make_problem("mlp")
    op = HessianOperator(obj)
    H = brute_force_hessian(obj)
    v = torch.randn(obj.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = 8
    alphas, betas, Q = lanczos_tridiagonal(op, v, k)
    theta, S = np.linalg.eigh(tridiagonal(alphas, betas))
    u = v / v.norm()
    for p in range(2 * k):  # Gauss quadrature with k nodes is exact up to degree 2k − 1
        exact = (u @ torch.linalg.matrix_power(H, p) @ u).item()
        quad = float((S[0] ** 2 * theta**p).sum())
        assert abs(quad - exact) <= 1e-8 * max(1.0, abs(exact)), p
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)


def test_spectral_density_with_full_krylov_space_recovers_the_spectrum():
    obj = make_problem("mlp")
    H = brute_force_hessian(obj)
    evals = torch.linalg.eigvalsh(H).numpy()
    runs = 3
    sd = spectral_density(HessianOperator(obj), steps=obj.num_params, runs=runs, seed=0)
    assert np.allclose(sd.weights.sum(1), 1.0)
    # first moment (1/M) tr(H) within 4 standard errors of the Rademacher estimate zᵀHz / M
    sigma = torch.sqrt(2 * (H.square().sum() - H.diagonal().square().sum())).item() / obj.num_params / np.sqrt(runs)
    assert abs(sd.moment(1) - evals.mean()) <= 4 * sigma
    grid = np.linspace(evals.min() - 1, evals.max() + 1, 2001)
    rho = sd.density(grid, sigma=0.05)
    assert abs(np.trapezoid(rho, grid) - 1.0) < 1e-3
    # every node is (to round-off) an eigenvalue of H
    nodes = sd.nodes[sd.weights > 1e-10]
    assert np.abs(nodes[:, None] - evals[None, :]).min(1).max() < 1e-8
