"""``hbt demo``: the toolbox on the paper's built-in physics example (issue 4's main job).

Half-filled 1D spinless Fermi-Hubbard chain (L = 12 sites, 924 Fock amplitudes per ground
state), labelled Luttinger liquid (V1 ≤ 1) or CDW-I; the paper's 740-parameter 1D CNN
trained in float64 with wd = 0.05 / n in the paper's regime (``--regime stopped``, default:
SGD with momentum and a decreasing learning rate, stopped after a fixed budget, not polished;
``--regime tight``: Adam + L-BFGS to a tight minimum). Then:

1. one exact dense curvature fit (the oracle) and all four methods with it;
2. the same methods with the matrix-free backends — CG and deflated full-batch LiSSA for
   influence, K-FAC / EK-FAC RelatIF normalisers, CG for RUE, Lanczos for LEES — and a
   side-by-side table of their agreement with the exact numbers and their run times;
3. the paper's Figs. 3–6 as PNG files (drawn by :mod:`scalable_hbt.physics.figures`) and
   ``report.json`` with every number.

This module orchestrates; the figure functions draw.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import pearsonr, rankdata, spearmanr
from matplotlib.figure import Figure
from torch import nn

from .. import Objective, Toolbox
from ..curvature import CGCurvature, LanczosCurvature, LiSSACurvature
from ..physics import (
    GAP_CNN_RECIPE,
    PAPER_CNN_RECIPE,
    TIGHT_RECIPE,
    MinMaxScaler,
    PaperCNN,
    PhaseDataset,
    SizeInvariantCNN,
    TrainingRecipe,
    cdw_order_parameter,
    paper_weight_decay,
    evaluation_set,
    training_set,
)
from ..physics import figures

FIGURES: tuple[str, ...] = ("fig3", "fig4", "fig5", "fig6")
"""Every figure the demo can draw."""

QUICK_FIGURES: tuple[str, ...] = ("fig3", "fig5", "fig6")
"""Figures drawn in ``--quick`` mode unless asked otherwise (Fig. 4 trains two more models)."""

RESOLVED_FRACTION = 1e-6
"""A point is *resolved* when its exact value differs from the median by more than this
fraction of the largest such difference (benchmarks/BACKENDS.md, finding 5: the saturated
training points have influences that tie to float64 rounding, so ranking them is noise)."""

FIG3_TEST_V1 = {"deep_LL": 0.1, "transition": 1.0, "deep_CDW": 30.0}
"""Fig. 3's test points: the reference test points nearest to these V1 values."""

SIGN_LR = 1e-3
"""Adam learning rate (+ L-BFGS) for the sign-flipped training sets of Fig. 4: at 1e-2 the paper
CNN collapses to a constant output on them (objective ln 2, all ReLUs dead) for seeds 0 and 1;
1e-3 trains."""

LEES_M = 12
"""Hessian eigenvectors removed for LEES, the paper's m (its threshold rule with tau = 0.1)."""

Regime = Literal["stopped", "tight"]
REGIMES: tuple[str, ...] = ("stopped", "tight")
"""Training regimes: "stopped" (the paper's: SGD / Adam with a decreasing learning rate for a
fixed budget, no polish, an indefinite Hessian) and "tight" (Adam + L-BFGS to a tight minimum)."""

Network = Literal["paper", "gap", "sign"]

RUE_THRESHOLD = 5e-5
"""The paper's RUE threshold for the width of the uncertain region (section III D)."""

SATURATED_LOSS = 1e-6
"""A training point is *saturated* when its cross-entropy is below this (its gradient ~ loss)."""

DTYPE = torch.float64


def parse_figures(text: str) -> tuple[str, ...]:
    """``"all"``, ``"none"`` or a comma-separated subset of ``fig3,fig4,fig5,fig6``."""
    text = text.strip().lower()
    if text == "all":
        return FIGURES
    if text in ("none", ""):
        return ()
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}, 'all' or 'none'.")
    return names


@dataclass
class DemoConfig:
    """What ``hbt demo`` runs.

    Attributes:
        out: output folder for ``report.json`` and the PNG figures.
        quick: 100 training points per phase instead of 500, Fig. 4 off by default.
        device: torch device.
        seed: seeds training, the sign / OOD choices, LiSSA, Lanczos and the RUE bootstrap.
        progress: show progress bars.
        figures: figures to draw; None means all (full mode) or ``QUICK_FIGURES`` (quick).
        n_per_phase, epochs: override the sizes (used by the tests for a tiny run).
        size_comparison: also train the size-invariant CNN on 12 and 14 sites for Fig. 6
            (4-10 extra minutes: an ARPACK lambda_min and CG RUE per size; off by default to
            keep the full demo within 10 minutes).
        size_points_per_phase: training points per phase of the size comparison (default
            ``side_points_per_phase``, 100; the paper's 500 take ~40 minutes on 2 cores, most
            of it the L = 14 RUE).
        regime: "stopped" (default, the paper's regime) or "tight" (see ``REGIMES``).
    """

    out: Path = Path("hbt_demo_output")
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    figures: tuple[str, ...] | None = None
    n_per_phase: int | None = None
    epochs: int | None = None
    size_comparison: bool = False
    size_points_per_phase: int | None = None
    regime: Regime = "stopped"

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {self.regime!r}.")
        if self.size_points_per_phase is not None and self.size_points_per_phase < 2:
            raise ValueError(f"size_points_per_phase must be an integer ≥ 2, got {self.size_points_per_phase!r}.")

    @property
    def points_per_phase(self) -> int:
        """Training points per phase (100 in quick mode, 500 otherwise, unless overridden)."""
        return self.n_per_phase or (100 if self.quick else 500)

    @property
    def side_points_per_phase(self) -> int:
        """Training points per phase of the extra models (Fig. 4 sign sets, Fig. 6 size
        comparison): at most 100, which keeps the full demo within its 10-minute budget."""
        return min(self.points_per_phase, 100)

    def recipe(self, network: Network) -> TrainingRecipe:
        """How to train ``network``: "paper" (the 740-parameter CNN), "gap" (the size-invariant
        CNN), in ``self.regime``, or "sign" (the paper CNN on the sign-flipped sets of Fig. 4,
        Adam at ``SIGN_LR`` + L-BFGS in either regime)."""
        if network == "sign":
            # both regimes: on the sign-flipped sets (100 points per phase) neither SGD (the paper CNN
            # recipe: objective 0.61 imbalanced, 0.69 balanced) nor Adam 1e-3 without the polish
            # (0.69) leaves the ln 2 plateau within its budget; Adam 1e-3 + L-BFGS does
            return replace(TIGHT_RECIPE, lr=SIGN_LR)
        if self.regime == "stopped":
            return PAPER_CNN_RECIPE if network == "paper" else GAP_CNN_RECIPE
        return TIGHT_RECIPE if network == "paper" else replace(TIGHT_RECIPE, lr=SIGN_LR)

    @property
    def selected_figures(self) -> tuple[str, ...]:
        """The figures to draw."""
        return self.figures if self.figures is not None else (QUICK_FIGURES if self.quick else FIGURES)


# --------------------------------------------------------------------------- metrics
def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (bool), from ranks:
    (Σ ranks of positives − n₊(n₊+1)/2) / (n₊ n₋), ties getting average ranks."""
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative point.")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def resolved_mask(exact: np.ndarray) -> np.ndarray:
    """Points whose exact value stands out of the float64 tie floor (see ``RESOLVED_FRACTION``)."""
    spread = np.abs(exact - np.median(exact))
    return spread > RESOLVED_FRACTION * spread.max() if spread.max() > 0 else np.zeros(len(exact), dtype=bool)


def agreement(exact: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """Agreement of an approximation with the exact values, per row for 2-D arrays (worst row
    reported): Pearson over all points, Spearman over the resolved points, and the largest
    relative error ‖approx − exact‖ / ‖exact‖."""
    exact, approx = np.atleast_2d(exact), np.atleast_2d(approx)
    pearson, spearman, rel, resolved = [], [], [], []
    for e, a in zip(exact, approx):
        mask = resolved_mask(e)
        pearson.append(float(pearsonr(e, a)[0]) if np.ptp(e) > 0 and np.ptp(a) > 0 else float("nan"))
        spearman.append(float(spearmanr(e[mask], a[mask])[0]) if mask.sum() > 2 else float("nan"))
        rel.append(float(np.linalg.norm(a - e) / max(np.linalg.norm(e), np.finfo(float).tiny)))
        resolved.append(int(mask.sum()))
    return {"pearson": min(pearson), "spearman_resolved": min(spearman), "max_rel_error": max(rel),
            "n_resolved": min(resolved)}


def stand_out(v1: np.ndarray, values: np.ndarray, marked: np.ndarray, neighbours: int = 4) -> np.ndarray:
    """How far each point lies off the smooth curve of the unmarked points: |value − median of
    the ``neighbours`` nearest (in V1) unmarked points|, excluding the point itself."""
    v1, values, marked = np.asarray(v1, float), np.asarray(values, float), np.asarray(marked, bool)
    ref_v1, ref_values = v1[~marked], values[~marked]
    out = np.empty(len(v1))
    for i in range(len(v1)):
        dist = np.abs(ref_v1 - v1[i])
        dist[(ref_v1 == v1[i]) & (ref_values == values[i])] = np.inf
        out[i] = abs(values[i] - np.median(ref_values[np.argsort(dist)[:neighbours]]))
    return out


def above_neighbours(values: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """For every marked point (in order), whether its value exceeds those of its nearest
    unmarked neighbours on either side in the array order (one neighbour at either end): the
    paper's test of LEES on permuted points against their in-distribution neighbours."""
    values, marked = np.asarray(values, float), np.asarray(marked, bool)
    unmarked = np.flatnonzero(~marked)
    out = []
    for i in np.flatnonzero(marked):
        left, right = unmarked[unmarked < i], unmarked[unmarked > i]
        neighbours = ([values[left[-1]]] if left.size else []) + ([values[right[0]]] if right.size else [])
        out.append(all(values[i] > v for v in neighbours))
    return np.array(out, dtype=bool)


def uncertain_region(v1: np.ndarray, rue: np.ndarray) -> dict[str, Any]:
    """Where RUE exceeds the paper's threshold ``RUE_THRESHOLD`` and 5 % of its maximum: per
    rule the threshold, the V1 range [min, max] of the points above it (None if none) and its
    width max − min (0 if none)."""
    v1, rue = np.asarray(v1), np.asarray(rue)
    out: dict[str, Any] = {}
    for name, threshold in (("paper_5e-5", RUE_THRESHOLD), ("relative_5pct", 0.05 * rue.max())):
        above = v1[rue > threshold]
        out[name] = {"threshold": float(threshold),
                     "v1_range": [float(above.min()), float(above.max())] if above.size else None,
                     "width": float(np.ptp(above)) if above.size else 0.0}
    return out


# --------------------------------------------------------------------------- building blocks
@contextmanager
def _timed(timings: dict[str, float], key: str, log: bool = False) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``; ``log``: report them on stderr."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    timings[key] = timings.get(key, 0.0) + seconds
    if log:
        print(f"[hbt demo] {key}: {seconds:.1f} s", file=sys.stderr, flush=True)


@dataclass
class TrainedModel:
    """A trained classifier with its data in model-ready form."""

    model: nn.Module
    scaler: MinMaxScaler
    X: torch.Tensor
    y: torch.Tensor
    weight_decay: float
    objective_value: float
    grad_norm: float

    def objective(self, cfg: DemoConfig) -> Objective:
        """The paper's objective (mean CE + wd/2 ‖θ‖²) on the training data, batch size 250."""
        return Objective(self.model, "cross_entropy", (self.X, self.y), weight_decay=self.weight_decay,
                         batch_size=250, device=cfg.device, dtype=DTYPE, progress=cfg.progress)

    def tensors(self, data: PhaseDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Test data scaled with the training set's min and max."""
        return data.tensors(self.scaler, DTYPE)

    def predict(self, data: PhaseDataset) -> np.ndarray:
        """Predicted labels (argmax of the logits) of ``data``, shape (N,)."""
        X, _ = self.tensors(data)
        with torch.no_grad():
            return self.model(X.to(self.device)).argmax(1).cpu().numpy()

    def accuracy(self, data: PhaseDataset) -> float:
        """Fraction of ``data`` classified correctly."""
        return float((self.predict(data) == data.labels).mean())

    def misclassified(self, data: PhaseDataset) -> np.ndarray:
        """V1 of the misclassified points of ``data``."""
        return data.v1[self.predict(data) != data.labels]

    def saturated_fraction(self, tol: float = SATURATED_LOSS) -> float:
        """Fraction of training points whose cross-entropy is below ``tol`` (saturated)."""
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(self.model(self.X.to(self.device)), self.y.to(self.device),
                                                       reduction="none")
        return (losses < tol).double().mean().item()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def train_classifier(make_model: Callable[[], nn.Module], train: PhaseDataset, recipe: TrainingRecipe, *,
                     seed: int, device: str = "cpu", epochs: int | None = None,
                     progress: bool = True) -> TrainedModel:
    """Build a model (initialised with ``seed``) and train it in float64 on ``train`` with
    ``recipe`` (``epochs`` overrides its epoch count) and the paper's wd = 0.05 / n."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    scaler = MinMaxScaler.fit(train.amplitudes)
    X, y = train.tensors(scaler, DTYPE)
    wd = paper_weight_decay(len(X))
    result = recipe.train(model.to(DTYPE).to(device), X, y, weight_decay=wd, seed=seed, epochs=epochs,
                          progress=progress)
    return TrainedModel(result.model, scaler, X, y, wd, result.objective, result.grad_norm)


def _train(make_model: Callable[[], nn.Module], network: Network, train: PhaseDataset,
           cfg: DemoConfig) -> TrainedModel:
    """``train_classifier`` with the configuration's recipe for ``network``, seed and device."""
    return train_classifier(make_model, train, cfg.recipe(network), seed=cfg.seed, device=cfg.device,
                            epochs=cfg.epochs, progress=cfg.progress)


def _matrix_free_toolbox(obj: Objective, cfg: DemoConfig, damping: float | str = "auto",
                         eigenpairs: bool = True) -> Toolbox:
    """CG inverse + Lanczos top-``LEES_M`` eigenpairs (``eigenpairs=False``: no eigen backend to fit, for the
    experiments that need no LEES); ``damping="auto"`` applies the dense path's rule with
    λ_min from ARPACK on the matrix-free operator. The paper's networks are small, so the
    training chunks' gradient graphs are kept between Hessian products (``cache_graphs``)."""
    cg = CGCurvature(rtol=1e-10, max_iter=2000)
    eigen = LanczosCurvature(m=LEES_M, tol=1e-12, max_iter=400, seed=cfg.seed) if eigenpairs else None
    return Toolbox(obj, damping=damping, inverse=cg, eigen=eigen, cache_graphs=True)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------- the main comparison
@dataclass
class MethodResults:
    """Exact arrays the figures need, the side-by-side table rows and timings."""

    influence: np.ndarray
    relatif: np.ndarray
    rue: np.ndarray
    rue_analytic: np.ndarray
    lees: np.ndarray
    lees_pure_loss: np.ndarray
    lees_threshold: np.ndarray
    rows: list[dict[str, Any]]
    curvature: dict[str, Any]


def _compare_backends(main: TrainedModel, picks: tuple[torch.Tensor, torch.Tensor], test: PhaseDataset,
                      test_ood: PhaseDataset, cfg: DemoConfig) -> MethodResults:
    """All four methods with the dense oracle and with the matrix-free backends, side by side."""
    obj = main.objective(cfg)
    Xp, yp = picks
    Xt, _ = main.tensors(test)
    Xo, _ = main.tensors(test_ood)
    rows: list[dict[str, Any]] = []
    exact_out: dict[str, np.ndarray] = {}
    t: dict[str, float] = {}

    def row(method: str, backend: str, key: str, values: np.ndarray | None, **extra: Any) -> None:
        entry: dict[str, Any] = {"method": method, "backend": backend, "seconds": t[key]}
        if values is not None:
            if backend == "dense":
                exact_out[method] = values
            else:
                entry.update(agreement(exact_out[method], values))
        rows.append({**entry, **extra})

    # exact oracle
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    with _timed(t, "fit/dense", cfg.progress):
        exact.fit()
    row("fit", "dense", "fit/dense", None, damping=exact.damping, hvps=exact.operator.num_hvps)
    # matrix-free: CG inverse, Lanczos eigenpairs, at the exact δ so that the table compares
    # solvers, not dampings (the side experiments choose δ matrix-free, with ARPACK)
    free = _matrix_free_toolbox(obj, cfg, damping=exact.damping)
    with _timed(t, "fit/cg+lanczos", cfg.progress):
        free.fit()
    row("fit", f"cg + lanczos (m = {LEES_M})", "fit/cg+lanczos", None, hvps=free.operator.num_hvps)
    hvps_before_lissa = free.operator.num_hvps
    lissa = Toolbox(obj, damping=free.damping, eigen=free.eigen, cache_graphs=True, operator=free.operator,
                    inverse=LiSSACurvature(deflate=10, target=1e-4, batch_size=len(main.X), seed=cfg.seed,
                                           progress=False, warn_residual=None, lanczos_tol=1e-12))
    with _timed(t, "fit/lissa", cfg.progress):
        lissa.fit()
    row("fit", "lissa (deflate 10, full batch)", "fit/lissa", None, hvps=lissa.operator.num_hvps - hvps_before_lissa)

    calls = [
        ("influence", "dense", lambda: exact.influence(Xp, yp)),
        ("influence", "cg", lambda: free.influence(Xp, yp)),
        ("influence", "lissa", lambda: lissa.influence(Xp, yp)),
        ("relatif", "dense", lambda: exact.relatif(Xp, yp)),
        ("relatif", "cg + kfac normaliser", lambda: free.relatif(Xp, yp, normalizer="kfac")),
        ("relatif", "cg + ekfac normaliser", lambda: free.relatif(Xp, yp, normalizer="ekfac")),
        ("rue_analytic", "dense", lambda: exact.rue(Xt, method="analytic", labels="predicted")),
        ("rue_bootstrap", "dense", lambda: exact.rue(Xt, n_bootstrap=50, seed=cfg.seed, labels="predicted")),
        ("rue_bootstrap", "cg", lambda: free.rue(Xt, n_bootstrap=50, seed=cfg.seed, labels="predicted")),
        ("lees", "dense", lambda: exact.extrapolation_score(Xo, m=LEES_M)),
        ("lees", "lanczos", lambda: free.extrapolation_score(Xo, m=LEES_M)),
    ]
    lees_m: dict[str, int] = {}
    for method, backend, call in calls:
        key = f"{method}/{backend}"
        with _timed(t, key, cfg.progress):
            values = _np(call())
        extra = {}
        if method == "lees":
            lees_m[backend] = (exact if backend == "dense" else free).last_m
            extra["m"] = lees_m[backend]
        row(method, backend, key, values, **extra)

    # LEES of the pure loss gradient (without wd·θ̃, which every test gradient shares), and with
    # m from the threshold rule (eigenvalues > 0.1 removed, at least 2)
    lees_pure_loss = _np(exact.extrapolation_score(Xo, m=LEES_M, test_loss="loss"))
    lees_threshold = _np(exact.extrapolation_score(Xo, m=None, threshold=0.1))
    lees_m["dense, threshold 0.1"] = exact.last_m
    curvature = {"damping": exact.damping, "min_eigenvalue": exact.eigen.min_eigenvalue(),
                 "top_eigenvalues": _np(exact.eigen.eigh(5)[0]).tolist(), "lees_m": lees_m,
                 "dense": dict(exact.diagnostics["inverse"]), "cg": dict(free.diagnostics["inverse"]),
                 "lanczos": dict(free.diagnostics["eigen"]), "lissa": dict(lissa.diagnostics["inverse"])}
    return MethodResults(exact_out["influence"], exact_out["relatif"], exact_out["rue_bootstrap"],
                         exact_out["rue_analytic"], exact_out["lees"], lees_pure_loss, lees_threshold, rows,
                         _jsonable(curvature))


def _jsonable(value: Any) -> Any:
    """Diagnostics made JSON-safe (tensors and numpy values to lists and floats)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# --------------------------------------------------------------------------- the paper's experiments
def _sign_experiment(cfg: DemoConfig, transition_v1: float) -> dict[str, Any]:
    """Fig. 4: models trained on the sign-imbalanced and sign-balanced sets, influence (CG) of
    every training point on one test point near the transition (positive sign for the
    imbalanced set, negative sign for the balanced set, as in the paper)."""
    out: dict[str, Any] = {}
    for variant, test_sign in (("imbalanced", "positive"), ("balanced", "negative")):
        train = training_set(12, cfg.side_points_per_phase, sign=variant, seed=cfg.seed, progress=cfg.progress)
        trained = _train(PaperCNN, "sign", train, cfg)
        tests = {sign: evaluation_set(12, sign=sign, seed=cfg.seed, progress=cfg.progress)
                 for sign in ("positive", "negative")}
        target = tests[test_sign]
        i = int(np.argmin(np.abs(target.v1 - transition_v1)))
        X, y = trained.tensors(target)
        tb = _matrix_free_toolbox(trained.objective(cfg), cfg, eigenpairs=False)
        infl = _np(tb.influence(X[i:i + 1], y[i:i + 1]))[0]
        flipped = train.sign_flipped
        same_sign = flipped if test_sign == "negative" else ~flipped
        helpful = np.argsort(infl)[::-1][:5]
        entry: dict[str, Any] = {
            "test_sign": test_sign, "test_v1": float(target.v1[i]), "damping": tb.damping,
            "train_objective": trained.objective_value,
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


def _size_experiment(cfg: DemoConfig) -> dict[str, Any]:
    """Fig. 6 (a)-(b): the size-invariant CNN trained on 12 and 14 sites (``size_points_per_phase``
    or ``side_points_per_phase`` per phase), RUE (CG, δ' = δ + 1, predicted labels) on each
    reference test set."""
    out: dict[str, Any] = {}
    per_phase = cfg.size_points_per_phase or cfg.side_points_per_phase
    for L in (12, 14):
        train = training_set(L, per_phase, progress=cfg.progress)
        test = evaluation_set(L, progress=cfg.progress)
        trained = _train(SizeInvariantCNN, "gap", train, cfg)
        X, _ = trained.tensors(test)
        tb = _matrix_free_toolbox(trained.objective(cfg), cfg, eigenpairs=False)
        rue = _np(tb.rue(X, n_bootstrap=50, seed=cfg.seed, labels="predicted"))
        out[str(L)] = {"n_train": len(trained.X), "v1": test.v1.tolist(), "rue": rue.tolist(),
                       "accuracy": trained.accuracy(test),
                       "order_parameter": cdw_order_parameter(L, test.amplitudes).tolist(),
                       "damping": tb.damping, "uncertain_region": uncertain_region(test.v1, rue)}
    return out


# --------------------------------------------------------------------------- run
def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Generate data, train, fit once, run the four methods on every backend, draw the
    selected figures; write ``report.json`` and the PNGs into ``cfg.out``; return the report."""
    timings: dict[str, float] = {}
    figure_names = cfg.selected_figures
    cfg.out.mkdir(parents=True, exist_ok=True)
    with _timed(timings, "data", cfg.progress):
        train = training_set(12, cfg.points_per_phase, progress=cfg.progress)
        test = evaluation_set(12, progress=cfg.progress)
        test_ood = evaluation_set(12, ood_fraction=0.1, seed=cfg.seed, progress=cfg.progress)
    with _timed(timings, "training", cfg.progress):
        main = _train(PaperCNN, "paper", train, cfg)

    # test points deep in the LL phase, at the transition, deep in CDW-I (the paper's Fig. 3)
    picks = {name: int(np.argmin(np.abs(test.v1 - v1))) for name, v1 in FIG3_TEST_V1.items()}
    idx = list(picks.values())
    Xt, yt = main.tensors(test)
    with _timed(timings, "methods (all backends)"):
        res = _compare_backends(main, (Xt[idx], yt[idx]), test, test_ood, cfg)

    obj = main.objective(cfg)
    Xo, _ = main.tensors(test_ood)
    ood_loss = _np(obj.per_sample_losses(Xo, labels="predicted", test_loss="loss"))
    ood = test_ood.ood
    fig3_points = {}
    for j, (name, i) in enumerate(zip(picks, idx)):
        entry = {"v1": float(test.v1[i])}
        for method, values in (("influence", res.influence[j]), ("relatif", res.relatif[j])):
            helpful, harmful = figures.top_k(values)
            entry[method] = {"most_helpful": helpful.tolist(), "most_harmful": harmful.tolist(),
                             "helpful_v1": train.v1[helpful].tolist(), "harmful_v1": train.v1[harmful].tolist(),
                             "values": values.tolist()}
        fig3_points[name] = entry
    report: dict[str, Any] = {
        "example": "1D spinless Fermi-Hubbard, L=12, paper CNN (740 parameters)",
        "config": {"quick": cfg.quick, "n_per_phase": cfg.points_per_phase, "regime": cfg.regime,
                   "recipe": asdict(cfg.recipe("paper")), "epochs": cfg.recipe("paper").epochs(len(main.X))
                   if cfg.epochs is None else cfg.epochs,
                   "seed": cfg.seed, "device": cfg.device, "figures": list(figure_names)},
        "n_train": len(main.X), "n_test": len(test), "num_params": obj.num_params, "weight_decay": main.weight_decay,
        "training": {"objective": main.objective_value, "grad_norm": main.grad_norm,
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
        with _timed(timings, "sign experiment (fig4)", cfg.progress):
            report["sign_anomaly"] = _sign_experiment(cfg, 1.0)
    if "fig6" in figure_names and cfg.size_comparison:
        with _timed(timings, "12 vs 14 sites (fig6)", cfg.progress):
            report["system_size"] = _size_experiment(cfg)

    with _timed(timings, "figures"):
        report["figures"] = _draw(report, figure_names, cfg.out)
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    (cfg.out / "report.json").write_text(json.dumps(_jsonable(report), indent=1))
    return report


def _draw(report: dict[str, Any], names: tuple[str, ...], out: Path) -> list[str]:
    """Draw the selected figures from the report's arrays; return the PNG file names."""
    made: list[tuple[str, Figure]] = []
    if "fig3" in names:
        fr = report["influence_vs_relatif"]
        pts = fr["test_points"]
        made.append(("fig3_influence_vs_relatif.png", figures.influence_vs_relatif_figure(
            np.array(fr["v1_train"]), np.array([p["influence"]["values"] for p in pts.values()]),
            np.array([p["relatif"]["values"] for p in pts.values()]), [p["v1"] for p in pts.values()],
            titles=[f"{name.replace('_', ' ')}: $V_1/J$ = {p['v1']:.3g}" for name, p in pts.items()])))
    if "fig4" in names and "sign_anomaly" in report:
        sa = report["sign_anomaly"]
        v1 = np.array(sa["v1_train"])
        panels = [figures.SignPanel("(a) sign-imbalanced training set, positive test point", v1,
                                    np.array(sa["imbalanced"]["influence"]), np.array(sa["imbalanced"]["flipped"]),
                                    sa["imbalanced"]["test_v1"]),
                  figures.SignPanel("(b) sign-balanced training set, negative test point", v1,
                                    np.array(sa["balanced"]["influence"]), np.array(sa["balanced"]["flipped"]),
                                    sa["balanced"]["test_v1"])]
        made.append(("fig4_sign_anomaly.png", figures.sign_anomaly_figure(panels)))
    if "fig5" in names:
        lo = report["lees_ood"]
        made.append(("fig5_lees_ood.png", figures.lees_figure(
            np.array(lo["v1"]), np.array(lo["minimal_test_loss"]), np.array(lo["lees"]), np.array(lo["ood"]),
            auroc=lo["auroc_lees"])))
    if "fig6" in names:
        if "system_size" in report:
            panels = [figures.RUEPanel(f"({'ab'[k]}) size-invariant CNN, L = {L}", np.array(d["v1"]),
                                       np.array(d["rue"]), np.array(d["order_parameter"]))
                      for k, (L, d) in enumerate(report["system_size"].items())]
        else:
            panels = [figures.RUEPanel("(a) paper CNN, L = 12", np.array(report["rue"]["v1"]),
                                       np.array(report["rue"]["bootstrap"]))]
        made.append(("fig6_rue.png", figures.rue_figure(panels, RUE_THRESHOLD)))
    names_out = []
    for name, fig in made:
        fig.savefig(out / name, dpi=120)
        names_out.append(name)
    return names_out


# --------------------------------------------------------------------------- printing
def format_table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table: per method and backend, agreement with exact and seconds."""
    head = f"  {'method':<14} {'backend':<34} {'Pearson':>8} {'Spearman*':>9} {'max rel err':>11} {'seconds':>8}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        def fmt(key: str, spec: str) -> str:
            return format(r[key], spec) if key in r and r[key] == r[key] else "–"
        lines.append(f"  {r['method']:<14} {r['backend']:<34} {fmt('pearson', '8.5f'):>8} "
                     f"{fmt('spearman_resolved', '9.5f'):>9} {fmt('max_rel_error', '11.2e'):>11} {r['seconds']:8.2f}")
    lines.append("  * Spearman over the resolved points (exact value off the float64 tie floor); worst test point.")
    return "\n".join(lines)


def format_summary(report: dict[str, Any]) -> str:
    """A human-readable summary of a demo report."""
    c, tr = report["curvature"], report["training"]
    lo = report["lees_ood"]
    lines = [
        report["example"],
        f"  n_train = {report['n_train']}, n_test = {report['n_test']}, M = {report['num_params']}, "
        f"test accuracy = {tr['test_accuracy']:.3f} (misclassified at V1 = {_v1s(tr['misclassified_v1'])}), "
        f"‖∇L‖ = {tr['grad_norm']:.2e}, saturated training points {tr['saturated_fraction']:.2f} "
        f"(regime {report['config']['regime']})",
        f"  Hessian: top eigenvalues {', '.join(f'{v:.3g}' for v in c['top_eigenvalues'])}, "
        f"λ_min = {c['min_eigenvalue']:.3g}; damping (auto) δ = {c['damping']:.4g}",
        "",
        format_table(report["comparison"]),
        "",
    ]
    for name, tp in report["influence_vs_relatif"]["test_points"].items():
        lines.append(f"  Fig. 3 {name:<10} V1 = {tp['v1']:6.3f}: 5 most helpful at V1 "
                     f"{_v1s(tp['influence']['helpful_v1'])} (influence), "
                     f"{_v1s(tp['relatif']['helpful_v1'])} (RelatIF)")
    lines.append(f"  Fig. 5 LEES (m = {lo['m']}): AUROC for the {lo['n_ood']} permuted points {lo['auroc_lees']:.3f} "
                 f"(threshold rule, m = {lo['m_threshold_rule']}: {lo['auroc_lees_threshold_rule']:.3f}; "
                 f"pure-loss gradient {lo['auroc_lees_pure_loss']:.3f}, minimal test loss "
                 f"{lo['auroc_test_loss']:.3f}); {lo['ood_above_both_neighbours']}/{lo['n_ood']} OOD points "
                 "above both neighbours")
    region = report["rue"]["uncertain_region"]
    lines.append(f"  Fig. 6 RUE (L = 12, paper CNN) > 5e-5 for V1 in {region['paper_5e-5']['v1_range']}, "
                 f"> 5 % of max in {region['relative_5pct']['v1_range']}")
    for L, d in report.get("system_size", {}).items():
        r = d["uncertain_region"]
        lines.append(f"  Fig. 6 RUE (L = {L}, size-invariant CNN, accuracy {d['accuracy']:.2f}) > 5e-5 for V1 in "
                     f"{r['paper_5e-5']['v1_range']}, > 5 % of max in {r['relative_5pct']['v1_range']}")
    if "sign_anomaly" in report:
        sa = report["sign_anomaly"]
        im, ba = sa["imbalanced"], sa["balanced"]
        lines.append(f"  Fig. 4 sign-imbalanced: {im['flipped_among_top_outsiders']}/{im['n_flipped']} flipped "
                     f"points are among the {im['n_flipped']} largest outsiders (AUROC "
                     f"{im['auroc_outsider_score_for_flipped']:.3f}); test accuracy positive/negative sign "
                     f"{im['accuracy']['positive']:.2f}/{im['accuracy']['negative']:.2f}")
        lines.append(f"  Fig. 4 sign-balanced: {ba['top5_helpful_same_sign']}/5 most helpful share the test point's "
                     "sign; "
                     f"mean |I| same sign {ba['mean_abs_influence']['same_sign']:.3g} vs opposite "
                     f"{ba['mean_abs_influence']['opposite_sign']:.3g}")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    if report["figures"]:
        lines.append("  figures: " + ", ".join(report["figures"]))
    return "\n".join(lines)


def _v1s(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in sorted(values)) + "]"
