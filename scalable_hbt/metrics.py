"""How well an approximation agrees with exact values, and how well a score detects a class.

One definition of each comparison measure for everything that compares backends: the demo,
the benchmark suite and the tests. Plain numpy / scipy on arrays; this module imports
nothing else from :mod:`scalable_hbt`.

*Resolved* points: at a tight minimum most training points are saturated, their gradients
are ≈ wd·θ̃, and their exact influences agree to float64 rounding, so their mutual order is
noise. A rank measure is taken only over the points whose exact value stands out of that
tie floor (``resolved_mask``; benchmarks/BACKENDS.md, finding 5).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, rankdata, spearmanr

__all__ = [
    "RESOLVED_FRACTION",
    "auroc",
    "resolved_mask",
    "relative_error",
    "max_elementwise_relative_error",
    "top_k",
    "top_k_overlap",
    "agreement",
]

RESOLVED_FRACTION = 1e-6
"""A point is resolved when its exact value differs from the median by more than this
fraction of the largest such difference."""


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (bool), from ranks:
    (Σ ranks of positives − n₊(n₊+1)/2) / (n₊ n₋), ties getting average ranks."""
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative point.")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def resolved_mask(exact: np.ndarray, fraction: float = RESOLVED_FRACTION) -> np.ndarray:
    """Points of the 1-D array ``exact`` whose value stands out of the float64 tie floor: farther
    from the median than ``fraction`` of the largest distance (none if all are equal)."""
    exact = np.asarray(exact)
    spread = np.abs(exact - np.median(exact))
    return spread > fraction * spread.max() if spread.max() > 0 else np.zeros(len(exact), dtype=bool)


def relative_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """‖approx − exact‖ / ‖exact‖ (2-norm of the flattened arrays; the denominator is floored
    at the smallest positive float, so an exact zero gives a finite error)."""
    exact, approx = np.asarray(exact), np.asarray(approx)
    return float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), np.finfo(float).tiny))


def max_elementwise_relative_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """max_i |approx_i − exact_i| / |exact_i|: the worst relative error of single values
    (eigenvalues, a trace)."""
    exact, approx = np.asarray(exact, dtype=float), np.asarray(approx, dtype=float)
    return float(np.max(np.abs(approx - exact) / np.abs(exact)))


def top_k(values: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` largest (most helpful) and ``k`` smallest (most harmful) values."""
    order = np.argsort(np.asarray(values), kind="stable")
    k = min(k, len(order))
    return order[::-1][:k], order[:k]


def top_k_overlap(exact: np.ndarray, approx: np.ndarray, k: int = 5) -> dict[str, float]:
    """Overlap of the ``k`` most helpful and of the ``k`` most harmful *resolved* points of
    ``approx`` with those of ``exact``: the fraction of shared indices, mean over the rows of
    2-D arrays (one row per test point)."""
    helpful, harmful = [], []
    for e, a in zip(np.atleast_2d(exact), np.atleast_2d(approx)):
        keep = np.flatnonzero(resolved_mask(e))  # tied (saturated) points have no rank
        exact_helpful, exact_harmful = (keep[i] for i in top_k(e[keep], k))
        approx_helpful, approx_harmful = (keep[i] for i in top_k(a[keep], k))
        helpful.append(len(set(exact_helpful) & set(approx_helpful)) / k)
        harmful.append(len(set(exact_harmful) & set(approx_harmful)) / k)
    return {"helpful": float(np.mean(helpful)), "harmful": float(np.mean(harmful))}


def agreement(exact: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """Agreement of an approximation with the exact values, per row for 2-D arrays (worst row
    reported): Pearson over all points, Spearman over the resolved points (NaN with fewer
    than 3), the largest ``relative_error`` and the fewest resolved points of a row."""
    exact, approx = np.atleast_2d(exact), np.atleast_2d(approx)
    pearson, spearman, rel, resolved = [], [], [], []
    for e, a in zip(exact, approx):
        mask = resolved_mask(e)
        pearson.append(float(pearsonr(e, a)[0]) if np.ptp(e) > 0 and np.ptp(a) > 0 else float("nan"))
        spearman.append(float(spearmanr(e[mask], a[mask])[0]) if mask.sum() > 2 else float("nan"))
        rel.append(relative_error(e, a))
        resolved.append(int(mask.sum()))
    return {"pearson": min(pearson), "spearman_resolved": min(spearman), "max_rel_error": max(rel),
            "n_resolved": min(resolved)}
