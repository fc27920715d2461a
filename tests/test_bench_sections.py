"""The benchmark report's HVP-workload and eigen sections, and the rounds rule of its rows
(fast; renders synthetic results, runs no benchmark)."""

from __future__ import annotations

import sys

import pytest

from scalable_hbt.apps.cli import BENCH_REPORT

pytestmark = pytest.mark.skipif(not BENCH_REPORT.exists(), reason="needs a source checkout with benchmarks/")


@pytest.fixture
def bench_modules(monkeypatch):
    """benchmarks/ on sys.path for this test only (its conftest must not shadow tests/conftest later)."""
    monkeypatch.setattr(sys, "path", [str(BENCH_REPORT.parent), *sys.path])
    for name in ("render", "harness", "settings"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import harness
    import render
    return render, harness


def _row(harness, model: str, quantity: str, value: float, lo: float, hi: float, **kw) -> dict:
    rows = harness.Rows(model)
    rows.add(quantity, {"value": value, "lo": lo, "hi": hi, "rounds": 5}, **kw)
    return rows.rows[0]


def test_rows_refuse_ratios_over_fewer_than_five_rounds(bench_modules):
    _, harness = bench_modules
    rows = harness.Rows("m")
    with pytest.raises(ValueError, match="≥ 5 interleaved rounds"):
        rows.add("HVP / gradient", {"value": 2.0, "lo": 2.0, "hi": 2.0, "rounds": 1})
    rows.add("HVP / gradient", {"value": 2.0, "lo": 1.9, "hi": 2.1, "rounds": 5})
    assert rows.rows[0]["rounds"] == 5


def test_workload_and_eigen_sections(bench_modules):
    render, harness = bench_modules
    info = {"model": "cnn", "M": 282_250, "n": 512}
    hvp = {"kind": "workload", "workload": info, "peers": {"pyhessian": "ok", "curvlinops": "ok"},
           "peer_errors": {"curvlinops": 2e-7}, "reference": "ours", "checks": [],
           "rows": [_row(harness, "cnn", "HVP / gradient — ours", 2.4, 2.3, 2.5, implementation="ours", table="hvp"),
                    _row(harness, "cnn", "HVP / gradient — pyhessian", 2.3, 2.2, 2.4, implementation="pyhessian",
                         table="hvp"),
                    _row(harness, "cnn", "ours / fastest", 1.06, 1.01, 1.08, target="≤ 1", target_value=1.0,
                         table="hvp_goal")]}
    gpt = {"kind": "workload", "workload": {**info, "model": "gpt"}, "reference": "torch.func reference", "checks": [],
           "peers": {"pyhessian": "not applicable: tensor inputs only", "curvlinops": "ok"}, "peer_errors": {},
           "rows": [_row(harness, "gpt", "ours / fastest", 0.6, 0.5, 0.9, target="≤ 1", target_value=1.0,
                         table="hvp_goal")]}
    eig = {"kind": "eigen", "problem": {"model": "p", "M": 740, "n": 64, "weight_decay": 1e-3},
           "rows": [_row(harness, "p", "lobpcg", 3.0, 2.5, 3.5, target="wall ≤ 0.5 × ARPACK", passed=False,
                         table="eigen", solver="LOBPCG", hvps=566.0, hvps_range=[564.0, 566.0], hvps_vs_arpack=3.3,
                         residual=5e-9)]}
    ctx = render.Context({"machine_info": {}}, "cmd", "ok", None)
    data = {"benchmarks": [{"extra_info": e} for e in (hvp, gpt, eig)]}
    text = "\n".join(render.workloads_section(ctx, data) + render.eigen_section(ctx, data))
    cnn_line = next(line for line in text.splitlines() if line.startswith("| cnn |"))
    assert "**not met**" in cnn_line and "1.06" in cnn_line
    gpt_line = next(line for line in text.splitlines() if line.startswith("| gpt |"))
    assert "| met (within spread) |" not in gpt_line and "| met |" in gpt_line and "n/a" in gpt_line
    lob = next(line for line in text.splitlines() if "LOBPCG" in line)
    assert "566 (564–566)" in lob and "**not met**" in lob
