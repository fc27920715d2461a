"""Timing and peer helpers shared by the benchmark tests.

Everything here is measured as a *ratio inside one process*: the alternatives of a
question (our HVP, a peer's HVP, the gradient they are measured against, ...) are run
interleaved, round after round, with the order rotated each round, so that slow drifts
of a shared machine hit all of them alike. Each round yields one time per alternative;
a ratio is the median over rounds of the per-round quotient (with its min and max).

One round of all alternatives is the unit that ``benchmark.pedantic`` times, so the
pytest-benchmark statistics in the JSON are "seconds per interleaved round" and the
numbers that matter live in ``benchmark.extra_info``.
"""

from __future__ import annotations

import copy
import gc
import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from settings import MIN_ROUNDS, synchronize
from torch import Tensor, nn

from scalable_hbt.metrics import relative_error

PEERS = ("pyhessian", "curvlinops")
REL_TOL = 1e-4  # float32 agreement demanded between any two exact HVP implementations


# ---------------------------------------------------------------------------- timing
class Interleaved:
    """Time several callables interleaved, round by round.

    ``contenders`` maps a name to a zero-argument callable. ``repeat`` (per name, default
    1) runs that callable several times per round and keeps the median (for a cheap
    reference measured beside an expensive operation). The first output of every
    contender is kept in ``outputs`` for correctness checks (no extra work).
    """

    def __init__(self, contenders: dict[str, Callable[[], Any]], repeat: dict[str, int] | None = None,
                 keep_outputs: bool = True) -> None:
        self.contenders = dict(contenders)
        self.repeat = dict(repeat or {})
        self.keep_outputs = keep_outputs
        self.times: dict[str, list[float]] = {k: [] for k in self.contenders}
        self.outputs: dict[str, Any] = {}
        self._calls = 0
        self._warmup = 0

    def _round(self) -> None:
        names = list(self.contenders)
        shift = self._calls % len(names)
        names = names[shift:] + names[:shift]
        record = self._calls >= self._warmup
        self._calls += 1
        for name in names:
            fn = self.contenders[name]
            ts = []
            for _ in range(self.repeat.get(name, 1)):
                gc.collect()
                synchronize()
                t0 = time.perf_counter()
                out = fn()
                synchronize()
                ts.append(time.perf_counter() - t0)
                if self.keep_outputs and name not in self.outputs:
                    self.outputs[name] = out
                del out
            if record:
                self.times[name].append(statistics.median(ts))

    def run(self, benchmark, rounds: int, warmup_rounds: int = 0) -> Interleaved:
        """Run ``rounds`` timed rounds (after ``warmup_rounds`` discarded ones) under pytest-benchmark."""
        self._warmup = warmup_rounds
        benchmark.pedantic(self._round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        return self

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, num: str, den: str, num_scale: float = 1.0, den_scale: float = 1.0) -> dict[str, float]:
        """Median (min, max) over rounds of (t_num / num_scale) / (t_den / den_scale)."""
        q = [(a / num_scale) / (b / den_scale) for a, b in zip(self.times[num], self.times[den])]
        return {"value": statistics.median(q), "lo": min(q), "hi": max(q), "rounds": len(q)}

    def summary(self) -> dict[str, Any]:
        return {"seconds": {k: v for k, v in self.times.items()},
                "median_seconds": {k: self.median(k) for k in self.times if self.times[k]}}


# ---------------------------------------------------------------------------- reporting rows
@dataclass
class Rows:
    """Table rows a test hands to ``report.py`` through ``benchmark.extra_info``."""

    model: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def add(self, quantity: str, r: dict[str, float] | None, *, target: str | None = None,
            target_value: float | None = None, passed: bool | None = None, note: str = "", **extra: Any) -> None:
        """One ratio; ``target_value`` is the bound of an "≤" target (pass = value ≤ bound).

        A ratio measured over fewer than ``MIN_ROUNDS`` interleaved rounds is refused (ValueError)."""
        if r is not None and r.get("rounds", 0) < MIN_ROUNDS:
            raise ValueError(f"{self.model}: '{quantity}' was measured over {r.get('rounds', 0)} round(s); a reported "
                             f"ratio needs ≥ {MIN_ROUNDS} interleaved rounds (settings.rounds).")
        if passed is None and target_value is not None and r is not None:
            passed = bool(r["value"] <= target_value)
        row = {"model": self.model, "quantity": quantity, "target": target, "target_value": target_value,
               "pass": passed, "note": note, **extra}
        if r is None:
            row.update(value=None, lo=None, hi=None, rounds=0)
        else:
            row.update(r)
        self.rows.append(row)

    def check(self, what: str, a: Tensor, b: Tensor, tol: float = REL_TOL) -> None:
        """Record the relative difference ‖a − b‖ / ‖b‖ (asserted later by :meth:`assert_checks`)."""
        rel = relative_error(b.detach().double().cpu().numpy(), a.detach().double().cpu().numpy())
        self.checks.append({"model": self.model, "what": what, "rel_diff": rel, "tol": tol,
                            "ok": bool(rel < tol)})

    def publish(self, benchmark, **extra: Any) -> None:
        benchmark.extra_info.update(rows=self.rows, checks=self.checks, **extra)

    def assert_checks(self) -> None:
        bad = [c for c in self.checks if not c["ok"]]
        assert not bad, "HVP results DISAGREE between implementations: " + "; ".join(
            f"{c['model']}: {c['what']} relative difference {c['rel_diff']:.3e} ≥ {c['tol']:.0e}" for c in bad)


# ---------------------------------------------------------------------------- peers
def peer_status() -> dict[str, str]:
    """'ok' or the reason a peer library cannot be used."""
    status = {}
    for name in PEERS:
        try:
            importlib.import_module(name)
            status[name] = "ok"
        except Exception as err:  # ImportError, or a broken install
            status[name] = f"unavailable: {type(err).__name__}: {err}"
    return status


def to_list_format(v: Tensor, model: nn.Module) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``model.parameters()`` (same order as ours)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [t.view_as(p).clone() for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]


def from_list_format(vs: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in vs])


class PyHessianHVP:
    """PyHessian's full-data HVP (``hessian.dataloader_hv_product``) on its own model copy.

    PyHessian has no weight decay: its product is ∇²(mean loss)·v; ``full(v)`` adds wd·v
    (outside any timing) to compare with ours. ``cached`` is PyHessian's single-batch
    ``hessian_vector_product`` on a graph built once in the constructor — only the second
    backward per call, so not a full HVP from scratch (reported for information).
    """

    def __init__(self, problem, cached: bool = False) -> None:
        from pyhessian import hessian

        self.wd = problem.weight_decay
        self.model = copy.deepcopy(problem.model).eval()
        crit = nn.CrossEntropyLoss()
        if cached:
            self.h = hessian(self.model, crit, data=(problem.X, problem.y), cuda=False)
        else:
            self.h = hessian(self.model, crit, dataloader=problem.loader(), cuda=False)
        self.cached = cached

    def prepare(self, v: Tensor) -> list[Tensor]:
        return to_list_format(v, self.model)

    def product(self, v_list: list[Tensor]):
        if self.cached:
            from pyhessian.utils import hessian_vector_product

            return hessian_vector_product(self.h.gradsH, self.h.params, v_list)
        return self.h.dataloader_hv_product(v_list)[1]

    def full(self, v: Tensor) -> Tensor:
        return from_list_format(self.product(self.prepare(v))) + self.wd * v


class CurvlinopsHVP:
    """curvlinops' ``HessianLinearOperator`` (mean cross-entropy, the same data chunks as ours).

    ``op @ v`` for ``v`` of shape (M,) or (M, k); ``full`` adds wd·v (curvlinops has no
    weight decay) for comparisons.
    """

    def __init__(self, problem) -> None:
        from curvlinops import HessianLinearOperator

        self.wd = problem.weight_decay
        self.model = copy.deepcopy(problem.model).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.op = HessianLinearOperator(self.model, nn.CrossEntropyLoss(), params, problem.loader(),
                                        check_deterministic=False, num_data=problem.n)

    def product(self, v: Tensor) -> Tensor:
        return self.op @ v

    def full(self, v: Tensor) -> Tensor:
        return self.product(v) + self.wd * v
