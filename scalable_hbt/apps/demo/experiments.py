"""The paper's two experiments that train models of their own: the sign anomaly (Fig. 4) and
the system-size comparison (Fig. 6 (a)-(b))."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...metrics import auroc
from ...physics import PaperCNN, SizeInvariantCNN, cdw_order_parameter, evaluation_set, training_set
from .analysis import stand_out, uncertain_region
from .comparison import matrix_free_toolbox, to_numpy
from .config import DemoConfig
from .training import train_network

SYSTEM_SIZES = (12, 14)
"""The sites L of the size comparison (the paper's)."""


def sign_experiment(cfg: DemoConfig, transition_v1: float) -> dict[str, Any]:
    """Fig. 4: models trained on the sign-imbalanced and sign-balanced sets, influence (CG) of
    every training point on one test point near the transition (positive sign for the
    imbalanced set, negative sign for the balanced set, as in the paper)."""
    out: dict[str, Any] = {}
    for variant, test_sign in (("imbalanced", "positive"), ("balanced", "negative")):
        train = training_set(12, cfg.side_points_per_phase, sign=variant, seed=cfg.seed, progress=cfg.progress)
        trained = train_network(PaperCNN, "sign", train, cfg)
        tests = {sign: evaluation_set(12, sign=sign, seed=cfg.seed, progress=cfg.progress)
                 for sign in ("positive", "negative")}
        target = tests[test_sign]
        i = int(np.argmin(np.abs(target.v1 - transition_v1)))
        X, y = trained.tensors(target)
        tb = matrix_free_toolbox(trained.build_objective(cfg.progress), cfg, eigenpairs=False)
        infl = to_numpy(tb.influence(X[i:i + 1], y[i:i + 1]))[0]
        flipped = train.sign_flipped
        same_sign = flipped if test_sign == "negative" else ~flipped
        helpful = np.argsort(infl)[::-1][:5]
        entry: dict[str, Any] = {
            "test_sign": test_sign, "test_v1": float(target.v1[i]), "damping": tb.damping,
            "train_objective": trained.final_training_loss,
            "accuracy": {sign: trained.accuracy(data) for sign, data in tests.items()},
            "n_flipped": int(flipped.sum()), "influence": infl.tolist(), "flipped": flipped.tolist(),
            "top5_helpful_same_sign": int(same_sign[helpful].sum()),
            "mean_abs_influence": {"same_sign": float(np.abs(infl[same_sign]).mean()),
                                   "opposite_sign": float(np.abs(infl[~same_sign]).mean())},
        }
        if variant == "imbalanced":
            # do the flipped points lie off the smooth curve of the positive-sign points?
            off = stand_out(train.v1, infl, flipped)
            top = np.argsort(off)[::-1][:int(flipped.sum())]
            entry["flipped_among_top_outsiders"] = int(flipped[top].sum())
            entry["auroc_outsider_score_for_flipped"] = auroc(off, flipped)
        out[variant] = entry
        out["v1_train"] = train.v1.tolist()  # the same grid for both variants
    return out


def size_experiment(cfg: DemoConfig) -> dict[str, Any]:
    """Fig. 6 (a)-(b): the size-invariant CNN trained on 12 and 14 sites
    (``cfg.size_comparison_points_per_phase`` per phase), RUE (CG, δ' = δ + 1, predicted
    labels) on each reference test set."""
    out: dict[str, Any] = {}
    for L in SYSTEM_SIZES:
        train = training_set(L, cfg.size_comparison_points_per_phase, progress=cfg.progress)
        test = evaluation_set(L, progress=cfg.progress)
        trained = train_network(SizeInvariantCNN, "gap", train, cfg)
        X, _ = trained.tensors(test)
        tb = matrix_free_toolbox(trained.build_objective(cfg.progress), cfg, eigenpairs=False)
        rue = to_numpy(tb.rue(X, n_bootstrap=50, seed=cfg.seed, labels="predicted"))
        out[str(L)] = {"n_train": len(trained.X), "v1": test.v1.tolist(), "rue": rue.tolist(),
                       "accuracy": trained.accuracy(test),
                       "order_parameter": cdw_order_parameter(L, test.amplitudes).tolist(),
                       "damping": tb.damping, "uncertain_region": uncertain_region(test.v1, rue)}
    return out
