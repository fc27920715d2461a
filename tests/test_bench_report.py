"""The benchmark report generator and ``hbt bench``'s command line (fast; the suite itself is not run)."""

from __future__ import annotations

import json
import sys

import pytest

from scalable_hbt.apps.cli import BENCH_REPORT, build_parser, main

pytestmark = pytest.mark.skipif(not BENCH_REPORT.exists(), reason="needs a source checkout with benchmarks/")


def _synthetic_results() -> dict:
    """A tiny pytest-benchmark JSON with one benchmark of each kind the renderer knows."""
    problem = {"model": "paper_cnn", "description": "tiny", "M": 740, "n": 200, "weight_decay": 2.5e-4,
               "damping": 0.04, "dense_fit_seconds": 1.0, "dense_fit_hvps": 740, "dtype": "float64",
               "device": "cpu", "training_seconds": 1.0, "n_test": 50, "n_ood": 5}
    acc = [{"model": "paper_cnn", "method": m, "backend": b, "seconds": 0.5, "hvps": 10.0, "seconds_vs_dense": 2.0,
            "max_rel_error": 1e-9, "pearson": 1.0, "spearman_resolved": 1.0, "top5_helpful": 1.0,
            "top5_harmful": 0.8, "auroc": 0.9}
           for b in ("dense", "cg") for m in ("fit", "influence", "relatif", "rue", "lees")]
    bounds = [{"model": "paper_cnn", "backend": "cg", "quantity": "relative error of H_δ⁻¹g", "value": 1e-9,
               "op": "≤", "bound": 1e-6, "ok": True}]
    peers = [{"model": "mlp", "peer": "pyhessian", "quantity": "trace", "time_ratio": 0.5, "time_ratio_lo": 0.4,
              "time_ratio_hi": 0.6, "rounds": 1, "ours_seconds": 1.0, "peer_seconds": 2.0, "ours_error": 0.01,
              "peer_error": 0.02, "error_ratio": 0.5, "note": ""}]
    points = [{"op": "hvp", "family": f, "M": M, "n": 256, "seconds": 1e-4 * M ** 0.5, "gradient_seconds": 5e-5 * M ** 0.5,
               "hvps": 1.0, "peak_bytes": 8 * M} for f in ("M", "n") for M in (1_000, 10_000, 100_000)]
    scaling = {"kind": "scaling", "points": points,
               "slopes": [{"op": "hvp", "family": f, "points": 3, "time_slope": 0.5, "memory_slope": 1.0}
                          for f in ("M", "n")],
               "dense_wall": {"M": 30_000, "budget_bytes": 2 ** 34, "bytes_per_M2": 28},
               "families": {"M": {"n": 256}, "n": {"M": 100_000}}}
    engine = {"kind": "hvp", "problem": {"model": "paper_cnn_740", "M": 740, "n": 250, "batch_size": 250,
                                         "dtype": "float32", "device": "cpu"},
              "rows": [{"model": "paper_cnn_740", "quantity": "HVP / gradient — ours rev-over-rev", "value": 2.2,
                        "lo": 2.0, "hi": 2.4, "rounds": 1, "target": "≤ 2.5", "target_value": 2.5, "pass": True}],
              "checks": [{"model": "paper_cnn_740", "what": "a vs b", "rel_diff": 1e-7, "tol": 1e-4, "ok": True}]}
    return {"machine_info": {"python_version": "3.11", "hbt": {"cpu_count": 2, "torch": "2.x", "device": "cpu",
                                                               "OMP_NUM_THREADS": "1", "mode": "quick"}},
            "datetime": "2026-01-01T00:00:00+00:00",
            "benchmarks": [{"extra_info": {"kind": "accuracy", "physics_problem": problem, "accuracy": acc,
                                           "bounds": bounds}},
                           {"extra_info": {"kind": "peers", "physics_problem": problem, "peers_rows": peers}},
                           {"extra_info": scaling}, {"extra_info": engine}]}


def test_report_from_synthetic_json(tmp_path, monkeypatch):
    # a copy of sys.path, restored afterwards: report.py prepends benchmarks/, whose conftest
    # must not shadow tests/conftest for later imports (e.g. in spawned worker processes)
    monkeypatch.setattr(sys, "path", [str(BENCH_REPORT.parent), *sys.path])
    monkeypatch.delitem(sys.modules, "report", raising=False)
    import report
    src = tmp_path / "results.json"
    src.write_text(json.dumps(_synthetic_results()))
    assert report.main(["--from-json", str(src), "--out", str(tmp_path), "--command", "hbt bench --quick"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    for needle in ("## 1. Exact vs approximate", "## 2. Peers side by side", "## 3. Scaling in M and n",
                   "## 4. The physical limit", "Dense wall", "`hbt bench --quick`", "2 cores", "2026-01-01"):
        assert needle in text, needle
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["accuracy.png", "scaling_M.png", "scaling_n.png"]
    assert all(p.stat().st_size < 200_000 for p in (tmp_path / "plots").glob("*.png"))


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--full" in out and "--device" in out and "--out" in out


def test_bench_cuda_without_cuda_is_a_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
