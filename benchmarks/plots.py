"""PNG plots of the benchmark results (matplotlib, Agg; small files, 100 dpi).

* ``scaling_M.png``: seconds and peak memory against M (log-log), one line per operation
  with its fitted slope in the legend, the dense fit's measured points, and the dense
  path's M² wall (``DenseCurvature.required_bytes(M)`` = available memory) as a vertical line.
* ``scaling_n.png``: the same against n at fixed M.
* ``accuracy.png``: relative error of every (method, backend) against the dense oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100


def _slope_of(slopes: list[dict], op: str, family: str, key: str) -> float | None:
    return next((s[key] for s in slopes if s["op"] == op and s["family"] == family), None)


def scaling_figure(scaling: dict[str, Any], family: str, path: Path) -> Path:
    """Two panels (seconds, peak bytes) against ``family`` ("M" or "n"), log-log."""
    points = [p for p in scaling["points"] if p["family"] == family]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for op in dict.fromkeys(p["op"] for p in points):
        mine = sorted((p for p in points if p["op"] == op), key=lambda p: p[family])
        x = [p[family] for p in mine]
        for ax, key, skey in ((axes[0], "seconds", "time_slope"), (axes[1], "peak_bytes", "memory_slope")):
            slope = _slope_of(scaling["slopes"], op, family, skey)
            label = op + (f" (slope {slope:.2f})" if slope is not None else "")
            y = [max(p[key], 1e-9 if key == "seconds" else 1.0) for p in mine]
            ax.plot(x, y, "o-", label=label, markersize=4)
    wall = scaling.get("dense_wall", {})
    if family == "M" and wall:
        for ax in axes:
            ax.axvline(wall["M"], color="k", ls="--", lw=1)
            ax.text(wall["M"], 0.98, f" dense M² wall\n M = {wall['M']:,}",
                    transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        Ms = np.logspace(np.log10(min(p["M"] for p in points)), np.log10(wall["M"] * 3), 50)
        axes[1].plot(Ms, wall["bytes_per_M2"] * Ms ** 2, "k:", lw=1, label="dense needs 3.5·8·M² bytes")
        axes[1].axhline(wall["budget_bytes"], color="grey", lw=0.8, label="available memory")
    for ax, ylabel in ((axes[0], "seconds"), (axes[1], "peak memory growth (bytes)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters M" if family == "M" else "training points n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fixed = scaling["families"][family]
    fig.suptitle(f"Scaling in {family}: MLP family, " + (f"n = {fixed['n']}" if family == "M" else f"M ≈ {fixed['M']:,}"))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def accuracy_figure(rows: list[dict], path: Path) -> Path:
    """Grouped bars: relative error (log scale) per method, one bar per backend, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = ["influence", "relatif", "rue", "lees"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["backend"] != "dense" and r["method"] in methods
                and r.get("max_rel_error") is not None]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / max(len(backends), 1)
        for j, b in enumerate(backends):
            vals = []
            for m in methods:
                r = next((r for r in mine if r["backend"] == b and r["method"] == m), None)
                vals.append(max(r["max_rel_error"], 1e-16) if r else np.nan)
            ax.bar(np.arange(len(methods)) + j * width, vals, width, label=b)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
        ax.set_xticklabels(methods)
        ax.set_ylabel("relative error vs dense")
        ax.set_title(model)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot the results allow; returns the written files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    extra = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    scaling = next((e for e in extra if e.get("kind") == "scaling"), None)
    if scaling:
        written.append(scaling_figure(scaling, "M", out_dir / "scaling_M.png"))
        written.append(scaling_figure(scaling, "n", out_dir / "scaling_n.png"))
    acc = [r for e in extra if e.get("kind") == "accuracy" for r in e["accuracy"]]
    if acc:
        written.append(accuracy_figure(acc, out_dir / "accuracy.png"))
    return written
