"""The ``hbt`` command line."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import Field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from .demo import DemoConfig


def _demo(args: argparse.Namespace) -> int:
    """``hbt demo``: progress bars and stage timings (the ``scalable_hbt`` logger at INFO) unless
    ``--no-progress``; warnings always."""
    import logging

    from ..log import logger
    from .demo import format_summary, run_demo
    from .demo.report import REPORT_FILE

    cfg = _demo_config(args)
    logging.basicConfig(level=logging.WARNING, format="[hbt demo] %(message)s")
    logger.setLevel(logging.INFO if cfg.progress else logging.WARNING)
    report = run_demo(cfg)
    print(format_summary(report))
    print(f"report written to {cfg.out / REPORT_FILE}")
    return 0


def _demo_fields() -> Iterator[tuple[Field, dict[str, Any]]]:
    """The ``DemoConfig`` fields on the command line, with their command-line metadata."""
    from .demo import DemoConfig

    for item in fields(DemoConfig):
        if "cli" in item.metadata:
            yield item, item.metadata["cli"]


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes the usage error's message."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``DemoConfig`` field with command-line metadata: the default and the help
    text come from ``DemoConfig``. A field that is False by default is a ``--name`` switch, one
    that is True by default a ``--no-name`` switch."""
    for item, cli in _demo_fields():
        name = item.name.replace("_", "-")
        settings = dict(cli["settings"], dest=cli["dest"] or item.name, help=cli["help"])
        if isinstance(item.default, bool):
            flag = cli["flag"] or (f"--no-{name}" if item.default else f"--{name}")
            settings["action"] = "store_false" if item.default else "store_true"
        else:
            flag = cli["flag"] or f"--{name}"
            settings["default"] = item.default
            if cli["parse"] is not None:
                settings["type"] = _argparse_type(cli["parse"])
            if item.default is not None:
                settings["help"] += " (default: %(default)s)"
        parser.add_argument(flag, **settings)


def _demo_config(args: argparse.Namespace) -> DemoConfig:
    """The ``DemoConfig`` of parsed ``hbt demo`` arguments."""
    from .demo import DemoConfig

    return DemoConfig(**{item.name: getattr(args, cli["dest"] or item.name) for item, cli in _demo_fields()})


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
GROUND_TRUTH_MODULE = "benchmarks.ground_truth.run"
"""The ground-truth benchmark (``benchmarks/ground_truth/run.py``), run with ``python -m`` from the checkout."""


def _bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/report.py`` (pytest on benchmarks/, then RESULTS.md and plots) in a subprocess;
    with ``--ground-truth``, ``benchmarks/ground_truth/run.py`` (GROUND_TRUTH.md and its plots) instead."""
    if args.ground_truth and args.device != "cpu":
        print(f"hbt bench: --ground-truth runs on the CPU only (its retrains and peers are CPU-sized); "
              f"drop --device {args.device}.", file=sys.stderr)
        return 2
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
    root = BENCH_REPORT.parent.parent
    if args.ground_truth:
        shown = f"hbt bench --ground-truth {mode}" + (f" --out {args.out}" if args.out else "")
        cmd = [sys.executable, "-m", GROUND_TRUTH_MODULE, mode, "--command", shown]
    else:
        shown = f"hbt bench {mode} --device {args.device}" + (f" --out {args.out}" if args.out else "")
        cmd = [sys.executable, str(BENCH_REPORT), mode, "--device", args.device, "--command", shown]
    if args.out:
        cmd += ["--out", str(Path(args.out).resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root, env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hbt", description="Hessian-based toolbox: influence, RelatIF, RUE, LEES.")
    parser.add_argument("--version", action="version", version=f"scalable_hbt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the toolbox on the built-in Fermi-Hubbard example")
    _add_demo_arguments(demo)
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
                                       "Quick mode: about half an hour on a 2-core CPU.")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sizes, about half an hour on 2 CPU cores (default)")
    size.add_argument("--full", action="store_true", help="more rounds, the paper's data size, M up to 1e7")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="folder for RESULTS.md, results.json and plots/ (default: benchmarks/)")
    bench.add_argument("--ground-truth", action="store_true",
                       help="instead of the suite: score every backend and peer against retraining (LDS, RUE vs "
                            "bootstrap ensembles, LEES vs ensemble disagreement and OOD) and write "
                            "benchmarks/GROUND_TRUTH.md; --quick ≤ 30 min on a 2-core CPU, retrains cached and resumable")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
