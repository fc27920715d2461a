"""Run the benchmark suite and write ``benchmarks/RESULTS.md``.

Usage, from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report.py            # run, then write RESULTS.md
    .venv/bin/python benchmarks/report.py --from-json benchmarks/results.json   # only re-render
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report.py -- -k paper_cnn     # extra pytest args

The suite runs as ``python -m pytest benchmarks/ --benchmark-json=...`` in a subprocess
(OMP_NUM_THREADS defaults to 1 there); the ratios come from each benchmark's
``extra_info`` (see ``benchmarks/harness.py``). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPRODUCE = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report.py"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_suite(json_path: Path, extra: list[str]) -> tuple[int, str, list[str], float]:
    env = os.environ.copy()
    env.setdefault("OMP_NUM_THREADS", "1")
    rel_json = os.path.relpath(json_path, ROOT)
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", f"--benchmark-json={rel_json}", "-q",
           "--benchmark-columns=min,median,max,rounds", *extra]
    shown = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + shlex.join(
        [os.path.relpath(cmd[0], ROOT) if cmd[0].startswith(str(ROOT)) else cmd[0], *cmd[1:]])
    print(f"+ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    rc = proc.wait()
    return rc, shown, lines, time.perf_counter() - t0


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _result(row) -> str:
    """pass/miss of an "≤ bound" target, flagged when the min–max over rounds straddles the bound."""
    if row.get("pass") is None:
        return ""
    bound, lo, hi = row.get("target_value"), row.get("lo"), row.get("hi")
    straddles = bound is not None and lo is not None and hi is not None and lo <= bound < hi
    word = "**pass**" if row["pass"] else "**miss**"
    return word + (" (within spread)" if straddles else "")


def _find(rows, model: str, startswith: str):
    return next((r for r in rows if r["model"] == model and r["quantity"].startswith(startswith)), None)


def observations(rows, problems) -> list[str]:
    """A few numbers derived from the table (no new measurements)."""
    obs = []
    dense = _find(rows, "paper_cnn_740", "dense Hessian assembly")
    mode = (dense or {}).get("mode")
    per_vec = next((r for r in rows if r["model"] == "paper_cnn_740" and r.get("k") == 32 and r.get("mode") == mode
                    and mode is not None), None)
    if dense and per_vec and dense["value"] is not None and "paper_cnn_740" in problems:
        M = problems["paper_cnn_740"]["M"]
        obs.append(f"Dense assembly ({mode}) costs {dense['value']:.0f} HVPs; column by column it should cost "
                   f"M × (k=32 per-vector ratio of that mode) = {M} × {per_vec['value']:.2f} ≈ "
                   f"{M * per_vec['value']:.0f}. Reaching ≤ 60 needs a batched per-vector cost ≤ {60 / M:.3f} "
                   "of an HVP, or far fewer products than M.")
    for model in problems:
        g = [r for r in rows if r["model"] == model and r["quantity"].startswith("HVP / gradient — ")
             and "cached" not in r["quantity"] and r["value"] is not None]
        if g:
            best = min(g, key=lambda r: r["value"])
            obs.append(f"{model}: full-data HVP / gradient ranges {min(r['value'] for r in g):.2f}–"
                       f"{max(r['value'] for r in g):.2f} over all implementations "
                       f"(lowest: {best['quantity'].split('— ')[-1]}).")
    return obs


def render(data: dict, *, command: str, pytest_outcome: str, wall: float | None, json_path: Path) -> str:
    benches = data.get("benchmarks", [])
    mi = data.get("machine_info", {})
    hbt = mi.get("hbt", {})
    rows = [r for b in benches for r in b.get("extra_info", {}).get("rows", [])]
    checks = [c for b in benches for c in b.get("extra_info", {}).get("checks", [])]
    peers = next((b["extra_info"]["peers"] for b in benches if "peers" in b.get("extra_info", {})), {})
    problems = {}
    for b in benches:
        p = b.get("extra_info", {}).get("problem")
        if p:
            problems[p["model"]] = p
    when = data.get("datetime", datetime.now(timezone.utc).isoformat())

    out = []
    out.append("# Benchmark results: the core engine")
    out.append("")
    out.append(f"Reproduce from the repository root: `{REPRODUCE}` "
               "(runs `pytest benchmarks/` with pytest-benchmark and rewrites this file).")
    out.append("")
    out.append(f"- Date: {when[:19].replace('T', ' ')} UTC")
    out.append(f"- Command: `{command}`")
    out.append(f"- Outcome: {pytest_outcome}" + (f" (wall time {wall / 60:.1f} min)" if wall else ""))
    cpu = mi.get("cpu", {}).get("brand_raw") or platform.processor() or platform.machine()
    out.append(f"- Machine: {hbt.get('cpu_count', os.cpu_count())} cores (os.cpu_count), {cpu}; "
               f"torch {hbt.get('torch', '?')}, device {hbt.get('device', 'cpu')}, "
               f"OMP_NUM_THREADS={hbt.get('OMP_NUM_THREADS')}, torch threads {hbt.get('torch_num_threads')}; "
               f"Python {mi.get('python_version', platform.python_version())}"
               + (" — **quick mode (HBT_BENCH_QUICK): smoke run, not a measurement**" if hbt.get("quick") else ""))
    peer_txt = []
    for name, dist in (("pyhessian", "pyhessian"), ("curvlinops", "curvlinops-for-pytorch")):
        peer_txt.append(f"{dist} {_version(dist)} ({peers.get(name, 'not checked')})")
    out.append(f"- Peers: {'; '.join(peer_txt)}")
    out.append(f"- Raw data: `{os.path.relpath(json_path, ROOT)}` (per-round times in each benchmark's `extra_info`)")
    out.append("")
    out.append("Every number is a ratio of two times measured interleaved in one process: the alternatives "
               "run round after round in rotated order, and the ratio is the median over rounds of the "
               "per-round quotient, with its min–max over rounds beside it. Absolute times on a shared "
               "2-core machine mean little; a spread much wider than the gap between two numbers means "
               "the gap is noise. Targets are reported, never asserted; HVP agreement between "
               "implementations is asserted (relative difference < 1e-4, float32).")
    out.append("")

    out.append("## Against the targets")
    out.append("")
    out.append("| model | quantity | measured | min–max | target | result |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        if r.get("target"):
            out.append(f"| {r['model']} | {r['quantity']} | {_fmt(r['value'])} | {_fmt(r['lo'])}–{_fmt(r['hi'])} "
                       f"| {r['target']} | {_result(r)} |")
    out.append("")

    obs = observations(rows, problems)
    if obs:
        out.append("Derived from these numbers:")
        out.append("")
        out.extend(f"- {o}" for o in obs)
        out.append("")

    out.append("## All ratios")
    out.append("")
    out.append("| model | quantity | median | min–max | rounds | target | result | note |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['model']} | {r['quantity']} | {_fmt(r['value'])} | {_fmt(r['lo'])}–{_fmt(r['hi'])} "
                   f"| {r.get('rounds', '')} | {r.get('target') or ''} | {_result(r)} | {r.get('note', '')} |")
    out.append("")

    out.append("## Correctness checks (asserted)")
    out.append("")
    out.append("| model | comparison | ‖a − b‖ / ‖b‖ | tolerance | ok |")
    out.append("|---|---|---|---|---|")
    for c in checks:
        out.append(f"| {c['model']} | {c['what']} | {c['rel_diff']:.2e} | {c['tol']:.0e} | {'yes' if c['ok'] else '**NO**'} |")
    out.append("")

    out.append("## Problems")
    out.append("")
    desc = {
        "paper_cnn_740": "the paper's 1D CNN: Conv1d(1→5,k15,p1)·MaxPool4·ReLU·Conv1d(5→8,k5)·MaxPool4·ReLU·"
                         "Conv1d(8→10,k2,p1)·AvgPool4·ReLU·Flatten(140)·Dropout·Linear(140→2); inputs (1, 924)",
        "cnn2d_994k": "2D CNN: Conv2d(3→64,3,p1)·ReLU·MaxPool2·Conv2d(64→128,3,p1)·ReLU·MaxPool2·Flatten(8192)·"
                      "Linear(8192→112)·ReLU·Linear(112→10); inputs (3, 32, 32)",
    }
    out.append("| model | architecture | M | n | chunk | loss, wd | dtype, device |")
    out.append("|---|---|---|---|---|---|---|")
    for name, p in problems.items():
        out.append(f"| {name} | {desc.get(name, '')} | {p['M']:,} | {p['n']} | {p['batch_size']} "
                   f"| cross-entropy, {p['weight_decay']:g} | {p['dtype']}, {p['device']} |")
    out.append("")
    out.append("Data are random (inputs N(0,1), random labels), models at their seeded initialisation "
               "in eval mode: timing does not depend on training. Gradient = `Objective.gradient()`; "
               "HVP = `HessianOperator(obj, mode).matvec(v)`; batched = `matmat(V)`, V of shape (M, k); "
               "peers get the same data chunks and add no weight decay (wd·v is added before comparing).")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=HERE / "results.json", help="where pytest-benchmark writes its JSON")
    ap.add_argument("--from-json", type=Path, default=None, help="only render RESULTS.md from an existing JSON")
    ap.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = ap.parse_args(argv)

    if args.from_json is not None:
        json_path = args.from_json.resolve()
        rc, outcome, wall = 0, "rendered from an existing JSON", None
        command = f"python benchmarks/report.py --from-json {os.path.relpath(json_path, ROOT)}"
    else:
        json_path = args.json.resolve()
        rc, command, lines, wall = run_suite(json_path, args.pytest_args)
        summary = [ln for ln in lines if re.search(r"\b(passed|failed|error|skipped)\b", ln) and " in " in ln]
        outcome = summary[-1].strip("= ").strip() if summary else f"pytest exit status {rc}"
        if rc != 0:
            outcome += f" — **pytest exit status {rc}**"
    if not json_path.exists():
        print(f"no benchmark JSON at {json_path}; nothing to report", file=sys.stderr)
        return rc or 1
    data = json.loads(json_path.read_text())
    text = render(data, command=command, pytest_outcome=outcome, wall=wall, json_path=json_path)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {os.path.relpath(args.output.resolve(), ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
