"""The ground-truth benchmark's machinery on a problem small enough to know the answers.

A strictly convex problem (multinomial logistic regression, n = 40, wd = 0.1, float64) trained
to its unique minimum by L-BFGS: exact influence must predict subset retraining (LDS) and
leave-one-out; random scores must not; RUE must follow the warm-started bootstrap variance; the
retrain cache must resume after a partial run; and ``hbt bench --ground-truth`` must parse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scalable_hbt import Objective, Toolbox
from scalable_hbt.apps import cli

from benchmarks.ground_truth import scores, truths
from benchmarks.ground_truth.retrain_cache import RetrainCache
from benchmarks.ground_truth.training import Recipe
from benchmarks.ground_truth.workload import Workload

N, T, D, C, WD = 40, 12, 5, 3, 0.1


def logistic_workload() -> Workload:
    gen = torch.Generator().manual_seed(0)
    centers = 1.5 * torch.randn(C, D, generator=gen, dtype=torch.float64)
    y_all = torch.arange(N + T) % C
    X_all = centers[y_all] + torch.randn(N + T, D, generator=gen, dtype=torch.float64)
    recipe = Recipe(weight_decay=WD, epochs=0, lbfgs_iterations=500, grad_tol=1e-11)
    ood = 6.0 * torch.randn(8, D, generator=gen, dtype=torch.float64)
    return Workload("logistic", lambda: nn.Linear(D, C).double(), X_all[:N], y_all[:N], X_all[N:], y_all[N:],
                    recipe, weight_decay=WD, ood_X=ood, warm_train=recipe, description="logistic regression n = 40")


@pytest.fixture(scope="module")
def fitted():
    w = logistic_workload()
    model = truths.trained_model(w)
    obj = Objective(model, "cross_entropy", (w.train_X, w.train_y), weight_decay=WD, dtype=torch.float64,
                    progress=False)
    assert obj.gradient().abs().max() < 1e-7  # at the minimum (removing one of 40 points moves it by ~1e-2)
    tb = Toolbox(obj, damping=0.0, inverse="dense", eigen="dense", rue_damping=1e-6)
    influence = tb.influence(w.test_X, w.test_y, test_loss="loss").numpy()
    return w, model, tb, influence


def test_exact_influence_has_high_lds_and_random_scores_none(fitted, tmp_path):
    w, _, _, influence = fitted
    subsets = truths.subset_truth(w, RetrainCache(tmp_path, w), K=40, progress=False)
    exact = scores.lds(influence, subsets.masks, subsets.losses)
    assert exact["mean"] > 0.8 and exact["lo"] <= exact["mean"] <= exact["hi"], exact
    rng = np.random.default_rng(0)
    noise = [scores.lds(rng.standard_normal(influence.shape), subsets.masks, subsets.losses)["mean"] for _ in range(5)]
    assert abs(np.mean(noise)) < 0.1, noise
    flipped = scores.lds(-influence, subsets.masks, subsets.losses)  # the sign convention matters
    assert flipped["mean"] < -0.8


def test_leave_one_out_agrees_with_exact_influence(fitted, tmp_path):
    w, model, _, influence = fitted
    loo = truths.leave_one_out_truth(w, RetrainCache(tmp_path, w), model, m=6, progress=False)
    assert scores.leave_one_out(influence, loo.removed, loo.change)["pearson"] > 0.95


def test_cache_resumes_only_the_missing_retrain(tmp_path):
    w = logistic_workload()
    first = RetrainCache(tmp_path, w)
    full = truths.subset_truth(w, first, K=5, progress=False)
    assert len(first.trained) == 5 and not first.loaded
    files = sorted(first.folder.glob("*.pt"))
    assert len(files) == 5
    files[2].unlink()  # a run killed before this retrain was written
    (first.folder / ".subset-a0.5-s0-004.pt.tmp-1-dead").write_bytes(b"half")  # debris of a killed write
    second = RetrainCache(tmp_path, w)
    resumed = truths.subset_truth(w, second, K=5, progress=False)
    assert second.trained == [files[2].stem] and len(second.loaded) == 4
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-10)


def test_cache_folder_changes_with_the_workload(tmp_path):
    w = logistic_workload()
    other = Workload(w.name, w.make_model, w.train_X, w.train_y.flip(0), w.test_X, w.test_y, w.train,
                     weight_decay=WD, description=w.description)
    assert RetrainCache(tmp_path, w).folder != RetrainCache(tmp_path, other).folder


def test_warm_bootstrap_variance_is_positive_and_follows_rue(fitted, tmp_path):
    w, model, tb, _ = fitted
    boot = truths.bootstrap_truth(w, RetrainCache(tmp_path, w), model, B=30, progress=False)
    assert (boot.warm_variance > 0).all() and (boot.scratch_variance > 0).all()
    rue = tb.rue(w.test_X, w.test_y, n_bootstrap=200, seed=0, test_loss="loss").numpy()
    s = scores.rue_scores(rue, boot.warm_variance)
    assert s["spearman"] > 0.8, s
    assert 0.3 < s["median_ratio"] < 3, s  # same magnitude: both are the variance of the same resampling


def test_auroc_of_a_perfect_separator_is_one():
    is_ood = np.array([False, False, False, True, True])
    assert scores.auroc(np.array([0.1, 0.3, 0.2, 0.9, 0.5]), is_ood) == 1.0
    assert scores.auroc(-np.array([0.1, 0.3, 0.2, 0.9, 0.5]), is_ood) == 0.0
    with pytest.raises(ValueError, match="both"):
        scores.auroc(np.ones(3), np.zeros(3, bool))
    lees = scores.lees_scores(np.arange(5.0), np.arange(5.0) ** 2, is_ood)
    assert lees["auroc"] == lees["auroc_ensemble"] == 1.0 and lees["spearman_disagreement"] == pytest.approx(1.0)


def test_subsets_and_resamples_have_the_stated_sizes():
    masks = truths.subset_masks(41, 7, 0.5, seed=3)
    assert masks.shape == (7, 41) and (masks.sum(1) == 20).all()
    assert not (masks == masks[0]).all()
    counts = truths.bootstrap_counts(41, 4, seed=3)
    assert (counts.sum(1) == 41).all()


def test_bench_ground_truth_parses_and_runs_the_module(monkeypatch):
    args = cli.build_parser().parse_args(["bench", "--ground-truth", "--quick"])
    assert args.ground_truth and args.quick and not args.full
    assert not cli.build_parser().parse_args(["bench", "--quick"]).ground_truth
    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: seen.update(cmd=cmd, cwd=kw.get("cwd")) or 0)
    assert cli.main(["bench", "--ground-truth", "--quick"]) == 0
    assert seen["cmd"][1:4] == ["-m", cli.GROUND_TRUTH_MODULE, "--quick"]
    assert cli.main(["bench", "--ground-truth", "--device", "cuda"]) == 2


def test_run_scores_every_backend_and_writes_the_report(tmp_path):
    from benchmarks.ground_truth.report import REPORT, write_report
    from benchmarks.ground_truth.run import run_workload

    w = logistic_workload()
    partial = []
    result = run_workload(w, "tiny", tmp_path / "cache", progress=False, with_peers=False,
                          on_progress=partial.append)
    assert not result["failures"], result["failures"]
    assert [len(p["rows"]) for p in partial][:3] == [1, 2, 3] and partial[-1]["rows"] == result["rows"]
    methods = {r["method"] for r in result["rows"]}
    assert {"ours: dense (Hessian)", "ours: cg (GGN)", "ours: ekfac (GGN)"} <= methods
    dense = next(r for r in result["rows"] if r["method"] == "ours: dense (Hessian)")
    assert dense["gradients"] > 0 and dense["hvps"] >= w.train_X.shape[1] * 3  # M HVPs to assemble H
    write_report({"command": "test", "size": "tiny", "date": "today", "seconds": 1.0,
                  "machine": {"platform": "p", "processor": "cpu", "cpu_count": 2, "python": "3", "torch": "2",
                              "OMP_NUM_THREADS": "1"}, "workloads": [result]}, tmp_path)
    text = (tmp_path / REPORT).read_text()
    assert "## logistic" in text and "ours: ekfac (GGN)" in text and "| goal | verdict | numbers |" in text
    assert "dense, τ = 0.1 (the influence row's fit)" in [r["backend"] for r in result["lees"]]
    assert (tmp_path / "plots" / "ground_truth_lds_vs_time.png").stat().st_size > 0


def test_recipe_trainer_is_seeded_and_warm_continues_with_its_own_recipe():
    from benchmarks.ground_truth.workloads import RecipeTrainer
    from scalable_hbt.physics import TrainingRecipe

    w = logistic_workload()
    long = TrainingRecipe(optimizer="sgd", lr=0.1, momentum=0.9, schedule="step", steps=40, batch_size=8,
                          lbfgs_iterations=0)
    short = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, schedule="step", steps=5, batch_size=8,
                           lbfgs_iterations=0)
    trainer = RecipeTrainer(long, WD, short)

    def trained(seed: int, train=trainer, start=None) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(D, C).double()
        if start is not None:
            model.load_state_dict(start)
        return nn.utils.parameters_to_vector(train(model, w.train_X, w.train_y, seed).parameters()).detach()

    first = trained(1)
    assert torch.equal(first, trained(1)) and not torch.equal(first, trained(2))
    start = dict(zip(["weight", "bias"], [first[:C * D].view(C, D), first[C * D:]]))
    moved = (trained(1, trainer.warm, start) - first).norm()
    assert 0 < moved < 0.1 * (trained(1, trainer, start) - first).norm()  # lr/10, an eighth of the steps
    assert trainer.warm.recipe is short


def test_rows_past_the_deadline_are_skipped_and_listed(tmp_path):
    import time

    from benchmarks.ground_truth.report import render
    from benchmarks.ground_truth.run import run_workload

    result = run_workload(logistic_workload(), "tiny", tmp_path / "cache", progress=False, with_peers=False,
                          deadline=time.perf_counter())
    assert result["rows"] == [] and result["failures"]
    assert all(v.startswith("skipped") for v in result["failures"].values())
    assert "ours: cg (GGN)" in result["failures"] and "ours: dense (Hessian)" in result["failures"]
    text = render({"command": "test", "size": "tiny", "date": "today", "seconds": 1.0,
                   "machine": {"platform": "p", "processor": "cpu", "cpu_count": 2, "python": "3", "torch": "2",
                               "OMP_NUM_THREADS": "1"}, "workloads": [result]})
    assert "| ours: cg (GGN) | skipped |" in text
