"""Influence functions and curvature-aware similarity (docs/design.md §1).

With g = ∇_θ ℓ(z, θ̃), C_δ = C + δI and n training points:

.. math::

    I(z_r, z_t) = \\tfrac1n\\, g_t^T C_δ^{-1} g_r, \\qquad
    S(z_r, z_t) = (g_t^T C_δ^{-1} g_r)^2 .

I > 0 means removing z_r would raise the test loss: z_r helps z_t. Test gradients are
solved once, s_t = C_δ⁻¹ g_t (M × T), and the training side is streamed: each chunk of
per-sample gradients G_c (c × M) gives the block G_c s_t, so n × M gradients are never held
at once. Cost: T right-hand sides of one solve plus one pass of per-sample gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..curvature import CurvatureBackend
from ..data import DataLike
from ..objective import Labels, Objective, TestLoss
from .base import FittedCurvature, Method, MethodResult, TestSettings


def solved_test_gradients(objective: Objective, inverse: CurvatureBackend, damping: float,
                          test: DataLike, y_test: Tensor | None, labels: Labels,
                          test_loss: TestLoss) -> Tensor:
    """s_t = C_δ⁻¹ g_t for every test point, shape ``(M, T)``."""
    G_test = objective.gradients(test, y_test, labels=labels, test_loss=test_loss)
    return inverse.solve(G_test.T, damping)


def gradient_dots(objective: Objective, S: Tensor, desc: str) -> Tensor:
    """g_rᵀ s_t for every test point t (columns of ``S (M, T)``) and training point r; ``(T, n)``."""
    rows = objective.training_rows(lambda G: (S.T @ G.T).T, S.shape[1], desc=desc)
    return rows.T


def influence(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
              y_test: Tensor | None = None, *, labels: Labels = "true",
              test_loss: TestLoss = "objective") -> Tensor:
    """I(z_r, z_t) = (1/n) g_tᵀ C_δ⁻¹ g_r for all test points t and training points r; ``(T, n)``."""
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    return gradient_dots(objective, S, "influence") / objective.n


def similarity(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
               y_test: Tensor | None = None, *, labels: Labels = "true",
               test_loss: TestLoss = "objective") -> Tensor:
    """S(z_r, z_t) = (g_tᵀ C_δ⁻¹ g_r)², shape ``(T, n)``."""
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    return gradient_dots(objective, S, "similarity").square()


@dataclass(frozen=True)
class InfluenceSettings(TestSettings):
    """Options of influence and similarity: how the test points are measured."""


def _run_influence(fitted: FittedCurvature, X: DataLike, y: Tensor | None, s: InfluenceSettings) -> MethodResult:
    return influence(fitted.objective, fitted.inverse, fitted.damping, X, y, labels=s.labels,
                     test_loss=s.test_loss), {}


def _run_similarity(fitted: FittedCurvature, X: DataLike, y: Tensor | None, s: InfluenceSettings) -> MethodResult:
    return similarity(fitted.objective, fitted.inverse, fitted.damping, X, y, labels=s.labels,
                      test_loss=s.test_loss), {}


INFLUENCE = Method("influence", InfluenceSettings, _run_influence, per_training_point=True,
                   needs=frozenset({"inverse"}))
SIMILARITY = Method("similarity", InfluenceSettings, _run_similarity, per_training_point=True,
                    needs=frozenset({"inverse"}))
