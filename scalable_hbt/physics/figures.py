"""Plain-matplotlib versions of the paper's Figs. 3–6 (Dawid et al. 2021, section III).

Every function takes arrays and returns a :class:`matplotlib.figure.Figure`; nothing here
computes curvature or trains a model (``scalable_hbt.apps.demo`` does that), so the drawing is
testable on small synthetic arrays. Conventions shared by all figures, as in the paper:

* x axis: V1 on a symmetric-log scale, linear on [0, 1] (Luttinger liquid) and
  logarithmic above (CDW-I);
* background colour changes at the transition V1 = 1 (LL left, CDW-I right);
* training points are blue (LL) or purple (CDW-I); the five most helpful (harmful)
  training points are green (red); the analysed test point is an orange vertical line.

The figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state), so
they work under any backend, Agg included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..metrics import top_k

__all__ = [
    "LL_COLOR",
    "CDW_COLOR",
    "HELPFUL_COLOR",
    "HARMFUL_COLOR",
    "TEST_COLOR",
    "top_k",
    "influence_vs_relatif_figure",
    "SignPanel",
    "sign_anomaly_figure",
    "lees_figure",
    "RUEPanel",
    "rue_figure",
]

LL_COLOR = "tab:blue"
CDW_COLOR = "tab:purple"
HELPFUL_COLOR = "tab:green"
HARMFUL_COLOR = "tab:red"
TEST_COLOR = "tab:orange"
TRANSITION = 1.0
_LL_BACKGROUND = "#e8f0fb"
_CDW_BACKGROUND = "#f3eafa"


def _phase_axis(ax: Axes, v1: np.ndarray) -> None:
    """Symmetric-log V1 axis with the LL / CDW-I background split at V1 = 1."""
    lo, hi = 0.0, max(float(np.max(v1)) * 1.1, 2.0)
    ax.set_xscale("symlog", linthresh=TRANSITION, linscale=1.0)
    ax.set_xlim(lo, hi)
    ax.axvspan(lo, TRANSITION, color=_LL_BACKGROUND, zorder=0)
    ax.axvspan(TRANSITION, hi, color=_CDW_BACKGROUND, zorder=0)
    ticks = [t for t in (0, 0.5, 1, 2, 5, 10, 20, 40) if t <= hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("$V_1/J$")


def _scatter_training(ax: Axes, v1: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Training points coloured by phase, top-k helpful / harmful highlighted; returns the top-k."""
    ll = v1 <= TRANSITION
    ax.scatter(v1[ll], values[ll], s=6, color=LL_COLOR, label="LL training point", zorder=2)
    ax.scatter(v1[~ll], values[~ll], s=6, color=CDW_COLOR, label="CDW-I training point", zorder=2)
    helpful, harmful = top_k(values, k)
    ax.scatter(v1[helpful], values[helpful], s=30, color=HELPFUL_COLOR, label=f"{k} most helpful", zorder=3)
    ax.scatter(v1[harmful], values[harmful], s=30, color=HARMFUL_COLOR, label=f"{k} most harmful", zorder=3)
    return helpful, harmful


def influence_vs_relatif_figure(v1_train: np.ndarray, influence: np.ndarray, relatif: np.ndarray,
                                test_v1: Sequence[float], titles: Sequence[str] | None = None,
                                k: int = 5) -> Figure:
    """Fig. 3: influence (top row) vs RelatIF (bottom row), one column per test point.

    Args:
        v1_train: V1 of every training point, shape (n,).
        influence, relatif: shape (T, n), one row per test point.
        test_v1: V1 of the T test points (orange vertical lines).
        titles: column titles (default: the test point's V1).
        k: number of most helpful / harmful points to mark.
    """
    v1_train = np.asarray(v1_train, dtype=float)
    influence, relatif = np.atleast_2d(influence), np.atleast_2d(relatif)
    n_cols = influence.shape[0]
    if relatif.shape != influence.shape or influence.shape[1] != len(v1_train) or len(test_v1) != n_cols:
        raise ValueError(f"shapes disagree: influence {influence.shape}, relatif {relatif.shape}, "
                         f"{len(v1_train)} training V1 values, {len(test_v1)} test V1 values.")
    titles = list(titles) if titles is not None else [f"$V_1/J$ = {v:.3g}" for v in test_v1]
    fig = Figure(figsize=(4.2 * n_cols, 6.4), layout="constrained")
    axes = fig.subplots(2, n_cols, squeeze=False)
    for col in range(n_cols):
        for row, (values, name) in enumerate(((influence[col], "influence $\\mathcal{I}$"),
                                              (relatif[col], "RelatIF $\\mathcal{I}_R$"))):
            ax = axes[row, col]
            _phase_axis(ax, v1_train)
            _scatter_training(ax, v1_train, values, k)
            ax.axvline(test_v1[col], color=TEST_COLOR, lw=1.5, label="test point", zorder=1)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if row == 0:
                ax.set_title(titles[col])
            if col == 0:
                ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("Fig. 3 — influence functions (top) vs RelatIF (bottom)")
    return fig


@dataclass(frozen=True)
class SignPanel:
    """One panel of Fig. 4: the influence of every training point on one test point.

    Attributes:
        title: panel title.
        v1_train: V1 of every training point, shape (n,).
        influence: influence on the test point, shape (n,).
        flipped: True for training points with a flipped global sign, shape (n,).
        test_v1: V1 of the test point.
        k: number of most helpful / harmful points to mark.
    """

    title: str
    v1_train: np.ndarray
    influence: np.ndarray
    flipped: np.ndarray
    test_v1: float
    k: int = 5


def sign_anomaly_figure(panels: Sequence[SignPanel]) -> Figure:
    """Fig. 4: influence reveals the global-sign anomaly; flipped-sign points are ringed in black.

    Symmetric-log y axis (as in the paper); its linear range is 1e-3 of the largest |influence|.
    """
    fig = Figure(figsize=(6.0 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        v1 = np.asarray(panel.v1_train, dtype=float)
        values = np.asarray(panel.influence, dtype=float)
        flipped = np.asarray(panel.flipped, dtype=bool)
        if not (len(v1) == len(values) == len(flipped)):
            raise ValueError(f"panel {panel.title!r}: v1_train, influence and flipped need equal lengths.")
        _phase_axis(ax, v1)
        _scatter_training(ax, v1, values, panel.k)
        ax.scatter(v1[flipped], values[flipped], s=60, facecolors="none", edgecolors="black", linewidths=1.0,
                   label="flipped global sign", zorder=4)
        ax.axvline(panel.test_v1, color=TEST_COLOR, lw=1.5, label="test point", zorder=1)
        scale = float(np.max(np.abs(values))) if values.size else 1.0
        ax.set_yscale("symlog", linthresh=max(scale * 1e-3, np.finfo(float).tiny), linscale=2.0)
        ax.set_title(panel.title)
        ax.set_ylabel("influence $\\mathcal{I}$")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Fig. 4 — influence functions and the global sign of the training data")
    return fig


def lees_figure(v1_test: np.ndarray, test_loss: np.ndarray, lees: np.ndarray, ood: np.ndarray,
                auroc: float | None = None, log: bool = True) -> Figure:
    """Fig. 5: minimal test loss (line) and LEES (triangles), both scaled to a maximum of 1;
    permuted (OOD) test points as red vertical lines. ``log``: logarithmic y axis (our
    trained minima are so saturated that both quantities span many decades)."""
    v1 = np.asarray(v1_test, dtype=float)
    loss, score = np.asarray(test_loss, dtype=float), np.asarray(lees, dtype=float)
    ood = np.asarray(ood, dtype=bool)
    if not (len(v1) == len(loss) == len(score) == len(ood)):
        raise ValueError("v1_test, test_loss, lees and ood need equal lengths.")
    tiny = np.finfo(float).tiny
    loss, score = loss / max(loss.max(), tiny), score / max(score.max(), tiny)
    if log:
        floor = 1e-16
        loss, score = np.maximum(loss, floor), np.maximum(score, floor)
    order = np.argsort(v1)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    _phase_axis(ax, v1)
    for i, x in enumerate(v1[ood]):
        ax.axvline(x, color=HARMFUL_COLOR, lw=1.0, alpha=0.7, label="permuted (OOD) points" if i == 0 else None)
    ax.plot(v1[order], loss[order], color=CDW_COLOR, label="minimal test loss (scaled)")
    ax.scatter(v1, score, marker="^", color=LL_COLOR, zorder=3, label="LEES (scaled)")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("value / max")
    title = "Fig. 5 — extrapolation score (LEES) vs minimal test loss"
    ax.set_title(title if auroc is None else f"{title}\nAUROC of LEES for OOD points = {auroc:.3f}")
    ax.legend(fontsize=8, loc="best")
    return fig


@dataclass(frozen=True)
class RUEPanel:
    """One panel of Fig. 6: RUE of one model on its test set.

    Attributes:
        title: panel title.
        v1: V1 of the test points, shape (T,).
        rue: RUE of every test point, shape (T,).
        order_parameter: O_CDW-I of the test states, shape (T,), or None.
    """

    title: str
    v1: np.ndarray
    rue: np.ndarray
    order_parameter: np.ndarray | None = None


def rue_figure(panels: Sequence[RUEPanel], threshold: float) -> Figure:
    """Fig. 6: per model, RUE as error bars (±RUE around zero, top row, as in the paper) and
    RUE on a log scale with the threshold (bottom row); the region RUE > ``threshold`` is
    shaded. An extra column shows the order parameters of the panels that carry one."""
    with_order = [p for p in panels if p.order_parameter is not None]
    n_cols = len(panels) + (1 if with_order else 0)
    fig = Figure(figsize=(4.6 * n_cols, 6.4), layout="constrained")
    axes = fig.subplots(2, n_cols, squeeze=False)
    for col, panel in enumerate(panels):
        v1, rue = np.asarray(panel.v1, dtype=float), np.asarray(panel.rue, dtype=float)
        if len(v1) != len(rue):
            raise ValueError(f"panel {panel.title!r}: v1 and rue need equal lengths.")
        top, bottom = axes[0, col], axes[1, col]
        above = v1[rue > threshold]
        for ax in (top, bottom):
            _phase_axis(ax, v1)
            if above.size:
                ax.axvspan(above.min(), above.max(), color=TEST_COLOR, alpha=0.2,
                           label=f"RUE > {threshold:.0e}: [{above.min():.2f}, {above.max():.2f}]")
        top.errorbar(v1, np.zeros_like(rue), yerr=rue, fmt="o", ms=2.5, color=CDW_COLOR, ecolor=CDW_COLOR,
                     capsize=2, label="RUE")
        top.set_title(panel.title)
        top.set_ylabel("RUE as error bar")
        top.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        top.legend(fontsize=7, loc="best")
        bottom.scatter(v1, np.maximum(rue, 1e-30), s=10, color=CDW_COLOR)
        bottom.axhline(threshold, color="black", lw=0.8, ls="--", label=f"threshold {threshold:.0e}")
        bottom.set_yscale("log")
        bottom.set_ylabel("RUE (log scale)")
        bottom.legend(fontsize=7, loc="best")
    if with_order:
        ax = axes[0, -1]
        _phase_axis(ax, np.concatenate([np.asarray(p.v1, dtype=float) for p in with_order]))
        for panel in with_order:
            order = np.argsort(panel.v1)
            ax.plot(np.asarray(panel.v1)[order], np.asarray(panel.order_parameter)[order], marker=".",
                    label=panel.title)
        ax.set_ylabel("$O_\\mathrm{CDW-I}$")
        ax.set_title("order parameter")
        ax.legend(fontsize=7, loc="best")
        axes[1, -1].set_visible(False)
    fig.suptitle("Fig. 6 — RUE and the width of the transition region")
    return fig
