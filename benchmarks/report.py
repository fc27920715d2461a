"""Run the benchmark suite and write ``RESULTS.md``, ``results.json`` and ``plots/*.png``.

Usage, from the repository root (``hbt bench`` calls this)::

    OMP_NUM_THREADS=1 python benchmarks/report.py --quick               # about half an hour on a 2-core CPU
    python benchmarks/report.py --full --device cuda                    # longer, larger sizes
    python benchmarks/report.py --from-json benchmarks/results.json     # only re-render
    python benchmarks/report.py --quick -- -k accuracy                  # extra pytest arguments

The suite runs as ``python -m pytest benchmarks/ --benchmark-json=OUT/results.json`` in a
subprocess with ``HBT_BENCH_MODE`` and ``HBT_BENCH_DEVICE`` set (``OMP_NUM_THREADS``
defaults to 1); every number comes from each benchmark's ``extra_info`` and is rendered by
``render.py`` and ``plots.py``. The report is written even when a benchmark fails (a
backend beyond its bound fails the run, loudly, and the table shows which). Exit status:
pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]   # the suite's modules, then the checkout's package

from plots import write_plots  # noqa: E402
from render import render  # noqa: E402


def run_suite(json_path: Path, mode: str, device: str, extra: list[str]) -> tuple[int, str, float]:
    """Run pytest on benchmarks/ (output streamed); returns (exit status, summary line, seconds)."""
    env = os.environ.copy()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HBT_BENCH_MODE=mode, HBT_BENCH_DEVICE=device,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.pop("HBT_BENCH_QUICK", None)
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", f"--benchmark-json={json_path}", "-q",
           "--benchmark-columns=min,median,max,rounds", *extra]
    print("+ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = f"pytest exit status {{rc}}"
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if re.search(r"\b(passed|failed|error)\b", line) and " in " in line:
            summary = line.strip().strip("= ").strip()
    rc = proc.wait()
    summary = summary.format(rc=rc) + (f" — **pytest exit status {rc}**" if rc else "")
    return rc, summary, time.perf_counter() - t0


def write_report(json_path: Path, out_dir: Path, command: str, outcome: str, wall: float | None) -> Path:
    """Render RESULTS.md and the plots from the pytest-benchmark JSON."""
    data = json.loads(json_path.read_text())
    plots = [os.path.relpath(p, out_dir) for p in write_plots(data, out_dir / "plots")]
    text = render(data, command=command, outcome=outcome, wall=wall, json_name=os.path.relpath(json_path, out_dir),
                  plots=plots)
    target = out_dir / "RESULTS.md"
    target.write_text(text + "\n", encoding="utf-8")
    return target


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="reduced sizes, about half an hour on 2 CPU cores (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="more rounds, larger sizes")
    ap.set_defaults(mode="quick")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md, results.json, plots/")
    ap.add_argument("--from-json", type=Path, default=None, help="only render from an existing JSON")
    ap.add_argument("--command", default=None, help="the command to name in RESULTS.md (default: this one)")
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = args.command or ("OMP_NUM_THREADS=1 python benchmarks/report.py "
                               + shlex.join(sys.argv[1:] if argv is None else argv))
    if args.from_json is not None:
        json_path, rc, outcome, wall = args.from_json.resolve(), 0, "rendered from an existing JSON", None
    else:
        json_path = out_dir / "results.json"
        rc, outcome, wall = run_suite(json_path, args.mode, args.device, args.pytest_args)
    if not json_path.exists():
        print(f"no benchmark JSON at {json_path}; nothing to report", file=sys.stderr)
        return rc or 1
    target = write_report(json_path, out_dir, command, outcome, wall)
    print(f"wrote {target}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
