"""``hbt demo``: the toolbox on the paper's built-in physics example.

Half-filled 1D spinless Fermi-Hubbard chain (L = 12 sites, 924 Fock amplitudes per ground
state), labelled Luttinger liquid (V1 ≤ 1) or CDW-I; the paper's 740-parameter 1D CNN
trained to a tight minimum with wd = 0.05 / n; then one exact dense curvature fit and all
four methods on the reference test points. Prints a summary and writes ``report.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import Objective, Toolbox
from .physics import MinMaxScaler, PaperCNN, paper_weight_decay, test_set, train_model, training_set


@dataclass
class DemoConfig:
    """Sizes of the demo; ``quick`` uses 100 training points per phase instead of 500."""

    out: Path = Path("hbt_demo_output")
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    @property
    def n_per_phase(self) -> int:
        return 100 if self.quick else 500


def _top(row: np.ndarray, k: int = 5) -> dict[str, list[int]]:
    order = np.argsort(row)
    return {"most_helpful": order[::-1][:k].tolist(), "most_harmful": order[:k].tolist()}


def run_demo(cfg: DemoConfig) -> dict:
    """Generate data, train, fit the curvature once, run the four methods; return the report."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train = training_set(12, cfg.n_per_phase, progress=cfg.progress)
    test = test_set(12, progress=cfg.progress)
    timings["data"] = time.perf_counter() - t0

    dtype = torch.float64
    scaler = MinMaxScaler.fit(train.amplitudes)
    X, y = train.tensors(scaler, dtype)
    Xt, yt = test.tensors(scaler, dtype)
    wd = paper_weight_decay(len(X))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    result = train_model(PaperCNN().to(dtype), X, y, weight_decay=wd, epochs=40 if cfg.quick else 60,
                         lr=1e-2, seed=cfg.seed, batch_size=50, progress=cfg.progress)
    timings["training"] = time.perf_counter() - t0
    with torch.no_grad():
        accuracy = (result.model(Xt).argmax(1) == yt).double().mean().item()

    obj = Objective(result.model, "cross_entropy", (X, y), weight_decay=wd, batch_size=250,
                    device=cfg.device, dtype=dtype, progress=cfg.progress)
    tb = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    t0 = time.perf_counter()
    tb.fit()
    timings["curvature_fit"] = time.perf_counter() - t0

    # test points deep in the LL phase, at the transition, deep in CDW-I (the paper's Fig. 3)
    picks = {"deep_LL": int(np.argmin(np.abs(test.v1 - 0.1))), "transition": int(np.argmin(np.abs(test.v1 - 1.0))),
             "deep_CDW": int(np.argmin(np.abs(test.v1 - 30.0)))}
    idx = list(picks.values())
    t0 = time.perf_counter()
    infl = tb.influence(Xt[idx], yt[idx]).cpu().numpy()
    relatif = tb.relatif(Xt[idx], yt[idx]).cpu().numpy()
    timings["influence_relatif"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rue_boot = tb.rue(Xt, yt, n_bootstrap=50, seed=cfg.seed).cpu().numpy()
    rue_exact = tb.rue(Xt, yt, method="analytic").cpu().numpy()
    timings["rue"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lees = tb.extrapolation_score(Xt).cpu().numpy()
    timings["lees"] = time.perf_counter() - t0

    spectrum = tb.eigen.eigh(5)[0].tolist()
    report = {
        "example": "1D spinless Fermi-Hubbard, L=12, paper CNN (740 parameters)",
        "n_train": len(X), "n_test": len(Xt), "num_params": obj.num_params, "weight_decay": wd,
        "training": {"objective": result.objective, "grad_norm": result.grad_norm, "test_accuracy": accuracy},
        "curvature": {"damping": tb.damping, "top_eigenvalues": spectrum, **{k: v for k, v in tb.diagnostics["inverse"].items()}},
        "lees_m": tb.last_m,
        "test_points": {name: {"v1": float(test.v1[i]), "influence": _top(infl[j]), "relatif": _top(relatif[j])}
                        for j, (name, i) in enumerate(picks.items())},
        "rue": {"v1": test.v1.tolist(), "bootstrap": rue_boot.tolist(), "analytic": rue_exact.tolist()},
        "lees": {"v1": test.v1.tolist(), "score": lees.tolist()},
        "seconds": timings,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_summary(report: dict) -> str:
    """A short human-readable summary of a demo report."""
    c = report["curvature"]
    lines = [
        report["example"],
        f"  n_train = {report['n_train']}, n_test = {report['n_test']}, M = {report['num_params']}, "
        f"test accuracy = {report['training']['test_accuracy']:.3f}, ‖∇L‖ = {report['training']['grad_norm']:.2e}",
        f"  Hessian: λ_max = {c['lambda_max']:.4g}, λ_min = {c['lambda_min']:.4g}, damping (auto) δ = {c['damping']:.4g}, "
        f"top eigenvalues {', '.join(f'{v:.3g}' for v in c['top_eigenvalues'])}",
    ]
    for name, tp in report["test_points"].items():
        lines.append(f"  {name:<10} V1 = {tp['v1']:6.3f}: most helpful (influence) {tp['influence']['most_helpful']}, "
                     f"(RelatIF) {tp['relatif']['most_helpful']}")
    rb, ra = np.array(report["rue"]["bootstrap"]), np.array(report["rue"]["analytic"])
    lines.append(f"  RUE: bootstrap vs analytic Pearson {np.corrcoef(rb, ra)[0, 1]:.3f}; "
                 f"LEES m = {report['lees_m']}, median score {np.median(report['lees']['score']):.3g}")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)
