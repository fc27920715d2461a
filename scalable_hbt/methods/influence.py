"""Influence functions, curvature-aware similarity and RelatIF (DESIGN §1).

With g = ∇_θ ℓ(z, θ̃), H_δ = H + δI and n training points:

.. math::

    I(z_r, z_t) = \\tfrac1n\\, g_t^T H_δ^{-1} g_r, \\qquad
    S(z_r, z_t) = (g_t^T H_δ^{-1} g_r)^2, \\qquad
    I_R(z_r, z_t) = I(z_r, z_t) / \\|H_δ^{-1} g_r\\|.

I > 0 means removing z_r would raise the test loss: z_r helps z_t. Test gradients are
solved once, s_t = H_δ⁻¹ g_t (M × T), and the training side is streamed: each chunk of
per-sample gradients G_c (c × M) gives the block G_c s_t / n, so n × M gradients are
never held at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..curvature.base import CurvatureBackend
from ..data import DataLike
from ..objective import Labels, Objective, TestLoss


def solved_test_gradients(objective: Objective, inverse: CurvatureBackend, damping: float,
                          test: DataLike, y_test: Tensor | None, labels: Labels,
                          test_loss: TestLoss) -> Tensor:
    """s_t = H_δ⁻¹ g_t for every test point, shape ``(M, T)``."""
    G_test = objective.gradients(test, y_test, labels=labels, test_loss=test_loss)
    return inverse.solve(G_test.T, damping)


def _stream(objective: Objective, S: Tensor, normalizer: CurvatureBackend | None, damping: float,
            desc: str) -> tuple[Tensor, Tensor | None]:
    """Stream training gradients: returns (g_rᵀ s_t for all t, r) of shape (T, n) and,
    if a normaliser backend is given, ‖H_δ⁻¹ g_r‖ of shape (n,)."""
    n = objective.n
    separate = normalizer is not None and normalizer.collective_solve and distributed.active()
    dots = torch.zeros(S.shape[1], n, device=S.device, dtype=S.dtype)
    norms = torch.zeros(n, device=S.device, dtype=S.dtype) if normalizer is not None and not separate else None
    for start, G in objective.iter_gradients(objective.train, desc=desc):
        stop = start + G.shape[0]
        dots[:, start:stop] = S.T @ G.T
        if norms is not None:
            norms[start:stop] = normalizer.inverse_norms(G, damping)
    distributed.all_reduce_sum(dots)  # each rank filled its shard's columns
    if norms is not None:
        distributed.all_reduce_sum(norms)
    if separate:
        norms = inverse_gradient_norms(objective, normalizer, damping)
    return dots, norms


def influence(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
              y_test: Tensor | None = None, *, labels: Labels = "true",
              test_loss: TestLoss = "objective") -> Tensor:
    """I(z_r, z_t) = (1/n) g_tᵀ H_δ⁻¹ g_r for all test points t and training points r; ``(T, n)``."""
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    dots, _ = _stream(objective, S, None, damping, "influence")
    return dots / objective.n


def similarity(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
               y_test: Tensor | None = None, *, labels: Labels = "true",
               test_loss: TestLoss = "objective") -> Tensor:
    """S(z_r, z_t) = (g_tᵀ H_δ⁻¹ g_r)², shape ``(T, n)``."""
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    dots, _ = _stream(objective, S, None, damping, "similarity")
    return dots.square()


def inverse_gradient_norms(objective: Objective, normalizer: CurvatureBackend, damping: float) -> Tensor:
    """The RelatIF normaliser ‖H_δ⁻¹ g_r‖ for every training point, shape ``(n,)``.

    Under ``torch.distributed`` each rank takes its shard, unless the normaliser's solve is
    itself a collective (CG, LiSSA): then every rank walks all n points in the same order
    so that the ranks' Hessian products match, and the per-rank shards of those products
    do the splitting.
    """
    collective = normalizer.collective_solve and distributed.active()
    norms = torch.zeros(objective.n, device=objective.device, dtype=objective.dtype)
    for start, G in objective.iter_gradients(objective.train, desc="RelatIF normaliser", shard=not collective):
        norms[start:start + G.shape[0]] = normalizer.inverse_norms(G, damping)
    return norms if collective else distributed.all_reduce_sum(norms)


def relatif(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
            y_test: Tensor | None = None, *, normalizer: CurvatureBackend | None = None,
            labels: Labels = "true", test_loss: TestLoss = "objective") -> Tensor:
    """I_R(z_r, z_t) = I(z_r, z_t) / ‖H_δ⁻¹ g_r‖, shape ``(T, n)``.

    The numerator uses ``inverse``; the normaliser uses ``normalizer`` (default: the same
    backend). Both come out of a single stream over the training gradients.
    """
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    dots, norms = _stream(objective, S, normalizer or inverse, damping, "RelatIF")
    assert norms is not None
    return dots / objective.n / norms
