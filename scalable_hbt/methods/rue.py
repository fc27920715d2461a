"""Resampling Uncertainty Estimation (Schulam & Saria 2019; DESIGN §1).

Bootstrap weights w_b ~ Multinomial(n, 1/n), b = 1..B, move the parameters by one
influence-function step,

.. math::

    Δθ_b = -H_{δ'}^{-1} \\frac1n \\sum_i (w_{b,i} - 1)\\, g_i ,

and RUE(z_t) = Var_b ℓ(z_t, θ̃ + Δθ_b), the population variance over the B draws of the
loss evaluated by a real forward pass (δ' = δ + 1 by default). For the linearised loss,
ℓ(z_t, θ̃) + g_tᵀΔθ_b, the expectation over the multinomial is exact in closed form,

.. math::

    \\mathrm{Var}_w\\Big[\\sum_r (w_r - 1)\\, I_r\\Big] = \\|I\\|^2 - \\frac{(\\sum_r I_r)^2}{n},

with I_r = I(z_r, z_t) computed at δ' (Cov(w) = I − 11ᵀ/n); ``method="analytic"``
returns it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..curvature.base import CurvatureBackend
from ..data import DataLike
from ..errors import InputError
from ..objective import Labels, Objective, TestLoss
from .influence import influence


def bootstrap_weights(n: int, n_bootstrap: int, seed: int | torch.Generator = 0) -> Tensor:
    """Multinomial(n, 1/n) resampling counts, shape ``(B, n)``; each row sums to n."""
    if n_bootstrap < 2:
        raise InputError(f"n_bootstrap must be ≥ 2 for a variance; got {n_bootstrap}.")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, n, (n_bootstrap, n), generator=gen)
    weights = torch.zeros(n_bootstrap, n, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return weights


def bootstrap_shifts(objective: Objective, inverse: CurvatureBackend, damping: float,
                     weights: Tensor) -> Tensor:
    """Δθ_b = −H_δ'⁻¹ (1/n) Σ_i (w_b,i − 1) g_i for each row of ``weights (B, n)``; ``(M, B)``."""
    reweighted = objective.gradient(weights - 1)  # (B, M)
    return -inverse.solve(reweighted.T, damping)


def rue(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
        y_test: Tensor | None = None, *, n_bootstrap: int = 50, seed: int | torch.Generator = 0,
        method: str = "bootstrap", labels: Labels = "true", test_loss: TestLoss = "objective",
        shifts: Tensor | None = None) -> Tensor:
    """RUE(z_t) for each test point, shape ``(T,)``; ``damping`` here is δ' (already + 1).

    ``method="bootstrap"``: population variance of the real test loss over the B shifted
    models. ``method="analytic"``: the closed-form variance of the linearised loss.
    ``shifts``: the parameter shifts Δθ_b ``(M, B)`` of :func:`bootstrap_shifts` when the
    caller already has them (they do not depend on the test points); then ``n_bootstrap``
    and ``seed`` are not used.
    """
    if method == "analytic":
        I = influence(objective, inverse, damping, test, y_test, labels=labels, test_loss=test_loss)
        return I.square().sum(dim=1) - I.sum(dim=1).square() / objective.n
    if method != "bootstrap":
        raise InputError(f"method must be 'bootstrap' or 'analytic'; got {method!r}.")
    source = objective.source(test, y_test)
    if labels == "predicted":  # fix the labels at θ̃, not at the shifted parameters
        inputs, targets = zip(*[(x, t) for _, x, t in objective.batches(source, "predicted")])
        source = objective.source(torch.cat(inputs), torch.cat(targets))
    if shifts is None:
        shifts = bootstrap_shifts(objective, inverse, damping, bootstrap_weights(objective.n, n_bootstrap, seed))
    losses = torch.stack([
        objective.per_sample_losses(source, test_loss=test_loss, theta=objective.theta + shift)
        for shift in shifts.T
    ])  # (B, T)
    return losses.var(dim=0, correction=0)
