"""Markdown for the solver benchmarks of ``test_solvers.py`` (``kind`` ``solvers_published``,
``solvers_demo``, ``solvers_cost`` in ``extra_info``): LiSSA's defaults on the published-like
model, the demo's matrix-free phases, and the cost model of ``docs/cost.md`` against
measurements. ``render.py`` appends :func:`solvers_markdown`'s text to RESULTS.md; the same
function writes ``SOLVERS.md`` from a JSON of these benchmarks alone."""

from __future__ import annotations

from typing import Any

from tables import fmt

from scalable_hbt.memory import format_bytes


def _fmt(x: Any) -> str:
    """A table cell, a boolean goal read as met / not met."""
    return fmt(x, booleans=("met", "**not met**"))


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows] + [""]


def _extra(data: dict, kind: str) -> dict | None:
    return next((b["extra_info"] for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("kind") == kind),
                None)


def _ratio(r: dict) -> list[Any]:
    return [r["quantity"], r["value"], f"{_fmt(r['lo'])}–{_fmt(r['hi'])}", r["rounds"], r["goal"], r["met"], r["note"]]


RATIO_HEAD = ["quantity", "median", "min–max", "rounds", "goal", "result", "note"]


def _published(p: dict) -> list[str]:
    out = ["### LiSSA with its defaults on a model trained like the published one", ""]
    out.append(f"{p['model']}, M = {p['M']}, eval-mode Hessian, δ = {p['damping']:g}: λ_max = {_fmt(p['lambda_max'])}, "
               f"λ_2 = {_fmt(p['lambda_2'])}, **λ_min = {_fmt(p['lambda_min'])}** (indefinite), condition number of "
               f"H + δI κ = {_fmt(p['condition_number'])}; test accuracy {_fmt(p['test_accuracy'])}, saturated "
               f"training points {_fmt(p['saturated_fraction'])}. `Toolbox(obj, damping={p['damping']:g}, "
               "inverse=\"lissa\")` (fit included: the default Lanczos eigen backend whose pairs it deflates with, "
               "and its λ_min estimate) against `Toolbox(obj, damping=..., inverse=\"cg\", eigen=None)` (no fit), "
               f"influence of {p['test_points']} test points. Reference: {p['reference']}.")
    out.append("")
    out += _table(["solver", "min Spearman over test points", "relative error", "HVPs", "LiSSA depth / CG iterations"],
                  [["LiSSA (defaults)", p["lissa_spearman_min"], p["lissa_rel_error"], p["lissa_hvps"],
                    p["lissa_depth"]],
                   ["CG (defaults)", p["cg_spearman_min"], p["cg_rel_error"], p["cg_hvps"], p["cg_iterations"]]])
    goal = ["LiSSA Spearman ≥ 0.95 at every test point", p["lissa_spearman_min"], "—", 1, "≥ 0.95",
            p["spearman_met"], f"{p['test_points']} test points"]
    out += _table(RATIO_HEAD, [_ratio(p["time_ratio"]), goal])
    return out


def _lissa_recursion(d: dict) -> str:
    """'; Chebyshev on [a, b], σ = …' for a run that reports its interval, else ''."""
    if d.get("lissa_acceleration") != "chebyshev":
        return ""
    a, b = d["lissa_interval"]
    return (f"; Chebyshev on [a, b] = [{_fmt(a)}, {_fmt(b)}] from λ̂_min = {_fmt(d['lissa_lambda_min_estimate'])}, "
            f"κ = b/a = {_fmt(b / a)}, σ = {_fmt(d['lissa_contraction'])}")


def _demo(d: dict) -> list[str]:
    out = ["### The demo's matrix-free phases", ""]
    out.append(f"{d['model']}, M = {d['M']}, δ = {_fmt(d['damping'])} (dense rule), δ' = {_fmt(d['rue_damping'])}; "
               "the demo's CG (rtol 1e-10, cached graphs) and Lanczos pairs. RUE: one reweighted-gradient pass + one "
               f"CG solve of the B right-hand sides together (blocks of max_vectors = 32; {d['rue_cg_iterations']} iterations, {_fmt(d['rue_hvps'])} HVPs) against CG "
               f"influence for as many test points ({d['influence_cg_iterations']} iterations, "
               f"{_fmt(d['influence_50_hvps'])} HVPs). LiSSA (deflate 10 with the Lanczos pairs, full batch, its "
               f"λ_min fit included{_lissa_recursion(d)}): depth {d['lissa_depth']}, {_fmt(d['lissa_hvps'])} HVPs "
               f"({_fmt(d['lissa_fit_hvps'])} of them its fit), relative error "
               f"{_fmt(d['lissa_rel_error'])} (min Spearman {_fmt(d['lissa_spearman_min'])}); CG: "
               f"{d['cg_iterations']} iterations, {_fmt(d['cg_hvps'])} HVPs, relative error {_fmt(d['cg_rel_error'])}.")
    out.append("")
    out += _table(RATIO_HEAD, [_ratio(d["rue_ratio"]), _ratio(d["lissa_ratio"])])
    return out


def _cost(rows: list[dict]) -> list[str]:
    out = ["### Cost model vs measurement", ""]
    out.append("Each backend in a fresh process (`benchmarks/cost_worker.py`): MLPs at their seeded initialisation on "
               "random data (small: M = 2,762, n = 512; wide: M = 273,418, n = 64; one chunk, float64), k = 8 "
               "right-hand sides, δ = max(−λ_min, 0) + 0.1, every "
               "backend with its defaults (CG rtol 1e-8, m = 20 eigenpairs). Predicted: the formulas of "
               "`docs/cost.md` with the measured spectrum (κ of H + δI; LiSSA: λ_{11}, λ_min, its default target "
               "1e-3; Lanczos: the flat-spectrum count 9m; K-FAC: its factors, EK-FAC with its fit buffer). Peak memory: growth of the resident set during the phase "
               "(fit or solve, the larger), so it includes the product's activations and allocator slack.")
    out.append("")
    out += _table(["problem", "backend", "M", "κ", "HVPs fit + solve", "predicted", "measured / predicted",
                   "peak memory", "predicted", "measured / predicted"],
                  [[r["problem"], r["backend"], r["M"], r["kappa"],
                    f"{_fmt(r['fit_hvps'])} + {_fmt(r['solve_hvps'])}",
                    f"{_fmt(float(r['predicted_fit_hvps']))} + {_fmt(float(r['predicted_solve_hvps']))}",
                    r["hvps_ratio"], format_bytes(r["peak_bytes"]), format_bytes(r["predicted_bytes"]),
                    r["memory_ratio"]] for r in rows])
    return out


def solvers_markdown(data: dict, stamp: str = "") -> str:
    """The solver sections for the benchmarks present in ``data`` (pytest-benchmark JSON); '' if none."""
    parts = [(_extra(data, "solvers_published"), "published", _published), (_extra(data, "solvers_demo"), "demo", _demo),
             (_extra(data, "solvers_cost"), "cost", _cost)]
    if not any(ex for ex, _, _ in parts):
        return ""
    out = ["## Solvers: defaults, the demo's matrix-free phases, the cost model", ""]
    if stamp:
        out += [stamp, ""]
    out.append("Ratios: median over interleaved rounds of the per-round quotient of wall times (one process, "
               "`benchmarks/harness.py` `Interleaved`), min–max beside it. Source: `benchmarks/test_solvers.py`.")
    out.append("")
    for ex, key, render in parts:
        if ex:
            out += render(ex[key])
    return "\n".join(out)


def main(argv: list[str]) -> None:
    """``python benchmarks/render_solvers.py OUT.md COMMAND JSON...``: the solver sections of one or
    more pytest-benchmark JSONs, headed by the command that produced them, the machine and the date."""
    import json
    import os
    import platform

    out_path, command, *paths = argv
    runs = [json.loads(open(p).read()) for p in paths]
    data = {"benchmarks": [b for r in runs for b in r.get("benchmarks", [])]}
    mi = runs[0].get("machine_info", {})
    hbt = mi.get("hbt", {})
    cpu = mi.get("cpu", {}).get("brand_raw") or platform.processor()
    stamp = "\n".join([
        f"- Command: `{command}`",
        f"- Mode: {hbt.get('mode', '?')}",
        f"- Machine: {hbt.get('cpu_count', os.cpu_count())} cores, {cpu}; torch {hbt.get('torch', '?')}, device "
        f"{hbt.get('device', 'cpu')}, OMP_NUM_THREADS={hbt.get('OMP_NUM_THREADS')}; Python {mi.get('python_version')}",
        "- Date: " + ", ".join(sorted({r.get("datetime", "?")[:16].replace("T", " ") + " UTC" for r in runs}))])
    with open(out_path, "w", encoding="utf-8") as fh:
        fh.write("# Solver benchmarks\n\n" + solvers_markdown(data, stamp) + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
