"""The large-network example at a small width: it runs, and its memory stays O(m·M) + activations."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import large_network  # noqa: E402


def test_vgg_like_has_over_ten_million_parameters_at_full_width():
    assert sum(p.numel() for p in large_network.vgg_like(1.0).parameters()) >= 10_000_000


def test_small_variant_runs_every_phase():
    report = large_network.run(width=0.125, n=32, n_test=3, m=6, batch_size=16, lissa_depth=5, seed=0,
                               progress=False)
    assert set(report["phases"]) == {"lanczos top-m", "lissa fit (scale)", "lissa influence", "ekfac fit",
                                     "ekfac normaliser", "lees"}
    assert report["influence_shape"] == [3, 32]
    assert len(report["lees"]) == 3 and all(v > 0 for v in report["lees"])
    values = report["top_eigenvalues"]
    assert values == sorted(values, reverse=True)


def test_peak_memory_sees_a_temporary_allocation_and_not_an_idle_block():
    import torch

    from scalable_hbt.memory import PeakMemory

    size = 256 * 2**20
    with PeakMemory() as busy:
        block = torch.ones(size // 8, dtype=torch.float64)  # written, so resident
        del block
    with PeakMemory() as idle:
        sum(range(10_000))
    assert 0.9 * size <= busy.increase <= 1.5 * size
    assert idle.increase < 0.1 * size
