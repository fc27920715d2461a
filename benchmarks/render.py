"""Turn the pytest-benchmark JSON into ``RESULTS.md`` (markdown tables, no measurements).

Every benchmark hands its numbers to this module through ``benchmark.extra_info``:

* ``kind="accuracy"`` (``test_accuracy.py``): rows per (model, method, backend) and the
  bound checks;
* ``kind="peers"`` (``test_peers.py``): ours / peer ratios of time and error;
* ``kind="scaling"`` (``test_scaling.py``): points, log-log slopes, the dense wall;
* ``kind`` in hvp / batched / dense / floor / influence (``test_hvp.py``): engine ratios
  (``rows``) and asserted HVP agreement (``checks``).

Every section header repeats the command, the machine and the date: a table copied out
of the file keeps its provenance.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from render_solvers import solvers_markdown
from tables import _table, fmt

from scalable_hbt.memory import format_bytes

PEER_DISTS = (("pyhessian", "pyhessian"), ("curvlinops", "curvlinops-for-pytorch"), ("kronfluence", "kronfluence"))
ENGINE_KINDS = ("hvp", "batched", "dense", "floor", "influence")
METHODS = ("influence", "relatif", "rue", "lees")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


class Context:
    """Command, machine and date of one run, repeated under every section header."""

    def __init__(self, data: dict, command: str, outcome: str, wall: float | None) -> None:
        mi = data.get("machine_info", {})
        self.hbt = mi.get("hbt", {})
        cpu = mi.get("cpu", {}).get("brand_raw") or platform.processor() or platform.machine()
        device = self.hbt.get("device", "cpu") + (f" ({self.hbt['gpu']})" if self.hbt.get("gpu") else "")
        self.date = (data.get("datetime") or datetime.now(timezone.utc).isoformat())[:16].replace("T", " ") + " UTC"
        self.command = command
        self.outcome = outcome
        self.wall = wall
        self.mode = self.hbt.get("mode") or ("quick" if self.hbt.get("quick") else "full")
        self.machine = (f"{self.hbt.get('cpu_count', os.cpu_count())} cores, {cpu}; torch {self.hbt.get('torch', '?')}, "
                        f"device {device}, OMP_NUM_THREADS={self.hbt.get('OMP_NUM_THREADS')}; "
                        f"Python {mi.get('python_version', platform.python_version())}")

    def stamp(self) -> str:
        return f"*`{self.command}` · {self.mode} mode · {self.machine} · {self.date}*"


def _extras(data: dict, kind: str | tuple[str, ...]) -> list[dict]:
    kinds = (kind,) if isinstance(kind, str) else kind
    return [b.get("extra_info", {}) for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("kind") in kinds]


# ---------------------------------------------------------------------------- accuracy
def _by(rows: list[dict], model: str, backend: str, method: str) -> dict:
    return next((r for r in rows if r["model"] == model and r["backend"] == backend and r["method"] == method), {})


def headline(rows: list[dict], bounds: list[dict]) -> list[str]:
    """One line per (model, backend): the measures a user cares about, time and HVPs, bounds."""
    head = ["model", "backend", "influence rel. err", "influence Spearman*", "top-5 helpful / harmful",
            "RelatIF Spearman*", "RUE rel. err", "LEES rel. err", "LEES AUROC (exact)", "seconds (fit + 4 methods)",
            "HVPs", "bounds"]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        exact_auroc = _by(rows, model, "dense", "lees").get("auroc")
        for backend in dict.fromkeys(r["backend"] for r in rows if r["model"] == model):
            mine = [r for r in rows if r["model"] == model and r["backend"] == backend
                    and r["method"] in ("fit",) + METHODS]
            infl, rel = _by(rows, model, backend, "influence"), _by(rows, model, backend, "relatif")
            rue, lees = _by(rows, model, backend, "rue"), _by(rows, model, backend, "lees")
            bs = [b for b in bounds if b["model"] == model and b["backend"] == backend]
            verdict = ("—" if not bs else "met" if all(b["ok"] for b in bs) else
                       "**FAILED**: " + ", ".join(b["quantity"] for b in bs if not b["ok"]))
            top = (f"{fmt(infl['top5_helpful'])} / {fmt(infl['top5_harmful'])}" if "top5_helpful" in infl else "—")
            auroc = f"{fmt(lees.get('auroc'))} ({fmt(exact_auroc)})" if lees else "n/a"
            measures: list[Any] = [infl.get("max_rel_error"), infl.get("spearman_resolved"), top,
                                   rel.get("spearman_resolved"), rue.get("max_rel_error"),
                                   lees.get("max_rel_error") if lees else "n/a"]
            if backend == "dense":
                measures = ["oracle"] + ["—"] * 5
                auroc = fmt(exact_auroc)
            out.append([model, backend, *measures, auroc, sum(r["seconds"] for r in mine if r["seconds"] == r["seconds"]),
                        sum(r["hvps"] for r in mine), verdict])
    return _table(head, out)


def accuracy_section(ctx: Context, data: dict) -> list[str]:
    ex = _extras(data, "accuracy")
    if not ex:
        return []
    rows = [r for e in ex for r in e["accuracy"]]
    bounds = [b for e in ex for b in e["bounds"]]
    out = ["## 1. Exact vs approximate", "", ctx.stamp(), ""]
    out.append("Every backend against the dense oracle, same model, same data, same damping δ (the oracle's "
               "δ = max(−λ_min, 0) + 0.01). Relative error = max over test points of ‖x − x_exact‖ / ‖x_exact‖. "
               "\\* Spearman over the *resolved* training points only (exact value off the float64 tie floor, "
               "`scalable_hbt.metrics.resolved_mask`), worst test point. Top-5: overlap of the 5 most helpful / "
               "harmful resolved training points with the exact ones, mean over the 5 test points. LEES AUROC: the score "
               "as a detector of the 5 permuted (OOD) test points. HVPs: full-data Hessian-vector products "
               "counted by the operator (a mini-batch product of b points counts b/n). LEES needs eigenpairs: "
               "dense and lanczos (whose Lanczos run is also lowrank's fit, so lowrank's LEES is the lanczos row); "
               "cg, lissa, kfac and ekfac give none. n/a: not run in this mode (see the module docstring).")
    out.append("")
    out += headline(rows, bounds)
    out.append("Problems:")
    out.append("")
    probs = {e["physics_problem"]["model"]: e["physics_problem"] for e in ex}
    out += _table(["model", "description", "M", "n", "wd", "δ", "dense fit (s)", "dense HVPs"],
                  [[k, p["description"], p["M"], p["n"], p["weight_decay"], p["damping"], p["dense_fit_seconds"],
                    p["dense_fit_hvps"]] for k, p in probs.items()])
    out.append("### Stated accuracy bounds (asserted: the suite fails when one is not met)")
    out.append("")
    out += _table(["model", "backend", "quantity", "measured", "bound", "result"],
                  [[b["model"], b["backend"], b["quantity"], b["value"], f"{b['op']} {b['bound']:g}",
                    "met" if b["ok"] else "**FAILED**"] for b in bounds])
    out.append("K-FAC / EK-FAC carry no accuracy bound (only finite values of the right shapes, asserted); "
               "how the EK-FAC and K-FAC RelatIF normalizers rank the training points depends on the trained model (benchmarks/BACKENDS.md, findings 4 and 6).")
    out.append("")
    out.append("### All rows")
    out.append("")
    out += _table(["model", "method", "backend", "rel. err", "Pearson", "Spearman*", "top-5 helpful", "top-5 harmful",
                   "AUROC", "seconds", "HVPs"],
                  [[r["model"], r["method"], r["backend"], r.get("max_rel_error"), r.get("pearson"),
                    r.get("spearman_resolved"), r.get("top5_helpful"), r.get("top5_harmful"), r.get("auroc"),
                    r["seconds"], r["hvps"]] for r in rows])
    return out


# ---------------------------------------------------------------------------- peers
def peers_section(ctx: Context, data: dict) -> list[str]:
    rows = [r for e in _extras(data, "peers") for r in e["peers_rows"]]
    versions = "; ".join(f"{dist} {_version(dist)}" for _, dist in PEER_DISTS)
    out = ["## 2. Peers side by side", "", ctx.stamp(), "", f"Peer versions: {versions}.", ""]
    if not rows:
        return out + ["No peer benchmark ran (peers not installed?).", ""]
    out.append("Same model, same data, same process; timings interleaved (ratio = median over rounds of the "
               "per-round quotient, min–max beside it). Errors are against the dense oracle; ratio < 1 means "
               "ours is faster / more accurate. Skipped combinations (a peer that does not support Conv1d) are "
               "listed by pytest as skips.")
    out.append("")
    out += _table(["model", "peer", "quantity", "time ours / peer", "min–max", "rounds", "error ours", "error peer",
                   "error ours / peer", "note"],
                  [[r["model"], r["peer"], r["quantity"], r["time_ratio"],
                    f"{fmt(r['time_ratio_lo'])}–{fmt(r['time_ratio_hi'])}", r["rounds"], r["ours_error"], r["peer_error"],
                    r["error_ratio"], r["note"]] for r in rows])
    return out


# ---------------------------------------------------------------------------- scaling + physical limit
def scaling_section(ctx: Context, data: dict) -> list[str]:
    ex = _extras(data, "scaling")
    if not ex:
        return []
    s = ex[0]
    wall = s["dense_wall"]
    out = ["## 3. Scaling in M and n", "", ctx.stamp(), ""]
    out.append(f"MLP family (input 64, two hidden layers of width w, 10 classes), random data, float32, one fresh "
               f"process per point; peak memory = growth of the process's RSS high-water mark during the operation (CPU) or "
               f"CUDA's allocator peak. Slopes: least-squares fit of log(seconds) and log(bytes) against log(M) or "
               f"log(n) over the points ≥ 10 ms. Plots: `plots/scaling_M.png`, `plots/scaling_n.png`.")
    out.append("")
    out.append(f"**Dense wall:** the dense path needs ≈ {wall['bytes_per_M2']} · M² bytes; with "
               f"{format_bytes(wall['budget_bytes'])} available it stops at **M ≈ {wall['M']:,}** parameters "
               "(DenseCurvature refuses beyond that with a clear message). Its time grows like M HVPs plus an M³ "
               "eigendecomposition (slope of the measured dense points below).")
    out.append("")
    out += _table(["operation", "family", "points", "time slope", "memory slope"],
                  [[r["op"], r["family"], r["points"], r["time_slope"], r["memory_slope"]] for r in s["slopes"]])
    out += _table(["operation", "family", "M", "n", "seconds", "HVPs", "peak memory", "gradient seconds"],
                  [[p["op"], p["family"], p["M"], p["n"], p["seconds"], p["hvps"], format_bytes(p["peak_bytes"]),
                    p["gradient_seconds"]] for p in s["points"]])
    return out


def limit_section(ctx: Context, data: dict) -> list[str]:
    """Item 4: how far a full-data HVP sits above one gradient, and the influence query in per-sample passes."""
    rows = [r for e in _extras(data, ENGINE_KINDS) for r in e.get("rows", [])]
    out = ["## 4. The physical limit", "", ctx.stamp(), ""]
    out.append("An HVP needs at least one forward + backward pass (a gradient). Fraction of the HVP's time spent "
               "above that floor = 1 − t_gradient / t_HVP (0 would be a free HVP on top of the gradient; "
               "reverse-over-reverse needs a second backward, so ≈ 0.5–0.6 is the natural value).")
    out.append("")
    table = []
    for r in rows:
        if r["quantity"].startswith("HVP / gradient — ") and r["value"]:
            table.append([r["model"], r["quantity"].split("— ")[1], r["value"], _spread(r), r.get("rounds", ""),
                          1 - 1 / r["value"]])
    out += _table(["model", "implementation", "HVP / gradient", "min–max", "rounds", "fraction above the gradient"],
                  table)
    q = [r for r in rows if r["quantity"].startswith("influence query")]
    if q:
        out += _table(["model", "query", "× one per-sample-gradient pass", "min–max"],
                      [[r["model"], r["quantity"].split(" /")[0], r["value"], f"{fmt(r['lo'])}–{fmt(r['hi'])}"]
                       for r in q])
    return out


def engine_section(ctx: Context, data: dict) -> list[str]:
    """The core-engine ratios of ``test_hvp.py`` (targets reported, HVP agreement asserted)."""
    ex = _extras(data, ENGINE_KINDS)
    rows = [r for e in ex for r in e.get("rows", [])]
    checks = [c for e in ex for c in e.get("checks", [])]
    if not rows:
        return []
    out = ["## 5. Core engine: HVP, batched products, dense assembly", "", ctx.stamp(), ""]
    out.append("Ratios of times measured interleaved in one process (median over rounds, min–max); targets "
               "reported, not asserted. Random data, models at their seeded initialisation, float32.")
    out.append("")

    def result(r: dict) -> str:
        if r.get("pass") is None:
            return ""
        b, lo, hi = r.get("target_value"), r.get("lo"), r.get("hi")
        within = b is not None and lo is not None and hi is not None and lo <= b < hi
        return ("pass" if r["pass"] else "**miss**") + (" (within spread)" if within else "")

    out += _table(["model", "quantity", "median", "min–max", "rounds", "target", "result", "note"],
                  [[r["model"], r["quantity"], r["value"], f"{fmt(r['lo'])}–{fmt(r['hi'])}", r.get("rounds", ""),
                    r.get("target") or "", result(r), r.get("note", "")] for r in rows])
    problems = {e["problem"]["model"]: e["problem"] for e in ex if "problem" in e}
    out += _table(["model", "M", "n", "chunk", "dtype, device"],
                  [[k, p["M"], p["n"], p["batch_size"], f"{p['dtype']}, {p['device']}"] for k, p in problems.items()])
    out.append("HVP agreement between implementations (asserted, relative difference < tolerance):")
    out.append("")
    out += _table(["model", "comparison", "‖a − b‖ / ‖b‖", "tolerance", "ok"],
                  [[c["model"], c["what"], c["rel_diff"], c["tol"], "yes" if c["ok"] else "**NO**"] for c in checks])
    return out


def _spread(r: dict) -> str:
    return f"{fmt(r.get('lo'))}–{fmt(r.get('hi'))}"


def _goal(r: dict | None) -> str:
    """met / not met, "(within spread)" when the bound lies inside the rounds' min–max."""
    if r is None or r.get("pass") is None:
        return "—"
    b, lo, hi = r.get("target_value"), r.get("lo"), r.get("hi")
    within = b is not None and lo is not None and hi is not None and lo <= b < hi
    return ("met" if r["pass"] else "**not met**") + (" (within spread)" if within else "")


def workloads_section(ctx: Context, data: dict) -> list[str]:
    """HVP against the peers on the 2D CNN with pooling and the GPT-2 block (``test_hvp_workloads.py``)."""
    ex = _extras(data, "workload")
    if not ex:
        return []
    out = ["## 5b. HVP on more workloads, peers side by side", "", ctx.stamp(), ""]
    out.append("Full-data HVP in units of one full-data gradient (median over interleaved rounds; min–max of the "
               "ratio to the fastest peer beside it), float32, one thread. Ours = HessianOperator's default mode; "
               "fwd-over-rev shown for information. Goal: ours ≤ the fastest peer. k = 32: time of one H V product "
               "with 32 columns per vector, in gradients; goal ours ≤ curvlinops. Peer error: ‖H v − H_ours v‖ / "
               "‖H_ours v‖ against the workload's reference (the torch.func brute force on the raw module where "
               "listed, else ours).")
    out.append("")
    hvp, k32 = {}, {}
    for e in ex:
        name = e["workload"]["model"]
        for r in e.get("rows", []):
            if r.get("table") in ("hvp", "hvp_goal"):
                hvp.setdefault(name, {"info": e["workload"], "peers": e.get("peers", {}),
                                      "errors": e.get("peer_errors", {}), "reference": e.get("reference")})
                hvp[name][r["table"] if r["table"] == "hvp_goal" else r["implementation"]] = r
            elif r.get("table") in ("k32", "k32_goal"):
                k32.setdefault(name, {"n": e["workload"]["n"]})[r["table"] if r["table"] == "k32_goal" else r["implementation"]] = r

    def val(d: dict, key: str) -> Any:
        if key in d:
            return d[key]["value"]
        status = d.get("peers", {}).get(key.split()[0], "")
        return "n/a" if status.startswith("not applicable") else "—"

    rows = []
    for name, d in hvp.items():
        goal = d.get("hvp_goal")
        rows.append([name, d["info"]["M"], d["info"]["n"], val(d, "ours"), val(d, "ours fwd-over-rev"),
                     val(d, "curvlinops"), val(d, "pyhessian"), val(d, "torch.func reference"),
                     goal["value"] if goal else "—", _spread(goal) if goal else "—",
                     goal["rounds"] if goal else "—", _goal(goal)])
    out += _table(["workload", "M", "n", "ours", "ours fwd-over-rev", "curvlinops", "PyHessian", "torch.func reference",
                   "ours / fastest peer", "min–max", "rounds", "goal ours ≤ fastest peer"], rows)
    rows = []
    for name, d in k32.items():
        goal = d.get("k32_goal")
        rows.append([name, d["n"], d["ours"]["value"] if "ours" in d else "—",
                     d["curvlinops"]["value"] if "curvlinops" in d else "—", goal["value"] if goal else "—",
                     _spread(goal) if goal else "—", goal["rounds"] if goal else "—", _goal(goal),
                     goal.get("rel_error") if goal else None])
    out += _table(["workload", "n", "k=32 ours per vector (gradients)", "k=32 curvlinops per vector", "time ours / curvlinops",
                   "min–max", "rounds", "goal ours ≤ curvlinops", "curvlinops error vs ours"], rows)
    notes = []
    for name, d in hvp.items():
        for peer, why in d["peers"].items():
            if why != "ok":
                notes.append(f"- {name}: {peer} {why}.")
        for peer, err in d["errors"].items():
            notes.append(f"- {name}: {peer}'s H·v against {d['reference']}: relative error {fmt(err)}.")
    checks = [c for e in ex for c in e.get("checks", [])]
    out += notes + [""] if notes else []
    out += _table(["workload", "comparison (asserted)", "‖a − b‖ / ‖b‖", "tolerance", "ok"],
                  [[c["model"], c["what"], c["rel_diff"], c["tol"], "yes" if c["ok"] else "**NO**"] for c in checks])
    return out


def _hvps(r: dict) -> str:
    lo, hi = r.get("hvps_range") or (r["hvps"], r["hvps"])
    return fmt(r["hvps"]) + ("" if lo == hi else f" ({fmt(lo)}–{fmt(hi)})")


def eigen_section(ctx: Context, data: dict) -> list[str]:
    """Top eigenpairs (ours vs ARPACK vs LOBPCG) and block CG (``test_eigen.py``)."""
    ex = _extras(data, "eigen")
    rows = [r for e in ex for r in e.get("rows", [])]
    if not rows:
        return []
    out = ["## 5c. Eigenpairs and many right-hand sides on the same operator", "", ctx.stamp(), ""]
    probs = {e["problem"]["model"]: e["problem"] for e in ex}
    out.append("Paper CNN (random init), float64, " + "; ".join(f"{k}: M = {p['M']:,}, n = {p['n']}, wd = {p['weight_decay']:g}"
                                                             for k, p in probs.items())
               + ". Each solver on a fresh HessianOperator (reverse-over-reverse, graphs not kept), which counts the "
               "HVPs (a k-column product counts k). Residual: max_i ‖H y_i − θ_i y_i‖ / |θ_1| from one exact product "
               "after the run; equal accuracy means ≤ 1e-8 for every solver.")
    out.append("")
    eig = [r for r in rows if r.get("table") == "eigen"]
    out += _table(["problem", "solver", "HVPs", "HVPs / ARPACK", "wall / ARPACK", "min–max", "rounds",
                   "max rel. residual", "goal", "result"],
                  [[r["model"], r["solver"], _hvps(r), r["hvps_vs_arpack"], r["value"], _spread(r), r["rounds"],
                    r["residual"], r.get("target") or "", _goal(r)] for r in eig])
    cg = [r for r in rows if r.get("table") == "cg"]
    out += _table(["problem", "quantity", "wall per RHS / single", "min–max", "rounds", "HVPs block (32 RHS)",
                   "HVPs single", "HVP-equivalents per RHS / single", "iterations block / single", "goal", "result"],
                  [[r["model"], r["quantity"], r["value"], _spread(r), r["rounds"], r["hvps_block"], r["hvps_single"],
                    r["hvps_per_rhs_vs_single"], f"{r['iterations_block']} / {r['iterations_single']}",
                    r.get("target") or "", _goal(r)] for r in cg])
    return out


def separate_runs_section() -> list[str]:
    """Pointers to the measurements too long for this suite (each file names its own command,
    machine and date)."""
    return ["## 6. Measured separately", "",
            "- The ≥ 10 M-parameter network (time and per-phase peak memory against (m + 4)·M·4 B + "
            "activations) and the strong scaling of a full-data HVP over 1 vs 2 gloo processes: "
            "`benchmarks/SCALING.md` (`examples/large_network.py`, `benchmarks/distributed_scaling.py`).",
            "- Every backend against the dense oracle on the paper's CNN at n = 200 with the slow test's "
            "settings: `benchmarks/BACKENDS.md` (`tests/test_paper_cnn.py`).", ""]


def render(data: dict, *, command: str, outcome: str, wall: float | None, json_name: str,
           plots: list[str]) -> str:
    """The whole RESULTS.md."""
    ctx = Context(data, command, outcome, wall)
    out = ["# Benchmark results", ""]
    out.append(f"- Command: `{command}`")
    out.append(f"- Mode: {ctx.mode}" + (" (reduced sizes, about half an hour on 2 cores, every time ratio the median of "
                                        "5 interleaved rounds)"
                                        if ctx.mode == "quick" else ""))
    out.append(f"- Machine: {ctx.machine}")
    out.append(f"- Date: {ctx.date}")
    out.append(f"- Outcome: {outcome}" + (f"; wall time {wall / 60:.1f} min" if wall else ""))
    out.append(f"- Raw data: `{json_name}` (pytest-benchmark JSON; every number below is in its `extra_info`)")
    if plots:
        out.append("- Plots: " + ", ".join(f"`{p}`" for p in plots))
    out.append("")
    for section in (accuracy_section, peers_section, scaling_section, limit_section, engine_section,
                    workloads_section, eigen_section):
        out += section(ctx, data)
    out.append(solvers_markdown(data, ctx.stamp()))
    out += separate_runs_section()
    return "\n".join(out)
