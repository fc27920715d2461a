"""Batch jobs: validation, dry run, results equal to the library, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scalable_hbt import Objective, Toolbox
from scalable_hbt.apps.jobs import JobError, load_job, run_job
from scalable_hbt.apps.jobs.runner import read_results
from jobs_fixture import make_mlp, write_job, write_problem

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    write_problem(tmp_path)
    return tmp_path


def _with_graph_cache(job: Path) -> Path:
    job.write_text(job.read_text().replace("damping = 1.0", "damping = 1.0\ncache_graphs = true"))
    return job


def test_results_equal_the_library(folder):
    """A job (with ``cache_graphs = true``) against the library (without)."""
    summary = run_job(load_job(_with_graph_cache(write_job(folder))), echo=lambda *_: None)
    assert summary["chunks_computed"] == 5 * 4 and summary["chunks_skipped"] == 0
    model = make_mlp().double()
    model.load_state_dict(torch.load(folder / "weights.pt"))
    with np.load(folder / "train.npz") as d:
        train = (torch.from_numpy(d["X"]), torch.from_numpy(d["y"]))
    test = torch.load(folder / "test.pt")
    obj = Objective(model, "cross_entropy", train, weight_decay=0.01, batch_size=16, dtype=torch.float64,
                    progress=False)
    tb = Toolbox(obj, damping=1.0, inverse="cg", eigen="lanczos", inverse_options={"rtol": 1e-12},
                 eigen_options={"m": 8})
    np.testing.assert_allclose(read_results(folder / "out", "influence"), tb.influence(test["X"], test["y"]).numpy(),
                               rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(read_results(folder / "out", "lees"), tb.extrapolation_score(test["X"], m=4).numpy(),
                               rtol=1e-8)
    assert read_results(folder / "out", "rue").shape == (24,)
    # a second run computes nothing and loads the curvature from the cache
    again = run_job(load_job(_with_graph_cache(write_job(folder))), echo=lambda *_: None)
    assert again["chunks_computed"] == 0 and again["chunks_skipped"] == 20


def test_dry_run_prints_the_plan_with_memory(folder):
    lines: list[str] = []
    info = run_job(load_job(write_job(folder)), dry_run=True, echo=lines.append)
    assert info["chunks"] == 5 and info["num_params"] == 43
    text = "\n".join(lines)
    assert "5 chunks of 5" in text and "memory influence_rows_per_chunk" in text
    assert not (folder / "out").exists()


def test_a_different_job_is_refused_in_the_same_output_folder(folder):
    run_job(load_job(write_job(folder, methods='["lees"]')), echo=lambda *_: None)
    job = write_job(folder, methods='["lees"]')
    job.write_text(job.read_text().replace("weight_decay = 0.01", "weight_decay = 0.02"))
    with pytest.raises(JobError, match="holds results of a different job"):
        run_job(load_job(job), echo=lambda *_: None)


def test_a_method_can_be_added_to_a_finished_job(folder):
    """Same inputs, one more method: the finished chunks are kept, only the new method runs."""
    run_job(load_job(write_job(folder, methods='["lees"]')), echo=lambda *_: None)
    summary = run_job(load_job(write_job(folder, methods='["lees", "influence"]')), echo=lambda *_: None)
    assert summary["chunks_skipped"] == 5 and summary["chunks_computed"] == 5
    assert read_results(folder / "out", "lees").shape == (24,)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('[model]\nfactory = "jobs_fixture:make_mlp"\n', "[model]\n"), "exactly one of 'factory'"),
    (lambda t: t.replace('weight_decay = 0.01', 'weight_decay = "big"'), r"\[objective\] weight_decay = 'big': expected a number"),
    (lambda t: t.replace('inverse = "cg"', 'inverse = "magic"'), r"\[curvature\] inverse = 'magic': expected one of"),
    (lambda t: t.replace('run = ["influence", "relatif", "rue", "lees"]', 'run = ["influence", "vibes"]'),
     r"\[methods\] run = .*expected a non-empty list"),
    (lambda t: t.replace('chunk_size = 5', 'chunk_size = 0'), r"\[output\] chunk_size = 0"),
    (lambda t: t.replace('damping = 1.0', 'damping = 1.0\nmax_vectors = 0'), r"\[curvature\] max_vectors = 0"),
    (lambda t: t.replace('damping = 1.0', 'damping = 1.0\nrue_damping = "big"'), r"\[curvature\] rue_damping = 'big'"),
    (lambda t: t.replace('damping = 1.0', 'damping = 1.0\ncache_graphs = "yes"'), r"\[curvature\] cache_graphs = 'yes'"),
    (lambda t: t.replace('[data]', '[data]\nvalidation = "x.npz"'), r"\[data\] has unknown key\(s\) \['validation'\]"),
    (lambda t: t.replace('train = "train.npz"', 'train = "train.csv"'), r"\[data\] train = 'train.csv'"),
    (lambda t: t.replace('[output]\ndir = "out"', '[output]'), r"\[output\] needs the key 'dir'"),
    (lambda t: t + "\n[extra]\n", r"\[job file\] has unknown key\(s\) \['extra'\]"),
    (lambda t: t.replace("[model]", "[model"), "is not valid TOML"),
])
def test_malformed_job_files_name_the_key(folder, edit, message):
    path = write_job(folder)
    path.write_text(edit(path.read_text()))
    with pytest.raises(JobError, match=message):
        load_job(path)


def _run_cli(job: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "scalable_hbt.apps.cli", "run", str(job)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_job_resumes_and_matches_an_uninterrupted_run(folder):
    methods = '["influence", "rue"]'
    reference = write_job(folder, out="ref", chunk=1, methods=methods, bootstrap=200)
    assert _run_cli(reference).wait(timeout=300) == 0

    job = write_job(folder, out="out", chunk=1, methods=methods, bootstrap=200)
    proc = _run_cli(job)
    first = folder / "out" / "rue" / "chunk-000000.npy"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert first.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no chunk written in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((folder / "out" / "rue").glob("chunk-*.npy"))
    assert 1 <= len(done) < 24, "the job finished before it could be killed: make each chunk slower"
    stamps = {p: p.stat().st_mtime_ns for p in done}
    for p in done:  # every visible chunk file is whole (partial writes only ever have temporary names)
        assert np.load(p).shape == (1,)

    assert _run_cli(job).wait(timeout=300) == 0
    for p, stamp in stamps.items():  # finished chunks were not recomputed
        assert p.stat().st_mtime_ns == stamp
    for method in ("influence", "rue"):
        np.testing.assert_array_equal(read_results(folder / "out", method), read_results(folder / "ref", method))
