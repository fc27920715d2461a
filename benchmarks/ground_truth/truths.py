"""The ground truths, each by retraining through ``Workload.train`` (cached, resumable).

* **LDS subsets** (Park et al. 2023): K models, each trained on a random subset S_k of exactly
  ⌊α n⌉ training points (α = 1/2), all from the same initialisation and mini-batch seed as the
  studied model, so that the measured differences come from the data and not from the seed (with
  K of a few dozen, seed noise would otherwise dominate); measurement: each test point's loss
  (cross-entropy, no regulariser) under each model, ``losses (K, T)``.
* **Bootstrap ensembles** (RUE): B multinomial resamples of the n points (counts ``(B, n)``);
  warm-started models (``Workload.warm_train`` from θ̃ on the resample, RUE's assumption) and
  from-scratch models (fresh initialisation and seed per member). Per member: test losses
  ``(B, T)`` and class probabilities on the test and OOD inputs ``(B, T + O, C)``.
* **Leave-one-out** (where affordable): for m removed points, warm-started retrains without each
  (and one warm-started retrain on all points as the baseline, so that the optimiser's own
  movement cancels); actual loss change ``(T, m)``.

Cost: K + 2B (+ m + 1) calls of the training routine; every one is one file in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .retrain_cache import RetrainCache, State
from .workload import Workload

CHUNK = 512
"""Inputs per forward pass when measuring a retrained model."""


def subset_masks(n: int, K: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """K random subsets of exactly round(alpha·n) of n points, as a boolean ``(K, n)`` mask."""
    if not 0 < alpha < 1 or K < 2:
        raise ValueError(f"LDS needs 0 < alpha < 1 and K ≥ 2 subsets; got alpha={alpha}, K={K}.")
    rng = np.random.default_rng(seed)
    masks = np.zeros((K, n), dtype=bool)
    for k in range(K):
        masks[k, rng.choice(n, size=round(alpha * n), replace=False)] = True
    return masks


def bootstrap_counts(n: int, B: int, seed: int = 0) -> np.ndarray:
    """B multinomial resamples of n points with equal probability: counts ``(B, n)``, rows sum to n."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=B)


def trained_model(workload: Workload, seed: int | None = None) -> nn.Module:
    """The studied model θ̃: ``workload.make_model()`` under ``torch.manual_seed(seed)`` (default
    ``workload.seed``), trained on all points."""
    seed = workload.seed if seed is None else seed
    torch.manual_seed(seed)
    model = workload.make_model()
    return workload.train(model, workload.train_X, workload.train_y, seed)


def retrain(workload: Workload, cache: RetrainCache, key: str, index: np.ndarray, seed: int,
            start: State | None = None) -> nn.Module:
    """A model trained on the points ``index`` (repeats allowed): from scratch (seeded) or, with
    ``start``, continued from those parameters by ``workload.warm_train``; cached under ``key``."""
    def compute() -> State:
        torch.manual_seed(seed)
        model = workload.make_model()
        trainer = workload.train
        if start is not None:
            model.load_state_dict(start)
            trainer = workload.warm_train or workload.train
        rows = torch.as_tensor(index, dtype=torch.long)
        return trainer(model, workload.train_X[rows], workload.train_y[rows], seed).state_dict()

    model = workload.make_model()
    model.load_state_dict(cache.state(key, compute))
    return model.eval()


@torch.no_grad()
def test_losses(model: nn.Module, X: Tensor, y: Tensor) -> np.ndarray:
    """Per-point cross-entropy (no regulariser), ``(len(X),)`` float64."""
    out = [nn.functional.cross_entropy(model(X[i:i + CHUNK]), y[i:i + CHUNK], reduction="none")
           for i in range(0, len(X), CHUNK)]
    return torch.cat(out).double().numpy()


@torch.no_grad()
def probabilities(model: nn.Module, X: Tensor) -> np.ndarray:
    """Softmax class probabilities, ``(len(X), C)`` float64."""
    return torch.cat([model(X[i:i + CHUNK]).softmax(-1) for i in range(0, len(X), CHUNK)]).double().numpy()


def _evaluation_inputs(workload: Workload) -> Tensor:
    if workload.ood_X is None or len(workload.ood_X) == 0:
        return workload.test_X
    return torch.cat([workload.test_X, workload.ood_X.to(workload.test_X.dtype)])


@dataclass
class SubsetTruth:
    """LDS ground truth: ``masks (K, n)`` and the test losses of the subset models ``losses (K, T)``."""

    masks: np.ndarray
    losses: np.ndarray


def subset_truth(workload: Workload, cache: RetrainCache, K: int, alpha: float = 0.5, seed: int = 0,
                 model_seed: int = 0, progress: bool = True) -> SubsetTruth:
    masks = subset_masks(len(workload.train_y), K, alpha, seed)
    losses = np.empty((K, len(workload.test_y)))
    for k in tqdm(range(K), desc=f"{workload.name}: LDS retrains", disable=not progress):
        model = retrain(workload, cache, f"subset-a{alpha:g}-s{seed}-{k:03d}", np.flatnonzero(masks[k]), model_seed)
        losses[k] = test_losses(model, workload.test_X, workload.test_y)
    return SubsetTruth(masks, losses)


@dataclass
class BootstrapTruth:
    """Bootstrap ensembles: ``counts (B, n)``; for ``warm`` and ``scratch`` members the test
    losses ``(B, T)`` and probabilities on test + OOD inputs ``(B, T + O, C)``."""

    counts: np.ndarray
    warm_losses: np.ndarray
    scratch_losses: np.ndarray
    warm_probs: np.ndarray
    scratch_probs: np.ndarray

    @property
    def warm_variance(self) -> np.ndarray:
        """Var_b of each test point's loss over the warm-started members (population variance), ``(T,)``."""
        return self.warm_losses.var(axis=0)

    @property
    def scratch_variance(self) -> np.ndarray:
        return self.scratch_losses.var(axis=0)

    @property
    def disagreement(self) -> np.ndarray:
        """Ensemble disagreement of the from-scratch members on test + OOD inputs: Σ_c Var_b p_b(c | x), ``(T + O,)``."""
        return self.scratch_probs.var(axis=0).sum(axis=-1)


def bootstrap_truth(workload: Workload, cache: RetrainCache, trained: nn.Module, B: int, seed: int = 0,
                    progress: bool = True) -> BootstrapTruth:
    counts = bootstrap_counts(len(workload.train_y), B, seed)
    start = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    inputs = _evaluation_inputs(workload)
    out: dict[str, list] = {"warm": [], "scratch": []}
    probs: dict[str, list] = {"warm": [], "scratch": []}
    for b in tqdm(range(B), desc=f"{workload.name}: bootstrap retrains", disable=not progress):
        index = np.repeat(np.arange(counts.shape[1]), counts[b])
        for kind in ("warm", "scratch"):
            model = (retrain(workload, cache, f"boot-warm-s{seed}-{b:03d}", index, b, start=start) if kind == "warm"
                     else retrain(workload, cache, f"boot-scratch-s{seed}-{b:03d}", index, 1000 + b))
            out[kind].append(test_losses(model, workload.test_X, workload.test_y))
            probs[kind].append(probabilities(model, inputs))
    return BootstrapTruth(counts, np.stack(out["warm"]), np.stack(out["scratch"]), np.stack(probs["warm"]),
                          np.stack(probs["scratch"]))


@dataclass
class LeaveOneOutTruth:
    """Actual change of each test loss when training point ``removed[j]`` is left out, ``change (T, m)``."""

    removed: np.ndarray
    change: np.ndarray


def leave_one_out_truth(workload: Workload, cache: RetrainCache, trained: nn.Module, m: int,
                        progress: bool = True) -> LeaveOneOutTruth:
    """Warm-started leave-one-out for the m training points of largest training loss (large
    gradients, so effects above the optimiser's noise, chosen without any backend's scores)."""
    n = len(workload.train_y)
    removed = np.argsort(-test_losses(trained, workload.train_X, workload.train_y))[:m]
    start = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    base = test_losses(retrain(workload, cache, "loo-base", np.arange(n), 0, start=start), workload.test_X,
                       workload.test_y)
    change = np.empty((len(workload.test_y), m))
    for j, r in enumerate(tqdm(removed, desc=f"{workload.name}: leave-one-out retrains", disable=not progress)):
        keep = np.delete(np.arange(n), r)
        model = retrain(workload, cache, f"loo-{int(r):05d}", keep, 0, start=start)
        change[:, j] = test_losses(model, workload.test_X, workload.test_y) - base
    return LeaveOneOutTruth(removed, change)
