"""The ``hbt`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(out=Path(args.out), quick=args.quick, device=args.device, seed=args.seed,
                     progress=not args.no_progress, figures=args.figures, size_comparison=args.size_comparison,
                     regime=args.regime)
    report = run_demo(cfg)
    print(format_summary(report))
    print(f"report written to {cfg.out / 'report.json'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .jobs import JobError, load_job, run_job

    try:
        run_job(load_job(args.job), dry_run=args.dry_run)
    except JobError as err:
        print(f"hbt run: {err}", file=sys.stderr)
        return 2
    return 0


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
    demo.add_argument("--regime", choices=("stopped", "tight"), default="stopped",
                      help="training regime: 'stopped' (the paper's: SGD with momentum and a decreasing learning "
                           "rate for a fixed budget, no polish) or 'tight' (Adam + L-BFGS to a tight minimum) "
                           "(default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run a batch job described by a TOML file (resumable)")
    run.add_argument("job", help="the job file, e.g. job.toml (see scalable_hbt.jobs.spec for the format)")
    run.add_argument("--dry-run", action="store_true", help="validate the job and print the plan with memory estimates")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
