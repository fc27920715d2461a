"""Resampling Uncertainty Estimation (Schulam & Saria 2019; docs/design.md §1).

Bootstrap weights w_b ~ Multinomial(n, 1/n), b = 1..B, move the parameters by one
influence-function step,

.. math::

    Δθ_b = -C_{δ'}^{-1} \\frac1n \\sum_i (w_{b,i} - 1)\\, g_i ,

and RUE(z_t) = Var_b ℓ(z_t, θ̃ + Δθ_b), the population variance over the B draws of the
loss evaluated by a real forward pass (δ' = δ + 1 by default). The B parameter shifts do not
depend on the test points: they are one solve with B right-hand sides, made once. For the
linearised loss, ℓ(z_t, θ̃) + g_tᵀΔθ_b, the expectation over the multinomial is exact in
closed form,

.. math::

    \\mathrm{Var}_w\\Big[\\sum_r (w_r - 1)\\, I_r\\Big] = \\|I\\|^2 - \\frac{(\\sum_r I_r)^2}{n},

with I_r = I(z_r, z_t) computed at δ' (Cov(w) = I − 11ᵀ/n); ``method="analytic"`` returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..curvature import CurvatureBackend
from ..data import DataLike
from ..errors import InputError
from ..objective import Labels, Objective, TestLoss
from ..validation import check_choice, check_integer
from .base import FittedCurvature, Method, MethodResult, TestSettings
from .influence import influence


def bootstrap_weights(n: int, n_bootstrap: int, seed: int | torch.Generator = 0) -> Tensor:
    """Multinomial(n, 1/n) resampling counts, shape ``(B, n)``; each row sums to n."""
    check_integer("n_bootstrap", n_bootstrap, 2, note=" (a variance needs two draws)")
    if not isinstance(seed, torch.Generator):
        check_integer("seed", seed, 0, note=" or a torch.Generator")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_bootstrap, n), generator=gen)
    weights = torch.zeros(n_bootstrap, n, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return weights


def bootstrap_shifts(objective: Objective, inverse: CurvatureBackend, damping: float,
                     weights: Tensor) -> Tensor:
    """Δθ_b = −C_δ'⁻¹ (1/n) Σ_i (w_b,i − 1) g_i for each row of ``weights (B, n)``; ``(M, B)``."""
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
    caller already has them; then ``n_bootstrap`` and ``seed`` are not used.
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


@dataclass(frozen=True)
class RUESettings(TestSettings):
    """``n_bootstrap`` draws B ≥ 2 and their ``seed`` (bootstrap); ``method`` "bootstrap" or "analytic"."""

    n_bootstrap: int = 50
    seed: int | torch.Generator = 0
    method: str = "bootstrap"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("n_bootstrap", self.n_bootstrap, 2, note=" (a variance needs two draws)")
        if not isinstance(self.seed, torch.Generator):
            check_integer("seed", self.seed, 0, note=" or a torch.Generator")
        check_choice("method", self.method, ("bootstrap", "analytic"))


def _run(fitted: FittedCurvature, X: DataLike, y: Tensor | None, s: RUESettings) -> MethodResult:
    # shifts are kept for an integer seed; a Generator's draws are made afresh every call
    keep = s.method == "bootstrap" and not isinstance(s.seed, torch.Generator)
    shifts = fitted.bootstrap_shifts(s.n_bootstrap, s.seed) if keep else None
    values = rue(fitted.objective, fitted.inverse, fitted.rue_damping, X, y, n_bootstrap=s.n_bootstrap, seed=s.seed,
                 method=s.method, labels=s.labels, test_loss=s.test_loss, shifts=shifts)
    return values, {"rue_damping": fitted.rue_damping}


def _prepare(fitted: FittedCurvature, s: RUESettings) -> None:
    if s.method == "bootstrap" and not isinstance(s.seed, torch.Generator):
        fitted.bootstrap_shifts(s.n_bootstrap, s.seed)


RUE = Method("rue", RUESettings, _run, per_training_point=False, needs=frozenset({"inverse"}), prepare=_prepare,
             test_local=lambda s: s.method == "bootstrap")
