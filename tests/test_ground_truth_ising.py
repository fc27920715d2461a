"""The Ising ResNet workload of the ground-truth benchmark at its tiny size."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.ground_truth import ising, protocol, training
from scalable_hbt.physics.ising import T_CRITICAL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ising.workload("tiny", cache_dir=tmp_path_factory.mktemp("ising"))


def test_data_cached_labelled_and_band_excluded(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ising2")
    first = ising.ising_data("tiny", folder)
    assert len(list(folder.glob("*.npz"))) == 1
    again = ising.ising_data("tiny", folder)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    for part in ("train", "test"):
        T, y = first[f"{part}_T"], first[f"{part}_y"]
        assert np.array_equal(y, (T > T_CRITICAL).astype(np.int64))
        assert not np.any((T > ising.EXCLUDED_BAND[0]) & (T < ising.EXCLUDED_BAND[1]))
        assert set(y.tolist()) == {0, 1}
    assert tiny.train_X.shape == (200, 1, 16, 16) and tiny.test_X.shape == (20, 1, 16, 16)
    assert tiny.ood_X.shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match="size"):
        ising.workload("huge")


def test_full_model_has_a_million_parameters():
    model = ising.IsingResNet(ising.SIZES["full"].width)
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.ones(2, 1, 32, 32)).shape == (2, 2)


def test_training_seeded_eval_mode_and_learns(tiny):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(tiny.train(tiny.make_model(), tiny.train_X, tiny.train_y, 7))
    a, b = models
    assert not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        accuracy = (a(tiny.test_X).argmax(1) == tiny.test_y).float().mean().item()
    assert accuracy >= 0.8


def test_content_batches_keep_every_other_batch_when_a_point_is_removed():
    X = torch.randn(203, 3)
    full = training.content_batches(X, 16, seed=5, epoch=2)
    assert sorted(torch.cat(full).tolist()) == list(range(203))
    assert not torch.equal(torch.cat(full), torch.cat(training.content_batches(X, 16, seed=5, epoch=3)))
    removed = 77
    keep = np.delete(np.arange(203), removed)
    less = training.content_batches(X[keep], 16, seed=5, epoch=2)
    as_full = [set(keep[b.numpy()].tolist()) for b in less]
    expected = [set(b.tolist()) - {removed} for b in full]
    assert as_full == [b for b in expected if b]
    # the copies of a point in a resample share its batch
    twice = training.content_batches(torch.cat([X, X[:5]]), 16, seed=5, epoch=2)
    for b in twice:
        rows = set(b.tolist())
        assert all((i in rows) == (i + 203 in rows) for i in range(5))


def test_second_phase_optimizer_is_checked_and_the_data_key_ignores_training_settings(tmp_path):
    with pytest.raises(ValueError, match="frozen_optimizer"):
        ising.ResNetRecipe(1e-3, 1, 1, frozen_optimizer="lbfgs")
    ising.ising_data("tiny", tmp_path)
    retrained = dict(ising.SIZES, tiny=replace(ising.SIZES["tiny"], epochs=9, frozen_epochs=9, width=5))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ising, "SIZES", retrained)
        mp.setattr(ising, "sample_ising", lambda *a, **k: pytest.fail("resampled for a training setting"))
        ising.ising_data("tiny", tmp_path)


def test_warm_leave_one_out_responds_through_the_removed_gradient(tmp_path):
    """The protocol check on the tiny size: with the default second phase (plain SGD) every
    removed point's loss changes correlate clearly and positively with g_tᵀ g_r (an optimiser
    that echoes the removal, like Adam restarted from θ̃, gives correlations of either sign)."""
    rows = protocol.check("tiny", 3, [("sgd", ising.ResNetRecipe.frozen_lr)], data_cache=tmp_path)
    assert min(rows[0]["per_point"]) > 0.5 and rows[0]["pooled"] > 0.8, rows
