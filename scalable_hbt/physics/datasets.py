"""Labelled ground-state data sets of the paper and their variants.

Each data point is the ground state of the half-filled spinless Fermi-Hubbard ring at one
V1 (see `hubbard.py`), labelled by its phase: 0 = Luttinger liquid (V1 <= 1), 1 = CDW-I
(V1 > 1).

* Training grid (paper): 500 points `linspace(0, 1, 500)` and 500 `linspace(1.01, 40, 500)`;
  `n_per_phase` shrinks both halves with the same endpoints (quick mode, e.g. 100).
* Reference test grid (paper): 20 points `linspace(0.01, 0.999, 20, endpoint=False)` and 30
  `geomspace(1.02, 39, 30)`.
* Variants: global-sign flips of chosen eigenvectors (sign-imbalanced / sign-balanced
  training sets, negative-sign test sets) and out-of-distribution (OOD) test points whose
  components are randomly permuted.

Models see min-max normalised amplitudes, x' = (x - min) / (max - min), where min and max
are single scalars over the whole TRAINING amplitude array; test sets reuse the training
values (`MinMaxScaler.fit(train.amplitudes).transform(test.amplitudes)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from .hubbard import DEFAULT_FIELD, CacheDir, ground_states

__all__ = [
    "V1_TRANSITION",
    "PAPER_N_SIGN_FLIPPED",
    "PAPER_OOD_FRACTION",
    "phase_labels",
    "training_grid",
    "evaluation_grid",
    "MinMaxScaler",
    "PhaseDataset",
    "flip_signs",
    "permute_components",
    "training_set",
    "evaluation_set",
]

V1_TRANSITION = 1.0
"""Label boundary: V1 <= V1_TRANSITION is Luttinger liquid (0), above is CDW-I (1)."""

PAPER_N_SIGN_FLIPPED = 10
"""Negative-sign eigenvectors in the sign-imbalanced training set. The paper says only
"a large majority of positive-sign eigenvectors and several negative-sign eigenvectors";
10 of 1000 is our reading of "several"."""

PAPER_OOD_FRACTION = 0.1
"""Fraction of permuted (OOD) test points. The paper says only "a percentage of test
elements"; its figure 5 marks a handful of the 50 test points, so we take 10 %."""

SeedLike = int | np.random.SeedSequence | np.random.Generator


def phase_labels(v1: np.ndarray) -> np.ndarray:
    """Phase labels, shape (N,) int64: 0 (Luttinger liquid) for V1 <= 1, 1 (CDW-I) above."""
    return (np.asarray(v1, dtype=np.float64) > V1_TRANSITION).astype(np.int64)


def _check_count(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}.")
    return int(n)


def training_grid(n_per_phase: int = 500) -> np.ndarray:
    """The paper's training V1 values, shape (2 * n_per_phase,), ascending.

    `concatenate([linspace(0, 1, n), linspace(1.01, 40, n)])` with n = n_per_phase.
    """
    n = _check_count("n_per_phase", n_per_phase)
    return np.concatenate([np.linspace(0.0, 1.0, n), np.linspace(1.01, 40.0, n)])


def evaluation_grid(n_ll: int = 20, n_cdw: int = 30) -> np.ndarray:
    """The paper's test V1 values, shape (n_ll + n_cdw,), ascending.

    `concatenate([linspace(0.01, 0.999, n_ll, endpoint=False), geomspace(1.02, 39, n_cdw)])`.
    """
    n_ll = _check_count("n_ll", n_ll)
    n_cdw = _check_count("n_cdw", n_cdw)
    return np.concatenate(
        [np.linspace(0.01, 0.999, n_ll, endpoint=False), np.geomspace(1.02, 39.0, n_cdw)]
    )


@dataclass(frozen=True)
class MinMaxScaler:
    """Global min-max normalisation x' = (x - min) / (max - min) with scalar min and max."""

    min: float
    max: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min) and np.isfinite(self.max) and self.max > self.min):
            raise ValueError(
                f"MinMaxScaler needs finite min < max, got min={self.min}, max={self.max}; "
                "fit it on a training set with more than one distinct amplitude."
            )

    @classmethod
    def fit(cls, amplitudes: np.ndarray) -> MinMaxScaler:
        """Scalar min and max over the whole array (all points, all components)."""
        values = np.asarray(amplitudes, dtype=np.float64)
        if values.size == 0:
            raise ValueError("Cannot fit MinMaxScaler on an empty array.")
        return cls(float(values.min()), float(values.max()))

    def transform(self, amplitudes: np.ndarray) -> np.ndarray:
        """(amplitudes - min) / (max - min), same shape, float64."""
        return (np.asarray(amplitudes, dtype=np.float64) - self.min) / (self.max - self.min)


@dataclass(frozen=True, eq=False)
class PhaseDataset:
    """A labelled set of ground states.

    Attributes:
        L: number of sites.
        v1: interaction strengths, shape (N,).
        amplitudes: raw amplitudes (after any sign flip or permutation), shape (N, dim),
            dim = C(L, L/2).
        labels: phase labels, shape (N,) int64 (0 = LL, 1 = CDW-I); OOD points keep the
            label of the state they were made from.
        sign_flipped: shape (N,) bool, True where the global sign was flipped.
        ood: shape (N,) bool, True where the components were randomly permuted.
    """

    L: int
    v1: np.ndarray
    amplitudes: np.ndarray
    labels: np.ndarray
    sign_flipped: np.ndarray
    ood: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.v1)
        shapes = {
            "v1": (np.shape(self.v1), (n,)),
            "labels": (np.shape(self.labels), (n,)),
            "sign_flipped": (np.shape(self.sign_flipped), (n,)),
            "ood": (np.shape(self.ood), (n,)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise ValueError(f"PhaseDataset.{name} has shape {got}, expected {want}.")
        if np.ndim(self.amplitudes) != 2 or np.shape(self.amplitudes)[0] != n:
            raise ValueError(
                f"PhaseDataset.amplitudes must have shape ({n}, dim), "
                f"got {np.shape(self.amplitudes)}."
            )

    def __len__(self) -> int:
        return len(self.v1)

    @property
    def dim(self) -> int:
        """Length of one state vector, C(L, L/2)."""
        return int(self.amplitudes.shape[1])

    def tensors(self, scaler: MinMaxScaler, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready tensors: X = scaler.transform(amplitudes) of shape (N, 1, dim) in
        `dtype` (Conv1d input with one channel) and y = labels, shape (N,) long.

        Pass the scaler fitted on the TRAINING set, for test sets too.
        """
        X = torch.as_tensor(scaler.transform(self.amplitudes), dtype=dtype).unsqueeze(1)
        y = torch.as_tensor(self.labels, dtype=torch.long)
        return X, y


def _choose(n_total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n_total, size=count, replace=False))


def flip_signs(dataset: PhaseDataset, count: int, *, seed: SeedLike = 0) -> PhaseDataset:
    """Flip the global sign of `count` distinct, randomly chosen (seeded) points.

    Returns a new PhaseDataset; `sign_flipped` is toggled at the chosen points.
    """
    n = len(dataset)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= n:
        raise ValueError(f"count must be an integer in [0, {n}] (the data set size), got {count!r}.")
    chosen = _choose(n, int(count), np.random.default_rng(seed))
    amplitudes = dataset.amplitudes.copy()
    amplitudes[chosen] *= -1.0
    flipped = dataset.sign_flipped.copy()
    flipped[chosen] ^= True
    return replace(dataset, amplitudes=amplitudes, sign_flipped=flipped)


def permute_components(dataset: PhaseDataset, fraction: float = PAPER_OOD_FRACTION, *,
                       seed: SeedLike = 0) -> PhaseDataset:
    """Make round(fraction * N) randomly chosen points out-of-distribution.

    Each chosen vector gets its own random permutation of its components (seeded), so it
    keeps its multiset of amplitudes (and its norm) but loses the Fock-basis structure.
    Returns a new PhaseDataset with `ood` set at the chosen points; labels are unchanged.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    chosen = _choose(len(dataset), int(round(fraction * len(dataset))), rng)
    amplitudes = dataset.amplitudes.copy()
    for i in chosen:
        amplitudes[i] = amplitudes[i, rng.permutation(dataset.dim)]
    ood = dataset.ood.copy()
    ood[chosen] = True
    return replace(dataset, amplitudes=amplitudes, ood=ood)


def _build(L: int, v1: np.ndarray, h: float, cache_dir: CacheDir, progress: bool) -> PhaseDataset:
    states = ground_states(L, v1, h=h, cache_dir=cache_dir, progress=progress)
    no_flags = np.zeros(len(v1), dtype=bool)
    return PhaseDataset(L=L, v1=v1, amplitudes=states, labels=phase_labels(v1),
                        sign_flipped=no_flags, ood=no_flags.copy())


def _streams(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent seed streams for the sign choice and the OOD choice."""
    sign_seed, ood_seed = np.random.SeedSequence(seed).spawn(2)
    return sign_seed, ood_seed


def training_set(
    L: int,
    n_per_phase: int = 500,
    *,
    sign: Literal["positive", "imbalanced", "balanced"] = "positive",
    n_flipped: int | None = None,
    seed: int = 0,
    h: float = DEFAULT_FIELD,
    cache_dir: CacheDir = None,
    progress: bool = True,
) -> PhaseDataset:
    """The paper's training set on `training_grid(n_per_phase)` (1000 points by default).

    Args:
        L: even number of sites (12 and 14 in the paper).
        n_per_phase: points per phase; the grid keeps its endpoints (quick mode: e.g. 100).
        sign: "positive" (all amplitudes >= 0), "imbalanced" (`n_flipped` seeded points
            with flipped global sign) or "balanced" (N // 2 seeded points flipped).
        n_flipped: flips for "imbalanced"; default `PAPER_N_SIGN_FLIPPED`.
        seed: seed of the choice of flipped points.
        h, cache_dir, progress: passed to `ground_states`.

    Returns:
        PhaseDataset of 2 * n_per_phase points ordered by V1.
    """
    if sign not in ("positive", "imbalanced", "balanced"):
        raise ValueError(
            f"sign must be 'positive', 'imbalanced' or 'balanced' for a training set, got {sign!r}."
        )
    if n_flipped is not None and sign != "imbalanced":
        raise ValueError(f"n_flipped applies only to sign='imbalanced', got sign={sign!r}.")
    data = _build(L, training_grid(n_per_phase), h, cache_dir, progress)
    sign_seed, _ = _streams(seed)
    if sign == "imbalanced":
        count = PAPER_N_SIGN_FLIPPED if n_flipped is None else n_flipped
        data = flip_signs(data, count, seed=sign_seed)
    elif sign == "balanced":
        data = flip_signs(data, len(data) // 2, seed=sign_seed)
    return data


def evaluation_set(
    L: int,
    n_ll: int = 20,
    n_cdw: int = 30,
    *,
    sign: Literal["positive", "negative", "balanced"] = "positive",
    ood_fraction: float = 0.0,
    seed: int = 0,
    h: float = DEFAULT_FIELD,
    cache_dir: CacheDir = None,
    progress: bool = True,
) -> PhaseDataset:
    """The paper's reference test set on `evaluation_grid(n_ll, n_cdw)` (50 points by default).

    (Named `evaluation_*`, not `test_*`, so that pytest never takes it for a test.)

    Args:
        L: even number of sites.
        n_ll, n_cdw: points on the Luttinger-liquid and CDW-I sides.
        sign: "positive", "negative" (every global sign flipped) or "balanced" (N // 2
            seeded points flipped).
        ood_fraction: fraction of points made OOD by `permute_components` (the paper's
            OOD experiment: `PAPER_OOD_FRACTION`); 0 gives the regular test set.
        seed: seed of the sign and OOD choices (independent streams).
        h, cache_dir, progress: passed to `ground_states`.

    Returns:
        PhaseDataset of n_ll + n_cdw points ordered by V1.
    """
    if sign not in ("positive", "negative", "balanced"):
        raise ValueError(
            f"sign must be 'positive', 'negative' or 'balanced' for a test set, got {sign!r}."
        )
    data = _build(L, evaluation_grid(n_ll, n_cdw), h, cache_dir, progress)
    sign_seed, ood_seed = _streams(seed)
    if sign == "negative":
        data = flip_signs(data, len(data), seed=sign_seed)
    elif sign == "balanced":
        data = flip_signs(data, len(data) // 2, seed=sign_seed)
    if ood_fraction != 0:
        data = permute_components(data, ood_fraction, seed=ood_seed)
    return data
