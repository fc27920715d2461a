"""The two contracts of the ground-truth benchmark: a workload and an attribution.

A **workload** is a classification problem the benchmark trains itself (seeded): data, a model
constructor, the training routine (also used for every retrain of the ground truths), the
objective's settings, the parameters studied, and out-of-distribution inputs for LEES.

An **attribution** is what one backend or peer answers for a trained workload: the influence
matrix in this project's convention, DESIGN.md's

    I(z_i, z_t) = (1/n) g_tᵀ H_δ⁻¹ g_i      (T, n)

— the predicted *increase* of test point t's loss when training point i is removed, > 0 when z_i
helps z_t. A peer with another sign or scale is converted to this sign (its scale is kept: the
scores of the ground truths are rank correlations) by its adapter, which says how in its docstring.
Its cost is measured in the same process: seconds, and the same seconds in units of one full-data
gradient of the workload's objective (the benchmark's unit of time), and the peak resident memory
above the process's size before the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

Trainer = Callable[[nn.Module, Tensor, Tensor, int], nn.Module]
"""train(model, X, y, seed) -> the trained model (in eval mode); X, y may be any subset or
resample of the training set: the ground truths retrain through this one function."""


@dataclass(frozen=True)
class Workload:
    """A seeded classification problem and everything needed to train and study it.

    Attributes:
        name: short identifier, used in tables and as the cache folder's name.
        make_model: a fresh, untrained model (the caller seeds torch before calling it).
        train_X, train_y: the n training points (labels are class indices, int64).
        test_X, test_y: the T test points every influence matrix has rows for.
        train: the training routine (``Trainer``).
        loss: the ``Objective``'s loss preset (``"cross_entropy"``).
        weight_decay: the L2 coefficient of the objective, the same one ``train`` uses.
        params: module-name patterns of the parameters studied (``None``: all of them).
        ood_X: inputs from outside the training distribution (for the LEES AUROC), may be empty.
        description: one line for the report (data, model, sizes).
        warm_train: the routine that continues training from the parameters the model already
            has (RUE's warm-started bootstrap retrains start from θ̃); ``None``: ``train``.
        seed: the initialisation and mini-batch seed of the studied model θ̃ and of the LDS
            subset models.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train_X: Tensor
    train_y: Tensor
    test_X: Tensor
    test_y: Tensor
    train: Trainer
    loss: str = "cross_entropy"
    weight_decay: float = 0.0
    params: list[str] | None = None
    ood_X: Tensor | None = None
    description: str = ""
    warm_train: Trainer | None = None
    seed: int = 0


@dataclass
class Attribution:
    """One backend's or peer's influence matrix for a trained workload, with its cost.

    Attributes:
        method: the row's name in the tables (``"ours: cg (GGN)"``, ``"kronfluence: ekfac"``).
        scores: (T, n) influence in this project's convention (see the module docstring).
        seconds: wall time of the whole computation (fit and queries).
        gradients: ``seconds`` divided by the time of one full-data gradient measured in the same run.
        peak_mib: peak resident memory above the process's size before the call.
        hvps: full-data Hessian(-or-GGN)-vector products spent, ``None`` where it does not apply.
        notes: settings that matter (damping, rank, iterations) in a few words.
    """

    method: str
    scores: np.ndarray
    seconds: float
    gradients: float
    peak_mib: float
    hvps: float | None = None
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)
