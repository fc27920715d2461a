"""A small LSTM phase classifier on measurement snapshots of the Fermi–Hubbard chain, with all
four methods of the Hessian toolbox computed by the exact dense oracle and by the matrix-free
backends side by side.

Data. Exact-diagonalisation ground states of the half-filled spinless Fermi–Hubbard ring
(``scalable_hbt.physics.ground_states``, L = 12) at V1 on both sides of the transition; a
snapshot is one projective measurement of all L occupations, a Fock state n drawn with the Born
probability |ψ(n)|², labelled by the phase of its V1 (Luttinger liquid for V1 ≤ 1, CDW-I
above). One snapshot is not always enough to tell the phase (the two Néel configurations 1010…
and 0101… together have probability 0.03 at V1 = 0 and 0.6 at V1 = 2.5), so the classifier is
uncertain near the transition, as RUE should show.

Model. ``nn.LSTM`` (one layer) reads the occupations ±1 site by site; a linear head on its
last hidden state gives the two phase logits. Trained in float64 with Adam on the cross-entropy
plus (wd/2)‖θ‖² (the Objective's regulariser), wd = 0.05/n as in the paper.

Toolbox. One dense fit of the exact Hessian (the oracle; ``damping="auto"``, δ = |λ_min| +
0.01), then at the same δ:

* influence: dense; CG; LiSSA (full batch, deflated by 10 Lanczos eigenpairs); EK-FAC (only the
  head is Kronecker-factored: the LSTM's weights fall back to the exact GGN diagonal);
* RelatIF: dense; CG (numerator and the exact normaliser ‖H_δ⁻¹g_r‖, n solves); CG with the
  EK-FAC normaliser;
* RUE (bootstrap, δ' = δ + 1, B = 50): dense; CG;
* LEES (m = 12): dense; Lanczos;

with the agreement of each with the dense oracle (``scalable_hbt.metrics.agreement``: relative
error, Pearson, Spearman over the resolved points), and for the physics: RUE along V1, LEES
AUROC for snapshots from V1 outside the training range (−2, −0.6, 8), and the phase of the most
helpful training snapshots. Time, HVPs and peak memory of every phase; ``report.json`` and
``lstm_snapshots.png`` go to ``--out``.

    python examples/lstm_snapshots.py --quick    # 400 training snapshots (minutes)
    python examples/lstm_snapshots.py            # 1000 training snapshots
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scalable_hbt import Objective, Toolbox
from scalable_hbt.curvature import CGCurvature, EKFACCurvature, KFACFallbackWarning, LanczosCurvature, LiSSACurvature
from scalable_hbt.memory import format_bytes
from scalable_hbt.metrics import agreement, auroc, top_k
from scalable_hbt.physics import V1_TRANSITION, born_samples, phase_labels
from snapshots_common import Phases, bayes_accuracy, to_numpy


@dataclass(frozen=True)
class Config:
    """Everything that determines a run (the presets below; tests pass smaller ones)."""

    L: int = 12
    train_v1: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.25, 1.5, 2.0, 3.0, 5.0)
    test_v1: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.2, 1.4, 1.7, 2.5, 4.0)
    outside_v1: tuple[float, ...] = (-2.0, -0.6, 8.0)
    per_v1: int = 100               # training snapshots per training V1
    test_per_v1: int = 20           # test snapshots per test V1
    influence_points: int = 12      # test snapshots of influence and RelatIF (one per test V1)
    hidden: int = 16
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-2
    paper_lambda: float = 0.05      # wd = λ/n
    lees_m: int = 12
    rue_bootstrap: int = 50
    cg_rtol: float = 1e-10
    lissa_deflate: int = 10
    top_k: int = 5
    seed: int = 0
    progress: bool = True
    name: str = "full"


PRESETS: dict[str, Config] = {
    "full": Config(),
    "quick": Config(per_v1=40, batch_size=50, name="quick"),
    "tiny": Config(L=8, train_v1=(0.2, 0.6, 2.0, 4.0), test_v1=(0.4, 1.0, 3.0), outside_v1=(-2.0,), per_v1=8,
                   test_per_v1=2, influence_points=3, hidden=3, epochs=40, batch_size=16, lees_m=4, rue_bootstrap=8,
                   lissa_deflate=4, top_k=3, name="tiny"),
}


class LSTMClassifier(nn.Module):
    """One LSTM layer over the sites (input ±1 per site), a linear head on the last hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def inputs(occupations: np.ndarray) -> torch.Tensor:
    """Occupations (N, L) → LSTM inputs (N, L, 1) in float64, 2n − 1 ∈ {−1, +1}."""
    return torch.as_tensor(2.0 * occupations - 1.0, dtype=torch.float64).unsqueeze(-1)


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, wd: float, cfg: Config) -> dict[str, float]:
    """Adam on mini-batches (seeded shuffles), lr decayed linearly to 0, loss = mean cross-entropy
    + (wd/2)‖θ‖²."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(X) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(X), generator=gen).split(cfg.batch_size):
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss = loss + 0.5 * wd * sum(p.pow(2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        logits = model(X)
        return {"steps": steps, "train_loss": nn.functional.cross_entropy(logits, y).item(),
                "train_accuracy": (logits.argmax(1) == y).double().mean().item()}


def run(cfg: Config) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    phases = Phases(cfg.progress)
    report: dict[str, Any] = {"config": asdict(cfg)}

    def sample():
        train_set = born_samples(cfg.L, cfg.train_v1, cfg.per_v1, rng, cfg.progress)
        test_set = born_samples(cfg.L, cfg.test_v1 + cfg.outside_v1, cfg.test_per_v1, rng, False)
        return train_set, test_set

    (occ, v1), (occ_t, v1_t) = phases("ED + Born sampling", sample)
    X, y = inputs(occ), torch.as_tensor(phase_labels(v1))
    Xt, yt = inputs(occ_t), torch.as_tensor(phase_labels(v1_t))
    outside = np.isin(v1_t, cfg.outside_v1)
    n = len(X)
    wd = cfg.paper_lambda / n
    model = LSTMClassifier(cfg.hidden).double()
    history = phases("training", lambda: train(model, X, y, wd, cfg))
    with torch.no_grad():
        correct = (model(Xt).argmax(1) == yt).numpy()
    report["model"] = {"num_params": sum(p.numel() for p in model.parameters()), "hidden": cfg.hidden,
                       "n_train": n, "weight_decay": wd, **history,
                       "test_accuracy_inside": float(correct[~outside].mean()),
                       "test_accuracy_by_v1": {f"{v:g}": float(correct[v1_t == v].mean()) for v in np.unique(v1_t)},
                       "bayes_optimal_accuracy": bayes_accuracy(cfg.L, cfg.train_v1, cfg.test_v1 + cfg.outside_v1)}
    bayes = report["model"]["bayes_optimal_accuracy"]
    report["model"]["bayes_optimal_accuracy_inside"] = float(np.mean([bayes[f"{v:g}"] for v in v1_t[~outside]]))

    obj = Objective(model, "cross_entropy", (X, y), weight_decay=wd, batch_size=n, dtype=torch.float64,
                    progress=cfg.progress)
    # one influence test point per test V1 (inside the training range), the first of each
    first = np.array([np.flatnonzero(v1_t == v)[0] for v in cfg.test_v1])[: cfg.influence_points]
    Xp, yp = Xt[first], yt[first]

    # the oracle: the exact Hessian, assembled and diagonalised once
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense", cache_graphs=True)
    phases.operators.append(exact.operator)
    phases("dense fit (oracle)", exact.fit)
    delta = exact.damping
    # matrix-free, at the oracle's δ so that the table compares solvers, not dampings; the same operator
    cg = CGCurvature(rtol=cfg.cg_rtol, max_iter=5000)
    lanczos = LanczosCurvature(m=max(cfg.lees_m, cfg.lissa_deflate), tol=1e-12, seed=cfg.seed)
    free = Toolbox(obj, damping=delta, inverse=cg, eigen=lanczos, cache_graphs=True, operator=exact.operator)
    phases("lanczos fit", lambda: lanczos.fit(exact.operator))
    lissa = LiSSACurvature(deflate=cfg.lissa_deflate, target=1e-4, batch_size=n, seed=cfg.seed, progress=False,
                           warn_residual=None, eigen=lanczos)
    tb_lissa = Toolbox(obj, damping=delta, inverse=lissa, eigen=None, cache_graphs=True, operator=exact.operator)
    phases("lissa fit", lambda: lissa.fit(exact.operator))
    ekfac = EKFACCurvature()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KFACFallbackWarning)
        phases("ekfac fit", lambda: ekfac.fit(exact.operator))
    fallback = [str(w.message) for w in caught if issubclass(w.category, KFACFallbackWarning)]
    tb_ekfac = Toolbox(obj, damping=delta, inverse=ekfac, eigen=None, operator=exact.operator)

    calls = [
        ("influence", "dense", lambda: exact.influence(Xp, yp)),
        ("influence", "cg", lambda: free.influence(Xp, yp)),
        ("influence", "lissa", lambda: tb_lissa.influence(Xp, yp)),
        ("influence", "ekfac", lambda: tb_ekfac.influence(Xp, yp)),
        ("relatif", "dense", lambda: exact.relatif(Xp, yp)),
        ("relatif", "cg", lambda: free.relatif(Xp, yp)),
        ("relatif", "cg + ekfac normaliser", lambda: free.relatif(Xp, yp, normalizer=ekfac)),
        ("rue", "dense", lambda: exact.rue(Xt, yt, n_bootstrap=cfg.rue_bootstrap, seed=cfg.seed)),
        ("rue", "cg", lambda: free.rue(Xt, yt, n_bootstrap=cfg.rue_bootstrap, seed=cfg.seed)),
        ("lees", "dense", lambda: exact.extrapolation_score(Xt, m=cfg.lees_m)),
        ("lees", "lanczos", lambda: free.extrapolation_score(Xt, m=cfg.lees_m)),
    ]
    rows: list[dict[str, Any]] = []
    values: dict[str, dict[str, np.ndarray]] = {}
    for method, backend, call in calls:
        result = phases(f"{method} / {backend}", lambda: to_numpy(call()))
        values.setdefault(method, {})[backend] = result
        row = {"method": method, "backend": backend, **phases.rows[f"{method} / {backend}"]}
        if backend != "dense":
            row.update(agreement(values[method]["dense"], result))
        rows.append(row)
    rue_analytic = to_numpy(exact.rue(Xt, yt, method="analytic"))

    # physics
    I_dense, IR_dense = values["influence"]["dense"], values["relatif"]["dense"]

    def helpful_phase(scores: np.ndarray) -> dict[str, float]:
        same, dv1 = [], []
        for t, s in enumerate(scores):
            helpful, _ = top_k(s, cfg.top_k)
            same.append(float((y.numpy()[helpful] == yp.numpy()[t]).mean()))
            dv1.append(float(np.abs(v1[helpful] - v1_t[first][t]).mean()))
        return {"same_phase": float(np.mean(same)), "mean_abs_dv1": float(np.mean(dv1))}

    rue_dense, lees_dense = values["rue"]["dense"], values["lees"]["dense"]
    inside_v1 = np.unique(v1_t[~outside])
    rue_by_v1 = {f"{v:g}": float(np.mean(rue_dense[v1_t == v])) for v in np.unique(v1_t)}
    peak_v1 = float(inside_v1[np.argmax([np.mean(rue_dense[v1_t == v]) for v in inside_v1])])
    lees_sep = {"auroc_outside_vs_inside": auroc(lees_dense, outside)}
    for v in cfg.outside_v1:
        mask = v1_t == v
        lees_sep[f"auroc_v1={v:g}_vs_inside"] = auroc(lees_dense[mask | ~outside], mask[mask | ~outside])
    report.update({
        "damping": delta, "min_eigenvalue": exact.eigen.min_eigenvalue(),
        "top_eigenvalues": to_numpy(exact.eigen.eigh(5)[0]).tolist(),
        "ekfac_fallback": fallback, "comparison": rows,
        "backend_diagnostics": {"cg": dict(cg.diagnostics), "lanczos": dict(lanczos.diagnostics),
                                "lissa": dict(lissa.diagnostics), "ekfac": dict(ekfac.diagnostics)},
        "physics": {
            "influence_top_helpful": helpful_phase(I_dense), "relatif_top_helpful": helpful_phase(IR_dense),
            "rue_by_v1": rue_by_v1, "rue_peak_v1_inside": peak_v1,
            "rue_analytic_vs_bootstrap": agreement(rue_dense, rue_analytic),
            "lees_dense": lees_sep, "lees_by_v1": {f"{v:g}": float(np.mean(lees_dense[v1_t == v]))
                                                   for v in np.unique(v1_t)},
        },
        "phases": phases.rows, "peak_above_baseline": phases.peak(), "baseline_rss": phases.baseline,
        "arrays": {"test_v1": v1_t.tolist(), "test_outside": outside.tolist(), "train_v1": v1.tolist(),
                   "influence_v1": v1_t[first].tolist(),
                   **{f"{m}/{b}": a.tolist() for m, d in values.items() for b, a in d.items()}},
    })
    return report


# ---------------------------------------------------------------------------------------------- output
def figure(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    a = {k: np.asarray(v) for k, v in report["arrays"].items()}
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    ax = fig.subplots(2, 2)
    # (a) influence of every training snapshot on one test snapshot near the transition, all backends
    c = ax[0, 0]
    t = int(np.argmin(np.abs(a["influence_v1"] - 1.2)))
    order = np.argsort(a["train_v1"], kind="stable")
    x = np.arange(len(order))
    for backend, style in (("ekfac", dict(color="tab:red", lw=0.8)), ("dense", dict(color="k", lw=2.2)),
                           ("cg", dict(color="tab:green", ls="--")), ("lissa", dict(color="tab:orange", ls=":"))):
        values = a[f"influence/{backend}"][t][order]
        scale = np.abs(values).max()
        c.plot(x, values / scale, label=f"{backend} (max |I| = {scale:.2g})", **style)
    c.axvline(np.searchsorted(a["train_v1"][order], V1_TRANSITION, side="right") - 0.5, color="0.5", lw=0.8)
    c.set(xlabel="training snapshots, ordered by V1 (grey line: V1 = 1)", ylabel="influence / max |influence|",
          title=f"(a) influence on a test snapshot at V1 = {a['influence_v1'][t]:g}")
    c.legend(fontsize=8)
    # (b) agreement with the dense oracle
    c = ax[0, 1]
    rows = [r for r in report["comparison"] if r["backend"] != "dense"]
    labels = [f"{r['method']}\n{r['backend']}" for r in rows]
    c.bar(np.arange(len(rows)), [max(r["max_rel_error"], 1e-17) for r in rows], color="tab:blue")
    c.set_yscale("log")
    c.set_xticks(np.arange(len(rows)), labels, rotation=70, fontsize=7)
    for i, r in enumerate(rows):
        c.text(i, max(r["max_rel_error"], 1e-17) * 1.5, f"ρ={r['spearman_resolved']:.3f}", ha="center", fontsize=6,
               rotation=90)
    c.set_ylim(top=max(max(r["max_rel_error"] for r in rows), 1.0) * 1e4)
    c.set(ylabel="relative error to the dense oracle (worst row)",
          title="(b) agreement with the dense oracle (ρ: Spearman)")
    # (c) RUE and (d) LEES by V1
    for c, key, title in ((ax[1, 0], "rue", "(c) RUE (bootstrap)"), (ax[1, 1], "lees", "(d) LEES")):
        other = "cg" if key == "rue" else "lanczos"
        v1s = np.unique(a["test_v1"])
        pos = np.arange(len(v1s))
        for p, v in zip(pos, v1s):
            mask = a["test_v1"] == v
            out = bool(a["test_outside"][mask][0])
            vals = a[f"{key}/dense"][mask]
            c.scatter(np.full(len(vals), p) + np.linspace(-0.2, 0.2, len(vals)), vals, s=12,
                      color="tab:red" if out else ("tab:blue" if v <= V1_TRANSITION else "tab:purple"))
        means = [a[f"{key}/{other}"][a["test_v1"] == v].mean() for v in v1s]
        c.plot(pos, means, "k_", ms=14, label=f"{other}: mean per V1")
        c.set_xticks(pos, [f"{v:g}" for v in v1s], rotation=60, fontsize=8)
        c.set_yscale("log")
        c.set(xlabel="V1 of the test snapshots (red: outside the training range)", ylabel=f"{key.upper()} (dense)",
              title=title)
        c.legend(fontsize=8)
    fig.suptitle(f"LSTM phase classifier ({report['model']['num_params']:,} parameters) on L = "
                 f"{report['config']['L']} Fermi–Hubbard snapshots: dense oracle and matrix-free backends")
    fig.savefig(path, dpi=110)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    figure(report, out / "lstm_snapshots.png")


def summary(report: dict[str, Any]) -> str:
    m, p = report["model"], report["physics"]
    lines = [f"LSTM: {m['num_params']:,} parameters, {m['n_train']} training snapshots; train accuracy "
             f"{m['train_accuracy']:.2f} (Bayes-optimal {m['bayes_optimal_accuracy']['train']:.2f}), test accuracy inside the range "
             f"{m['test_accuracy_inside']:.2f} (Bayes-optimal {m['bayes_optimal_accuracy_inside']:.2f}); "
             f"δ = {report['damping']:.4g} (λ_min {report['min_eigenvalue']:.3g}, top {report['top_eigenvalues'][:3]})",
             f"{'method':<10} {'backend':<24} {'seconds':>8} {'HVPs':>7} {'rel. error':>11} {'Pearson':>8} {'Spearman':>9}"]
    for r in report["comparison"]:
        agree = "" if r["backend"] == "dense" else \
            f"{r['max_rel_error']:11.2e} {r['pearson']:8.4f} {r['spearman_resolved']:9.4f}"
        lines.append(f"{r['method']:<10} {r['backend']:<24} {r['seconds']:8.1f} {r['hvps']:7.0f} {agree}")
    k = report["config"]["top_k"]
    lines += [
        f"top-{k} helpful share the test snapshot's phase: influence {p['influence_top_helpful']['same_phase']:.2f}, "
        f"RelatIF {p['relatif_top_helpful']['same_phase']:.2f}; mean |ΔV1| {p['influence_top_helpful']['mean_abs_dv1']:.2f}"
        f" / {p['relatif_top_helpful']['mean_abs_dv1']:.2f}",
        f"RUE peaks (inside) at V1 = {p['rue_peak_v1_inside']:g}; LEES AUROC outside vs inside: {p['lees_dense']}",
        f"peak memory above the baseline {format_bytes(report['peak_above_baseline'])}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 training snapshots (minutes)")
    parser.add_argument("--out", type=Path, default=Path("lstm_snapshots_output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars and no per-phase lines")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return replace(PRESETS["quick" if args.quick else "full"], seed=args.seed, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    report = run(cfg)
    report["wall_seconds"] = time.perf_counter() - t0
    write(report, args.out)
    print(summary(report))
    print(f"wall time {report['wall_seconds']:.0f} s; report and figure in {args.out}")
    return report


if __name__ == "__main__":
    main()
