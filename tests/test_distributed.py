"""Two gloo processes on one machine give the single-process results to float64 round-off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalable_hbt import HessianOperator, Toolbox
from scalable_hbt.curvature import LanczosCurvature
from scalable_hbt.apps.jobs import load_job, run_job
from scalable_hbt.apps.jobs.runner import read_results
from conftest import make_problem
from jobs_fixture import write_job, write_problem

TESTS = Path(__file__).parent

WORLD = 2


def _compute() -> dict[str, torch.Tensor]:
    obj = make_problem("cnn", n=37, batch_size=8)  # n not divisible by the world size on purpose
    op = HessianOperator(obj)
    V = torch.randn(obj.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    Xt, yt = obj.train.take(range(4))
    tb = Toolbox(obj, damping=1.0, inverse="cg", eigen="lanczos", eigen_options={"m": 6, "tol": 1e-12})
    weights = torch.rand(2, obj.n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    return {
        "hvp": op.matmat(V),
        "minibatch_hvp": op.minibatch_matmat(V, torch.tensor([1, 5, 9, 30, 36])),
        "gradient": obj.gradient(),
        "weighted_gradient": obj.gradient(weights),
        "eigenvalues": LanczosCurvature(m=6, tol=1e-12).fit(op).eigh(6)[0],
        "influence": tb.influence(Xt, yt),
        "relatif": tb.relatif(Xt, yt),
        "rue": tb.rue(Xt, yt, n_bootstrap=5, seed=2),
        "ekfac_relatif": tb.relatif(Xt, yt, normalizer="ekfac"),
    }


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = _compute()
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_two_gloo_processes_match_one(tmp_path):
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    sharded = torch.load(out_file)
    single = _compute()
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_shards_cover_the_data_once(monkeypatch):
    from scalable_hbt import distributed

    for world in (1, 2, 3, 7):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        covered = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            start, stop = distributed.shard(37)
            covered.extend(range(start, stop))
        assert covered == list(range(37))


def _torchrun(job: Path) -> dict:
    """``torchrun --nproc-per-node 2 -m scalable_hbt.apps.cli run job`` (gloo); returns its summary.json."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "scalable_hbt.apps.cli", "run", str(job)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((job.parent / "sharded" / "summary.json").read_text())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_hbt_run_under_torchrun_matches_one_process_and_resumes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    write_problem(tmp_path)
    run_job(load_job(write_job(tmp_path, out="single")), echo=lambda *_: None)
    job = write_job(tmp_path, out="sharded")
    summary = _torchrun(job)
    assert summary["chunks_computed"] == 5 * 4 and summary["chunks_skipped"] == 0
    methods = ("influence", "relatif", "rue", "lees")
    for method in methods:
        np.testing.assert_allclose(read_results(tmp_path / "sharded", method), read_results(tmp_path / "single", method),
                                   rtol=1e-9, atol=1e-13, err_msg=method)
    # resume: the ranks agree on the missing chunks and recompute only them (RUE chunk 1 is rank 1's)
    kept = {m: (tmp_path / "sharded" / m / "chunk-000000.npy").stat().st_mtime_ns for m in methods}
    (tmp_path / "sharded" / "rue" / "chunk-000001.npy").unlink()
    before = {m: read_results(tmp_path / "single", m) for m in methods}
    summary = _torchrun(job)
    assert summary["chunks_computed"] == 1 and summary["chunks_skipped"] == 5 * 4 - 1
    for m in methods:
        assert (tmp_path / "sharded" / m / "chunk-000000.npy").stat().st_mtime_ns == kept[m]
        np.testing.assert_allclose(read_results(tmp_path / "sharded", m), before[m], rtol=1e-9, atol=1e-13)
