"""``hbt bench --ground-truth``: every backend and peer scored against retraining, per workload.

Usage, from the repository root::

    OMP_NUM_THREADS=1 python -m benchmarks.ground_truth.run --quick        # ≤ 30 min on a 2-core CPU
    python -m benchmarks.ground_truth.run --full --workloads digits_cnn
    python -m benchmarks.ground_truth.run --from-json benchmarks/ground_truth.json   # only re-render

Per workload: train the model (seeded, cached), choose δ (``ours.choose_damping``), time one
full-data gradient, compute the influence matrix of every backend of ours and of every peer
(``peers.py``, when importable), the RUE and LEES values of ours, then the ground truths
(``truths.py``; retrains cached under ``--cache``, so a killed run resumes) and the scores
(``scores.py``). Writes ``GROUND_TRUTH.md``, ``ground_truth.json`` and
``plots/ground_truth_*.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ours, scores, truths
from .measure import gradient_seconds
from .report import write_report
from .retrain_cache import RetrainCache
from .workload import Attribution, Workload
from .workloads import optional_module, registry

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent


@dataclass(frozen=True)
class Plan:
    """Ground-truth sizes: K LDS subsets, B bootstrap members (each warm and from scratch),
    m leave-one-out retrains."""

    K: int
    B: int
    loo: int


PLANS = {"tiny": Plan(K=6, B=3, loo=2), "quick": Plan(K=20, B=10, loo=4), "full": Plan(K=100, B=30, loo=30)}
RUE_ROWS = ("dense (Hessian)", "cg (Hessian)", "cg (GGN)", "kfac (GGN)", "ekfac (GGN)")
"""Backends whose RUE is also scored (the others' solves are the ones above, less exactly)."""


def peer_functions() -> dict[str, Any]:
    """The peers' adapters ``(workload, model, damping, *, unit_seconds) -> Attribution``: ``peers.PEERS`` if it
    exists, else every public function of ``peers.py`` named in its ``__all__``."""
    module = optional_module("peers")
    if module is None:
        return {}
    found = getattr(module, "PEERS", None)
    if found is None:
        found = {name: getattr(module, name) for name in getattr(module, "__all__", []) if callable(getattr(module, name))}
    return dict(found)


def _clone(model: torch.nn.Module, workload: Workload) -> torch.nn.Module:
    copy = workload.make_model()
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def run_workload(workload: Workload, size: str, cache_root: Path | None, progress: bool = True,
                 with_peers: bool = True, deadline: float | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Everything measured on one workload, as JSON-ready data. ``deadline`` (a
    ``time.perf_counter()`` value): rows not started by then are skipped and listed as failures
    (the retrains are cached, so a later run completes them). ``on_progress`` receives the
    partial result after every row (so that a run stopped part-way leaves its finished rows)."""
    plan = PLANS[size]
    cache = RetrainCache(cache_root, workload)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t_start:7.1f}s] {workload.name}: {msg}", flush=True)

    model = truths.retrain(workload, cache, "trained", np.arange(len(workload.train_y)), workload.seed)
    # the ground truths first: they are cached, so a run killed later resumes without retraining
    subsets = truths.subset_truth(workload, cache, plan.K, model_seed=workload.seed, progress=progress)
    boot = truths.bootstrap_truth(workload, cache, model, plan.B, progress=progress)
    loo = truths.leave_one_out_truth(workload, cache, model, plan.loo, progress=progress) if plan.loo else None
    log(f"retrains: {len(cache.trained)} trained, {len(cache.loaded)} from the cache")

    objective = ours.build_objective(workload, model)
    grad_s = gradient_seconds(objective)
    damp = ours.choose_damping(objective)
    delta = damp["damping"]
    log(f"M = {objective.num_params}, n = {objective.n}, gradient {grad_s:.3g} s, δ = {delta:.3g}")
    attributions: list[Attribution] = []
    rue_values: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    dense_toolbox = None

    def past_deadline(name: str) -> bool:
        if deadline is None or time.perf_counter() < deadline:
            return False
        failures[name] = "skipped: the run's --deadline-minutes had passed"
        log(f"{name} skipped (deadline)")
        return True

    def run_ours(backend: ours.Backend) -> None:
        nonlocal dense_toolbox
        if past_deadline(f"ours: {backend.label}"):
            return
        try:
            attribution, tb = ours.attribute(workload, objective, backend, delta, grad_s)
            attributions.append(attribution)
            log(f"{attribution.method}: {attribution.seconds:.1f} s = {attribution.gradients:.0f} gradients")
            if backend.label in RUE_ROWS:
                rue_values[backend.label] = ours.rue(tb, workload)
            if backend.label == ours.DENSE_LABEL:
                dense_toolbox = tb
            del tb
        except Exception as err:  # a failing backend is a row with its error, not a lost run
            failures[f"ours: {backend.label}"] = f"{type(err).__name__}: {err}"
            log(f"ours: {backend.label} failed: {err}")

    inputs = workload.test_X if workload.ood_X is None else torch.cat([workload.test_X,
                                                                        workload.ood_X.to(workload.test_X.dtype)])
    is_ood = np.r_[np.zeros(len(workload.test_X), bool), np.ones(len(inputs) - len(workload.test_X), bool)]
    lees_values: dict[str, tuple[np.ndarray, float, float]] = {}

    def result() -> dict[str, Any]:
        """Everything measured so far, scored."""
        rows = []
        for a in attributions:
            s = scores.lds(a.scores, subsets.masks, subsets.losses)
            row = {"method": a.method, "lds": s["mean"], "lds_lo": s["lo"], "lds_hi": s["hi"], "seconds": a.seconds,
                   "gradients": a.gradients, "peak_mib": a.peak_mib, "hvps": a.hvps, "notes": a.notes}
            if loo is not None:
                row.update({f"loo_{k}": v for k, v in scores.leave_one_out(a.scores, loo.removed, loo.change).items()})
            rows.append(row)
        rue_rows = [{"backend": label, "values": values.tolist(),
                     **{f"warm_{k}": v for k, v in scores.rue_scores(values, boot.warm_variance).items()},
                     **{f"scratch_{k}": v for k, v in scores.rue_scores(values, boot.scratch_variance).items()}}
                    for label, values in rue_values.items()]
        lees_rows = [{"backend": label, "seconds": sec, "peak_mib": peak,
                      **scores.lees_scores(values, boot.disagreement, is_ood)}
                     for label, (values, sec, peak) in lees_values.items()]
        return {"name": workload.name, "description": workload.description, "M": objective.num_params,
                "n": objective.n, "T": len(workload.test_y), "n_ood": int(is_ood.sum()), "damping": damp,
                "gradient_seconds": grad_s, "plan": plan.__dict__, "lds_noise": _lds_noise(subsets),
                "lds_defined": lds_defined(subsets),
                "rows": rows, "failures": dict(failures), "rue": rue_rows,
                "warm_variance": boot.warm_variance.tolist(), "scratch_variance": boot.scratch_variance.tolist(),
                "lees": lees_rows, "retrains": {"trained": len(cache.trained), "loaded": len(cache.loaded)},
                "seconds": time.perf_counter() - t_start}

    def report_progress() -> None:
        if on_progress is not None:
            on_progress(result())

    # the cheapest rows first, the peers and LEES after them, then CG and the costly rows: a
    # deadline drops the most expensive first
    rows_of_ours = list(ours.backends(objective, ours.Budget.for_size(size)))
    for backend in rows_of_ours:
        if backend.tier == 0:
            run_ours(backend)
            report_progress()
    if with_peers:
        for name, fn in peer_functions().items():
            if past_deadline(f"peer {name}"):
                continue
            try:
                attribution = fn(workload, _clone(model, workload), delta, unit_seconds=grad_s)
                attributions.append(attribution)
                log(f"{attribution.method}: {attribution.seconds:.1f} s")
            except Exception as err:
                failures[f"peer {name}"] = f"{type(err).__name__}: {err}"
                log(f"peer {name} failed: {err}")
                if progress:
                    traceback.print_exc()
            report_progress()
    lees_values.update(ours.lees_lanczos(objective, inputs, delta))
    report_progress()
    for backend in rows_of_ours:
        if backend.tier > 0:
            run_ours(backend)
            report_progress()
    if dense_toolbox is not None:
        lees_values.update(ours.lees_dense(dense_toolbox, inputs))
    log("done")
    return result()


def lds_defined(subsets: truths.SubsetTruth) -> int:
    """Test points whose loss differs between subset models (elsewhere, e.g. a loss saturated at
    exactly 0, the Spearman correlation is undefined and the point is left out of the LDS mean)."""
    return int((np.ptp(subsets.losses, axis=0) > 0).sum())


def _lds_noise(subsets: truths.SubsetTruth) -> float:
    """Median over test points of the spread (std) of the subset models' test losses: a scale for
    how much there is to predict."""
    return float(np.median(subsets.losses.std(axis=0)))


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "load_start": os.getloadavg()[0]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the ≤ 30-minute run (default)")
    size.add_argument("--full", action="store_true", help="more subsets, bootstrap members and leave-one-out")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds to minutes)")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated names (default: all available: " + ", ".join(registry()) + ")")
    parser.add_argument("--out", type=Path, default=BENCHMARKS, help="folder of GROUND_TRUTH.md and plots/")
    parser.add_argument("--cache", type=Path, default=BENCHMARKS / "ground_truth_cache",
                        help="folder of the cached retrains (default: %(default)s)")
    parser.add_argument("--no-peers", action="store_true", help="only this project's backends")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="only re-render from ground_truth.json files (their workloads are concatenated; "
                             "the first file's command, machine and date are kept)")
    parser.add_argument("--command", default=None, help="the command shown in the report")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="start no backend or peer after this many minutes; the skipped rows are listed")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        parts = [json.loads(path.read_text()) for path in args.from_json]
        results = {**parts[0], "workloads": [w for part in parts for w in part["workloads"]],
                   "seconds": max(part.get("seconds", 0.0) for part in parts)}
        if args.command:
            results["command"] = args.command
        write_report(results, args.out)
        return 0
    size = "full" if args.full else "tiny" if args.tiny else "quick"
    available = registry()
    names = list(available) if args.workloads is None else [s.strip() for s in args.workloads.split(",") if s.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"ground truth: unknown workload(s) {unknown}; available: {list(available)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    deadline = None if args.deadline_minutes is None else t0 + 60.0 * args.deadline_minutes
    results: dict[str, Any] = {
        "command": args.command or "python -m benchmarks.ground_truth.run " + " ".join(argv or sys.argv[1:]),
        "size": size, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workloads": []}
    args.out.mkdir(parents=True, exist_ok=True)
    def write(done: list[dict[str, Any]]) -> None:
        results.update(workloads=done, seconds=time.perf_counter() - t0, load_end=os.getloadavg()[0])
        (args.out / "ground_truth.json").write_text(json.dumps(results, indent=1, default=float))
        write_report(results, args.out)

    finished: list[dict[str, Any]] = []
    for name in names:
        workload = available[name](size)
        finished.append(run_workload(workload, size, args.cache, progress=not args.no_progress,
                                     with_peers=not args.no_peers, deadline=deadline,
                                     on_progress=lambda partial: write([*finished, {**partial, "partial": True}])))
        write(finished)
    print(f"ground truth: {len(names)} workload(s) in {time.perf_counter() - t0:.0f} s; "
          f"wrote {args.out / 'GROUND_TRUTH.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
