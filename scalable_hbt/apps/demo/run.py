"""``hbt demo``: the toolbox on the paper's built-in physics example.

Half-filled 1D spinless Fermi-Hubbard chain (L = 12 sites, 924 Fock amplitudes per ground
state), labelled Luttinger liquid (V1 ≤ 1) or CDW-I; the paper's 740-parameter 1D CNN
trained in float64 with wd = 0.05 / n in the paper's regime (``--regime stopped``, default:
SGD with momentum and a decreasing learning rate, stopped after a fixed budget, not polished;
``--regime tight``: Adam + L-BFGS to a tight minimum). Then:

1. one exact dense curvature fit (the oracle) and all four methods with it;
2. the same methods with the matrix-free backends — CG and deflated full-batch LiSSA for
   influence, K-FAC / EK-FAC RelatIF normalizers, CG for RUE, Lanczos for LEES — and a
   side-by-side table of their agreement with the exact numbers and their run times
   (:mod:`.comparison`);
3. the paper's Figs. 3–6 as PNG files (drawn by :mod:`scalable_hbt.physics.figures`) and
   ``report.json`` with every number (:mod:`.report`).

This module orchestrates and assembles the report; the other modules of the package compute.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from ...metrics import auroc, top_k
from ...physics import PaperCNN, evaluation_set, training_set
from .analysis import above_neighbours, uncertain_region
from .comparison import LEES_M, compare_backends, to_numpy
from .config import DemoConfig
from .experiments import sign_experiment, size_experiment
from .report import draw_figures, write_report
from .timing import timed
from .training import train_network

FIG3_TEST_V1 = {"deep_LL": 0.1, "transition": 1.0, "deep_CDW": 30.0}
"""Fig. 3's test points: the reference test points nearest to these V1 values."""

FIG4_TEST_V1 = 1.0
"""Fig. 4's test point: the reference test point nearest to this V1 (at the transition)."""


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Generate data, train, fit once, run the four methods on every backend, draw the
    selected figures; write ``report.json`` and the PNGs into ``cfg.out``; return the report."""
    timings: dict[str, float] = {}
    figure_names = cfg.selected_figures
    cfg.out.mkdir(parents=True, exist_ok=True)
    with timed(timings, "data", log=True):
        train = training_set(12, cfg.points_per_phase, progress=cfg.progress)
        test = evaluation_set(12, progress=cfg.progress)
        test_ood = evaluation_set(12, ood_fraction=0.1, seed=cfg.seed, progress=cfg.progress)
    with timed(timings, "training", log=True):
        main = train_network(PaperCNN, "paper", train, cfg)

    # test points deep in the LL phase, at the transition, deep in CDW-I (the paper's Fig. 3)
    picks = {name: int(np.argmin(np.abs(test.v1 - v1))) for name, v1 in FIG3_TEST_V1.items()}
    idx = list(picks.values())
    Xt, yt = main.tensors(test)
    with timed(timings, "methods (all backends)"):
        res = compare_backends(main, (Xt[idx], yt[idx]), test, test_ood, cfg)

    obj = main.build_objective(cfg.progress)
    Xo, _ = main.tensors(test_ood)
    ood_loss = to_numpy(obj.per_sample_losses(Xo, labels="predicted", test_loss="loss"))
    ood = test_ood.ood
    fig3_points = {}
    for j, (name, i) in enumerate(zip(picks, idx)):
        entry = {"v1": float(test.v1[i])}
        for method, values in (("influence", res.influence[j]), ("relatif", res.relatif[j])):
            helpful, harmful = top_k(values)
            entry[method] = {"most_helpful": helpful.tolist(), "most_harmful": harmful.tolist(),
                             "helpful_v1": train.v1[helpful].tolist(), "harmful_v1": train.v1[harmful].tolist(),
                             "values": values.tolist()}
        fig3_points[name] = entry
    recipe = cfg.recipe("paper")
    report: dict[str, Any] = {
        "example": "1D spinless Fermi-Hubbard, L=12, paper CNN (740 parameters)",
        "config": {"quick": cfg.quick, "n_per_phase": cfg.points_per_phase, "regime": cfg.regime,
                   "recipe": asdict(recipe), "epochs": recipe.epochs(len(main.X)) if cfg.epochs is None else cfg.epochs,
                   "seed": cfg.seed, "device": cfg.device, "figures": list(figure_names)},
        "n_train": len(main.X), "n_test": len(test), "num_params": obj.num_params, "weight_decay": main.weight_decay,
        "training": {"objective": main.final_training_loss, "grad_norm": main.grad_norm,
                     "test_accuracy": main.accuracy(test), "misclassified_v1": main.misclassified(test).tolist(),
                     "saturated_fraction": main.saturated_fraction()},
        "curvature": res.curvature,
        "comparison": res.rows,
        "influence_vs_relatif": {"v1_train": train.v1.tolist(), "test_points": fig3_points},
        "lees_ood": {"v1": test_ood.v1.tolist(), "ood": ood.tolist(), "lees": res.lees.tolist(),
                     "minimal_test_loss": ood_loss.tolist(), "auroc_lees": auroc(res.lees, ood),
                     "auroc_test_loss": auroc(ood_loss, ood), "lees_pure_loss": res.lees_pure_loss.tolist(),
                     "auroc_lees_pure_loss": auroc(res.lees_pure_loss, ood), "m": LEES_M,
                     "auroc_lees_threshold_rule": auroc(res.lees_threshold, ood),
                     "m_threshold_rule": res.curvature["lees_m"]["dense, threshold 0.1"],
                     "ood_above_both_neighbours": int(above_neighbours(res.lees, ood).sum()),
                     "n_ood": int(ood.sum())},
        "rue": {"v1": test.v1.tolist(), "bootstrap": res.rue.tolist(), "analytic": res.rue_analytic.tolist(),
                "labels": "predicted", "uncertain_region": uncertain_region(test.v1, res.rue)},
        "seconds": timings,
    }
    if "fig4" in figure_names:
        with timed(timings, "sign experiment (fig4)", log=True):
            report["sign_anomaly"] = sign_experiment(cfg, FIG4_TEST_V1)
    if "fig6" in figure_names and cfg.size_comparison:
        with timed(timings, "12 vs 14 sites (fig6)", log=True):
            report["system_size"] = size_experiment(cfg)

    with timed(timings, "figures"):
        report["figures"] = draw_figures(report, figure_names, cfg.out)
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    write_report(report, cfg.out)
    return report
