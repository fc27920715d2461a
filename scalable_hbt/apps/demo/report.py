"""What the demo hands back: the figures drawn from a report's arrays, the human-readable
summary with the side-by-side table, and ``report.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ...physics import figures
from .analysis import RUE_THRESHOLD

REPORT_FILE = "report.json"


def jsonable(value: Any) -> Any:
    """Diagnostics made JSON-safe (tensors and numpy values to lists and floats)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write ``report`` as JSON (``jsonable``) to ``out / REPORT_FILE``; return the path."""
    path = out / REPORT_FILE
    path.write_text(json.dumps(jsonable(report), indent=1))
    return path


def draw_figures(report: dict[str, Any], names: tuple[str, ...], out: Path) -> list[str]:
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
