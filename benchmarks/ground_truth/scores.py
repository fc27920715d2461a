"""Scores of an answer against its ground truth: LDS with a bootstrap CI, leave-one-out
correlation, RUE against the bootstrap variance, LEES against ensemble disagreement and OOD.

Sign convention (``workload.py``): I(z_i, z_t) > 0 when z_i helps z_t, so the model trained on
S is predicted to have test loss const − Σ_{i∈S} I(z_i, z_t); the LDS of test point t is the
Spearman correlation over the K subsets between that prediction and the measured loss.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ, NaN when either side is constant or not finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(pearsonr(a, b).statistic)


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its percentile-bootstrap CI over them."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, n_boot: int = 2000,
        seed: int = 0) -> dict[str, float | np.ndarray]:
    """LDS of an influence matrix ``scores (T, n)`` against subset retrains (``masks (K, n)``,
    ``losses (K, T)``): ``mean``, ``lo``, ``hi`` (95 % bootstrap CI over test points) and
    ``per_test (T,)``. Cost O(K·n·T)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (losses.shape[1], masks.shape[1]):
        raise ValueError(f"scores must be (T, n) = {(losses.shape[1], masks.shape[1])}; got {scores.shape}.")
    predicted = -(masks.astype(np.float64) @ scores.T)  # (K, T)
    per_test = np.array([spearman(predicted[:, t], losses[:, t]) for t in range(losses.shape[1])])
    mean, lo, hi = bootstrap_mean_ci(per_test, n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "per_test": per_test}


def leave_one_out(scores: np.ndarray, removed: np.ndarray, change: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman over all (test, removed) pairs of I(z_r, z_t) against the actual
    loss change when z_r is left out (the same sign: both > 0 when z_r helps)."""
    predicted = np.asarray(scores, dtype=np.float64)[:, removed]
    return {"pearson": pearson(predicted, change), "spearman": spearman(predicted.ravel(), change.ravel())}


def auroc(score: np.ndarray, is_ood: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` separating ``is_ood`` (True) from the rest."""
    is_ood = np.asarray(is_ood, dtype=bool)
    if is_ood.all() or not is_ood.any():
        raise ValueError("AUROC needs both in-distribution and OOD points.")
    return float(roc_auc_score(is_ood, np.asarray(score, dtype=np.float64)))


def rue_scores(rue: np.ndarray, variance: np.ndarray) -> dict[str, float]:
    """RUE ``(T,)`` against the actual bootstrap variance ``(T,)``: Spearman, and the ratio of
    magnitudes RUE / actual (median over test points, and of the means)."""
    rue, variance = np.asarray(rue, dtype=np.float64), np.asarray(variance, dtype=np.float64)
    positive = variance > 0
    return {"spearman": spearman(rue, variance),
            "median_ratio": float(np.median(rue[positive] / variance[positive])) if positive.any() else float("nan"),
            "mean_ratio": float(rue.mean() / variance.mean()) if variance.mean() > 0 else float("nan")}


def lees_scores(lees: np.ndarray, disagreement: np.ndarray, is_ood: np.ndarray) -> dict[str, float]:
    """LEES on test + OOD inputs: Spearman with the ensemble's disagreement, the OOD AUROC of
    LEES and of the disagreement (the ensemble baseline)."""
    return {"spearman_disagreement": spearman(lees, disagreement), "auroc": auroc(lees, is_ood),
            "auroc_ensemble": auroc(disagreement, is_ood)}
