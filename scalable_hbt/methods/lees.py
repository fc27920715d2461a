"""Local-Ensembles extrapolation score (Madras et al. 2020; docs/design.md §1).

With V_m the m eigenvectors of the curvature C with the algebraically largest eigenvalues,

.. math::

    E_m(z_t) = \\|(I - V_m V_m^T)\\, g_t\\|_2 = \\sqrt{\\|g_t\\|^2 - \\|V_m^T g_t\\|^2}.

The paper writes the square; like the reference code we report the norm. E_0 = ‖g_t‖,
E_m is non-increasing in m and E_M = 0. Choosing m:

* explicit ``m``;
* threshold τ: remove every eigenvector with eigenvalue > τ, never fewer than 2;
* automatic: the smallest m ≥ 2 after which every test point's score has converged,
  E_m − E_{m+w} ≤ rtol · E_m over a window of w further eigenvectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..curvature import CurvatureBackend
from ..data import DataLike
from ..errors import InputError
from ..objective import Labels, Objective, TestLoss
from ..validation import SettingError, check_integer, check_number
from .base import FittedCurvature, Method, MethodResult, TestSettings

MIN_REMOVED = 2


def scores_for_all_m(G: Tensor, V: Tensor) -> Tensor:
    """E_m for m = 0..k given test gradients ``G (T, M)`` and eigenvectors ``V (M, k)``
    (largest eigenvalue first); shape ``(T, k + 1)``."""
    # accumulate in float64 without copying V (M × k can be gigabytes): only (T, k) and (T,) are cast
    captured = torch.cumsum((G @ V).to(torch.float64).square(), dim=1)
    total = torch.linalg.vector_norm(G, dim=1, keepdim=True, dtype=torch.float64).square()
    residual = torch.cat([total, total - captured], dim=1).clamp_min(0)
    return residual.sqrt().to(G.dtype)


def m_from_threshold(eigenvalues: Tensor, threshold: float) -> int:
    """Count of eigenvalues > τ, never fewer than 2 (the reference rule)."""
    return max(MIN_REMOVED, int((eigenvalues > threshold).sum()))


def m_converged(scores: Tensor, rtol: float = 1e-2, window: int = 5) -> int:
    """Smallest m ≥ 2 with E_m − E_{m+window} ≤ rtol·E_m for every row of ``scores (T, k+1)``."""
    k = scores.shape[1] - 1
    for m in range(MIN_REMOVED, k - window + 1):
        drop = scores[:, m] - scores[:, m + window]
        if bool((drop <= rtol * scores[:, m]).all()):
            return m
    raise InputError(
        f"the extrapolation score did not converge within the {k} eigenvectors computed "
        f"(rtol={rtol}, window={window}); pass an explicit m or a threshold, or allow more eigenpairs (m_max)."
    )


def extrapolation_score(objective: Objective, eigen: CurvatureBackend, test: DataLike,
                        y_test: Tensor | None = None, *, labels: Labels = "predicted",
                        m: int | str | None = None, threshold: float | None = 0.1,
                        test_loss: TestLoss = "objective", m_max: int = 100,
                        rtol: float = 1e-2, window: int = 5) -> tuple[Tensor, int]:
    """E_m(z_t) for each test point, shape ``(T,)``, and the m that was used.

    ``m`` an integer: that m. ``m="auto"`` (or ``m=None`` with ``threshold=None``): the
    convergence rule, looking at up to ``m_max`` eigenpairs. Otherwise the threshold rule
    with τ = ``threshold``, asking the backend for more eigenpairs until one is ≤ τ.
    """
    G = objective.gradients(test, y_test, labels=labels, test_loss=test_loss)
    if isinstance(m, int) and not isinstance(m, bool):
        _, V = eigen.eigh(m)
        return scores_for_all_m(G, V)[:, -1], m
    if m not in (None, "auto"):
        raise InputError(f"m must be an integer, 'auto' or None; got {m!r}.")
    if m == "auto" or threshold is None:
        k = min(m_max + window, eigen.max_rank)
        _, V = eigen.eigh(k)
        scores = scores_for_all_m(G, V)
        chosen = m_converged(scores, rtol, window)
        return scores[:, chosen], chosen
    k = min(max(2 * MIN_REMOVED, 8), eigen.max_rank)
    while True:
        values, V = eigen.eigh(k)
        chosen = m_from_threshold(values, threshold)
        if chosen < k or k == eigen.max_rank:
            return scores_for_all_m(G, V[:, :chosen])[:, -1], chosen
        k = min(2 * k, eigen.max_rank)


@dataclass(frozen=True)
class LEESSettings(TestSettings):
    """``m``: an integer, ``"auto"`` (convergence rule, up to ``m_max`` eigenpairs) or ``None``
    with the threshold rule (eigenvalues > ``threshold`` removed, never fewer than 2).
    Labels default to "predicted": LEES is for test points without labels."""

    labels: Labels = "predicted"
    m: int | str | None = None
    threshold: float | None = 0.1
    m_max: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.m is None or self.m == "auto"):
            check_integer("m", self.m, 0, note=", 'auto', or None (the threshold rule)")
        check_number("threshold", self.threshold, allow_none=True)
        check_integer("m_max", self.m_max, 1)


def _run(fitted: FittedCurvature, X: DataLike, y: Tensor | None, s: LEESSettings) -> MethodResult:
    eigen = fitted.eigen
    if eigen is None:
        raise InputError("this Toolbox has no eigen backend (eigen=None); build it with eigen='lanczos' or 'dense' "
                         "for the extrapolation score.")
    if isinstance(s.m, int) and s.m > eigen.max_rank:
        raise SettingError("m", s.m, f"at most {eigen.max_rank}, the eigenpairs the {eigen.name!r} backend can give")
    scores, m = extrapolation_score(fitted.objective, eigen, X, y, labels=s.labels, m=s.m, threshold=s.threshold,
                                    test_loss=s.test_loss, m_max=s.m_max)
    return scores, {"m": m}


LEES = Method("lees", LEESSettings, _run, per_training_point=False, needs=frozenset({"eigen"}),
              test_local=lambda s: True)
