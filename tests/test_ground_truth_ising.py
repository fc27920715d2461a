"""The Ising ResNet workload of the ground-truth benchmark at its tiny size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.ground_truth import ising
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
