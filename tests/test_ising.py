"""The 2D Ising sampler against the exact solution (Onsager, Yang) on a 16 × 16 torus.

Finite-size tolerances: at T = 1.5, 1.8 and 3.0 the correlation length is about one lattice
spacing or less, so the L = 16 values differ from the infinite lattice's by terms of order
exp(−L/ξ), far below the statistical error; the energy tolerance is therefore statistical
only, four standard errors of the mean over independent chains (one configuration per
chain). At T = 2.5 (ξ ≈ 4) the L = 16 energy is measurably off Onsager's, so it is not used.
"""

from __future__ import annotations

import math

import pytest
import torch

from scalable_hbt.physics.ising import (
    T_CRITICAL,
    energy_per_site,
    magnetisation_per_site,
    onsager_energy_per_site,
    sample_ising,
    spontaneous_magnetisation,
)

L = 16


def _sample(T: float, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
    return sample_ising(L, [T], n, seed, progress=False, **kwargs).configurations[:, 0]


def test_onsager_energy_at_critical_point_and_high_temperature_series():
    """u(T_c) = −√2 exactly; at high T the series of ln Z (loops of four bonds) gives
    u = −2t − 4t³(1 − t²) + O(t⁵), t = tanh(1/T): two references independent of the formula."""
    assert onsager_energy_per_site(T_CRITICAL) == pytest.approx(-math.sqrt(2), abs=1e-12)
    t = math.tanh(1 / 50)
    assert onsager_energy_per_site(50.0) == pytest.approx(-2 * t - 4 * t**3 * (1 - t**2), abs=1e-7)
    assert spontaneous_magnetisation(2.3) == 0.0


@pytest.mark.parametrize("T", [1.5, 3.5])
def test_magnetisation_ordered_and_disordered(T):
    """|m| at T = 1.5 is Yang's m₀ = 0.9865 (measured 0.987); at T = 3.5 it is the
    finite-size fluctuation √⟨m²⟩ ~ √(χT/L²) (measured 0.13), far from any ordered value."""
    m = magnetisation_per_site(_sample(T, 256)).abs().mean().item()
    if T < T_CRITICAL:
        assert abs(m - spontaneous_magnetisation(T)) < 0.01
    else:
        assert m < 0.2


@pytest.mark.parametrize("algorithm,equilibration", [("swendsen-wang", 50), ("metropolis", 300)])
@pytest.mark.parametrize("T", [1.8, 3.0])
def test_energy_matches_onsager(T, algorithm, equilibration):
    """Both updates reproduce Onsager's u(T) within four standard errors (independent chains)."""
    e = energy_per_site(_sample(T, 512, seed=1, algorithm=algorithm, equilibration=equilibration))
    se = e.std().item() / math.sqrt(len(e))
    assert abs(e.mean().item() - onsager_energy_per_site(T)) < 4 * se


def test_seeded_and_labelled():
    a = sample_ising(8, [1.5, 3.0], 6, seed=3, per_chain=3, equilibration=5, spacing=2, progress=False)
    b = sample_ising(8, [1.5, 3.0], 6, seed=3, per_chain=3, equilibration=5, spacing=2, progress=False)
    c = sample_ising(8, [1.5, 3.0], 6, seed=4, per_chain=3, equilibration=5, spacing=2, progress=False)
    assert torch.equal(a.configurations, b.configurations)
    assert not torch.equal(a.configurations, c.configurations)
    assert a.configurations.shape == (12, 1, 8, 8) and a.configurations.dtype == torch.float32
    assert set(a.configurations.unique().tolist()) == {-1.0, 1.0}
    assert a.labels.tolist() == [0] * 6 + [1] * 6
    assert a.temperatures.tolist() == [1.5] * 6 + [3.0] * 6


@pytest.mark.parametrize("kwargs,match", [
    (dict(L=7), "even"),
    (dict(temperatures=[-1.0]), "positive"),
    (dict(per_temperature=5, per_chain=2), "multiple"),
    (dict(algorithm="wolf"), "algorithm"),
])
def test_bad_input(kwargs, match):
    args = dict(L=8, temperatures=[2.0], per_temperature=4, seed=0, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_ising(**args)
