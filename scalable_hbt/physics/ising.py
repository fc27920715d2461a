r"""Seeded samples of the 2D Ising model on an L × L periodic square lattice.

The model, with coupling J = 1 and no field:

.. math::

    H(s) = -J \sum_{\langle i j \rangle} s_i s_j, \qquad s_i = \pm 1,

the sum running over the 2 L² nearest-neighbour bonds of the torus. Configurations are
drawn from the Boltzmann distribution p(s) ∝ exp(−H(s)/T) (k_B = 1). In the infinite
lattice the model orders below Onsager's critical temperature

.. math::

    T_c = \frac{2J}{\ln(1 + \sqrt{2})} \approx 2.269,

with spontaneous magnetisation m₀(T) = (1 − sinh⁻⁴(2J/T))^{1/8} (Yang) and energy per site

.. math::

    u(T) = -J \coth(2\beta J)\Big[1 + \frac{2}{\pi}\big(2\tanh^2(2\beta J) - 1\big) K(k)\Big],
    \qquad k = \frac{2\sinh(2\beta J)}{\cosh^2(2\beta J)},

K the complete elliptic integral of the first kind (u(T_c) = −√2). These closed forms are
`spontaneous_magnetisation` and `onsager_energy_per_site`, the references the tests hold
the samplers to.

Two Markov-chain updates, both vectorised over many independent chains at once (numpy):

* ``"swendsen-wang"`` (default), the Fortuin–Kasteleyn cluster update Wolff's algorithm also
  builds on: every bond between aligned neighbours is activated with probability
  p = 1 − exp(−2J/T), the connected components of activated bonds (one
  ``scipy.sparse.csgraph.connected_components`` call over all chains) are the clusters, and
  each cluster is flipped with probability 1/2. It satisfies detailed balance, and near T_c
  its autocorrelation time grows only weakly with L (dynamic exponent z ≈ 0.2–0.3 against
  ≈ 2.2 for local updates), so chains decorrelate in a few sweeps at L = 32. Wolff grows one
  cluster per step, which is sequential per chain; Swendsen–Wang flips all of them at once,
  which is what lets thousands of chains advance in one array operation.
* ``"metropolis"``: checkerboard single-spin Metropolis. The lattice (L even) splits into
  two sublattices whose spins do not interact with each other; all spins of one colour are
  proposed flipped at once, each accepted with probability min(1, exp(−ΔE/T)),
  ΔE = 2 J s_i Σ_{j∼i} s_j. One sweep = both colours. Slow near T_c and prone to long-lived
  stripe states below it from a random start; kept as an independent check of the cluster
  sampler (both must reproduce Onsager's energy).

Equilibration and decorrelation: every chain starts from independent uniformly random spins
(T = ∞), runs ``equilibration`` sweeps, then yields one configuration every ``spacing``
sweeps, ``per_chain`` times. Configurations from different chains are independent; those of
one chain are spaced by ``spacing`` sweeps, several integrated autocorrelation times of the
Swendsen–Wang energy at L = 32 for the defaults. Cost: O(L²) per chain and sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from scipy.special import ellipk
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "T_CRITICAL",
    "IsingSamples",
    "sample_ising",
    "energy_per_site",
    "magnetisation_per_site",
    "onsager_energy_per_site",
    "spontaneous_magnetisation",
]

T_CRITICAL = 2.0 / math.log(1.0 + math.sqrt(2.0))
"""Onsager's critical temperature of the square-lattice Ising model, J = k_B = 1."""

Algorithm = Literal["swendsen-wang", "metropolis"]


@dataclass(frozen=True)
class IsingSamples:
    """Configurations of the 2D Ising model with their temperatures and phase labels.

    Attributes:
        configurations: (N, 1, L, L) float32 spins ±1 (a one-channel image per configuration).
        temperatures: (N,) float64, the temperature each configuration was drawn at.
        labels: (N,) int64, 0 = ordered (T < T_c), 1 = disordered (T > T_c).
    """

    configurations: Tensor
    temperatures: Tensor
    labels: Tensor


def onsager_energy_per_site(temperature: float, coupling: float = 1.0) -> float:
    """Onsager's exact energy per site u(T) of the infinite square lattice (formula above)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b2 = 2.0 * coupling / temperature
    k = 2.0 * math.sinh(b2) / math.cosh(b2) ** 2
    K = float(ellipk(min(k * k, 1.0)))           # scipy's ellipk takes the parameter m = k² (≤ 1)
    # at T_c, K diverges logarithmically while its factor 2 tanh²(2βJ) − 1 vanishes linearly
    term = 0.0 if math.isinf(K) else (2.0 * math.tanh(b2) ** 2 - 1.0) * K
    return -coupling / math.tanh(b2) * (1.0 + 2.0 / math.pi * term)


def spontaneous_magnetisation(temperature: float, coupling: float = 1.0) -> float:
    """Yang's exact spontaneous magnetisation per site of the infinite lattice (0 above T_c)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = 1.0 - math.sinh(2.0 * coupling / temperature) ** -4
    return x ** 0.125 if x > 0 else 0.0


def energy_per_site(spins: Tensor | np.ndarray, coupling: float = 1.0) -> Tensor:
    """H(s)/L² for each configuration: spins (..., L, L) → (...,), periodic bonds."""
    s = torch.as_tensor(spins, dtype=torch.float64)
    bonds = s * torch.roll(s, 1, dims=-1) + s * torch.roll(s, 1, dims=-2)
    return -coupling * bonds.mean(dim=(-2, -1))


def magnetisation_per_site(spins: Tensor | np.ndarray) -> Tensor:
    """Σ_i s_i / L² for each configuration: spins (..., L, L) → (...,) (signed)."""
    return torch.as_tensor(spins, dtype=torch.float64).mean(dim=(-2, -1))


def _swendsen_wang_sweep(s: np.ndarray, p_bond: float, rng: np.random.Generator) -> None:
    """One Swendsen–Wang update of every chain of ``s`` (C, L, L) int8, in place."""
    C, L, _ = s.shape
    index = np.arange(s.size).reshape(s.shape)
    rows, cols = [], []
    for axis in (1, 2):
        neighbour = np.roll(s, -1, axis=axis)
        active = (s == neighbour) & (rng.random(s.shape) < p_bond)
        rows.append(index[active])
        cols.append(np.roll(index, -1, axis=axis)[active])
    i, j = np.concatenate(rows), np.concatenate(cols)
    graph = sp.coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(s.size, s.size))
    n_clusters, cluster = connected_components(graph, directed=False)
    flip = np.where(rng.random(n_clusters) < 0.5, -1, 1).astype(np.int8)
    s *= flip[cluster].reshape(s.shape)


def _metropolis_sweep(s: np.ndarray, beta: float, coupling: float, rng: np.random.Generator,
                      colour: np.ndarray) -> None:
    """One checkerboard Metropolis sweep of every chain of ``s`` (C, L, L) int8, in place."""
    for parity in (0, 1):
        field = (np.roll(s, 1, 1) + np.roll(s, -1, 1) + np.roll(s, 1, 2) + np.roll(s, -1, 2)).astype(np.float64)
        delta_e = 2.0 * coupling * s * field
        accept = (colour == parity) & (rng.random(s.shape) < np.exp(-beta * delta_e))
        s[accept] *= -1


def _chains_at(temperature: float, n_chains: int, L: int, equilibration: int, spacing: int, per_chain: int,
               algorithm: Algorithm, coupling: float, rng: np.random.Generator) -> np.ndarray:
    """(per_chain · n_chains, L, L) int8 configurations at one temperature."""
    s = np.where(rng.random((n_chains, L, L)) < 0.5, -1, 1).astype(np.int8)
    beta = 1.0 / temperature
    p_bond = 1.0 - math.exp(-2.0 * beta * coupling)
    colour = (np.add.outer(np.arange(L), np.arange(L)) % 2)[None]
    out = []
    for sweep in range(1, equilibration + spacing * (per_chain - 1) + 1):
        if algorithm == "swendsen-wang":
            _swendsen_wang_sweep(s, p_bond, rng)
        else:
            _metropolis_sweep(s, beta, coupling, rng, colour)
        if sweep >= equilibration and (sweep - equilibration) % spacing == 0:
            out.append(s.copy())
    return np.concatenate(out)


def sample_ising(L: int, temperatures: Sequence[float], per_temperature: int, seed: int, *,
                 per_chain: int = 1, equilibration: int = 100, spacing: int = 10,
                 algorithm: Algorithm = "swendsen-wang", coupling: float = 1.0,
                 progress: bool = True) -> IsingSamples:
    """Draw ``per_temperature`` configurations at each temperature (see the module docstring).

    Args:
        L: linear lattice size (even, ≥ 2); the lattice is periodic in both directions.
        temperatures: the temperatures T > 0 (units of J/k_B), each sampled independently.
        per_temperature: configurations per temperature; must be a multiple of ``per_chain``.
        seed: seeds one ``numpy.random.Generator`` for everything; same seed, same samples.
        per_chain: configurations taken from each chain (per_temperature / per_chain chains
            per temperature run side by side).
        equilibration: sweeps before the first configuration of a chain.
        spacing: sweeps between two configurations of one chain.
        algorithm: ``"swendsen-wang"`` (cluster) or ``"metropolis"`` (checkerboard, local).
        coupling: J > 0 (ferromagnet).
        progress: show a tqdm bar over the temperatures.

    Returns:
        `IsingSamples`, configurations grouped by temperature in the order given.

    Cost: (equilibration + spacing·(per_chain − 1)) sweeps of per_temperature/per_chain
    chains of L² spins per temperature.
    """
    temps = [float(t) for t in temperatures]
    if L < 2 or L % 2:
        raise ValueError(f"L must be even and ≥ 2 (the checkerboard needs two sublattices), got {L}")
    if not temps or min(temps) <= 0:
        raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temps}")
    if per_chain < 1 or per_temperature < 1 or per_temperature % per_chain:
        raise ValueError(f"per_temperature ({per_temperature}) must be a positive multiple of per_chain "
                         f"({per_chain})")
    if equilibration < 1 or spacing < 1:
        raise ValueError(f"equilibration and spacing must be ≥ 1 sweep, got {equilibration} and {spacing}")
    if algorithm not in ("swendsen-wang", "metropolis"):
        raise ValueError(f"algorithm must be 'swendsen-wang' or 'metropolis', got {algorithm!r}")
    if coupling <= 0:
        raise ValueError(f"coupling must be > 0 (ferromagnet; the phase labels assume it), got {coupling}")
    rng = np.random.default_rng(seed)
    n_chains = per_temperature // per_chain
    blocks = [_chains_at(t, n_chains, L, equilibration, spacing, per_chain, algorithm, coupling, rng)
              for t in tqdm(temps, desc="Ising sampling", disable=not progress)]
    spins = torch.from_numpy(np.concatenate(blocks)).to(torch.float32).unsqueeze(1)
    t = torch.tensor(temps, dtype=torch.float64).repeat_interleave(per_temperature)
    labels = (t > T_CRITICAL * coupling).to(torch.int64)
    return IsingSamples(configurations=spins, temperatures=t, labels=labels)
