"""The ``hbt`` command line."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

from .. import __version__


def _at_least_two(text: str) -> int:
    """An integer ≥ 2 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 2, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(out=Path(args.out), quick=args.quick, device=args.device, seed=args.seed,
                     progress=not args.no_progress, figures=args.figures, size_comparison=args.size_comparison,
                     size_points_per_phase=args.size_points, regime=args.regime)
    report = run_demo(cfg)
    print(format_summary(report))
    print(f"report written to {cfg.out / 'report.json'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """``hbt run``: any error is one line ``hbt run: <message>`` on stderr and exit status 2
    (the traceback too with ``--debug``)."""
    import logging

    from ..distributed import process_group_from_environment
    from .jobs import load_job, run_job

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="hbt run: %(message)s")
    echo = (lambda *_: None) if args.quiet else print
    try:
        spec = load_job(args.job)
        with process_group_from_environment(spec.objective.device):
            run_job(spec, dry_run=args.dry_run, overwrite=args.overwrite, wait=args.wait,
                    progress=not (args.no_progress or args.quiet), echo=echo)
    except KeyboardInterrupt:
        print("hbt run: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is reported, none as a bare traceback unless asked
        if args.debug:
            traceback.print_exc()
        message = str(err).strip() or type(err).__name__
        print(f"hbt run: {message}", file=sys.stderr)
        return 2
    return 0


BENCH_REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"
"""The suite's runner and report generator (present in a source checkout, not in a wheel)."""


def _bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/report.py`` (pytest on benchmarks/, then RESULTS.md and plots) in a subprocess."""
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"hbt bench: --device {args.device} was requested but CUDA is not available "
                  f"(torch {torch.__version__}, {'built without CUDA' if torch.version.cuda is None else 'no GPU found'}); "
                  "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu.",
                  file=sys.stderr)
            return 2
    if not BENCH_REPORT.exists():
        print(f"hbt bench: the benchmark suite is not installed with the package ({BENCH_REPORT} is missing); "
              "run it from a source checkout: pip install -e '.[bench]' && hbt bench", file=sys.stderr)
        return 2
    mode = "--full" if args.full else "--quick"
    shown = f"hbt bench {mode} --device {args.device}" + (f" --out {args.out}" if args.out else "")
    cmd = [sys.executable, str(BENCH_REPORT), mode, "--device", args.device, "--command", shown]
    if args.out:
        cmd += ["--out", str(Path(args.out).resolve())]
    root = BENCH_REPORT.parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root, env=env)


def _figures(text: str) -> tuple[str, ...]:
    """argparse type for ``--figures``."""
    from .demo import parse_figures

    try:
        return parse_figures(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hbt", description="Hessian-based toolbox: influence, RelatIF, RUE, LEES.")
    parser.add_argument("--version", action="version", version=f"scalable_hbt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the toolbox on the built-in Fermi-Hubbard example")
    demo.add_argument("--quick", action="store_true", help="smaller training grid (100 points per phase)")
    demo.add_argument("--out", default="hbt_demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed for training and the RUE bootstrap")
    demo.add_argument("--figures", type=_figures, default=None, metavar="LIST",
                      help="figures to draw: comma-separated fig3,fig4,fig5,fig6, or 'all' or 'none' "
                           "(default: all; --quick: fig3,fig5,fig6)")
    demo.add_argument("--size-comparison", action="store_true",
                      help="Fig. 6: also train the size-invariant CNN on 12 and 14 sites (4-10 extra minutes)")
    demo.add_argument("--size-points", type=_at_least_two, default=None, metavar="N",
                      help="training points per phase of the size comparison (default 100; the paper's 500 "
                           "take about 40 minutes on 2 cores)")
    demo.add_argument("--regime", choices=("stopped", "tight"), default="stopped",
                      help="training regime: 'stopped' (the paper's: SGD with momentum and a decreasing learning "
                           "rate for a fixed budget, no polish) or 'tight' (Adam + L-BFGS to a tight minimum) "
                           "(default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run a batch job described by a TOML file (resumable; "
                                     "under torchrun the training data is sharded across the processes)")
    run.add_argument("job", help="the job file, e.g. job.toml (see scalable_hbt.apps.jobs.spec for the format)")
    run.add_argument("--dry-run", action="store_true",
                     help="load and check the model, data and every setting, and print the plan with memory "
                          "estimates; computes nothing")
    run.add_argument("--overwrite", action="store_true",
                     help="discard the results in the output folder and start over (the curvature cache is kept: "
                          "its entries are keyed by their inputs)")
    run.add_argument("--wait", action="store_true",
                     help="if another hbt run is using the output folder, wait for it instead of refusing")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars (TQDM_DISABLE=1 does too)")
    run.add_argument("--quiet", action="store_true", help="print only errors and warnings")
    run.add_argument("--debug", action="store_true", help="print the traceback of an error")
    run.set_defaults(func=_run)
    bench = sub.add_parser("bench", help="run the benchmark suite and write benchmarks/RESULTS.md and plots",
                           description="Exact vs approximate backends, peers side by side, scaling in M and n. "
                                       "Quick mode: ≤ 15 minutes on a 2-core CPU.")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the ≤ 15-minute run (default)")
    size.add_argument("--full", action="store_true", help="more rounds, the paper's data size, M up to 1e7")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="folder for RESULTS.md, results.json and plots/ (default: benchmarks/)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
