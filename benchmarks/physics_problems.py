"""Trained models on the paper's Fermi-Hubbard data, with the dense oracle fitted once.

Two problems share the data of ``hbt demo`` (L = 12 spinless Fermi-Hubbard ground states,
924 Fock amplitudes each, min-max scaled; wd = 0.05 / n; float64) and its training routine
(``scalable_hbt.apps.demo.train_classifier``: ``TIGHT_RECIPE``, Adam then L-BFGS, with a fixed
number of Adam epochs):

* ``paper_cnn``: the paper's 740-parameter 1D CNN (``scalable_hbt.physics.PaperCNN``);
* ``mlp``: Flatten · Linear(924→4) · Tanh · Linear(4→2), 3,710 parameters.

Each problem carries the test points of the four methods: 5 points (deep LL, inside LL,
transition, inside CDW, deep CDW) for influence and RelatIF, the 50-point reference test
set for RUE, and the test set with 10 % of its points made out-of-distribution by
permuting their components (the paper's OOD experiment) for LEES.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from scalable_hbt import Objective, Toolbox
from scalable_hbt.apps.demo import train_classifier
from scalable_hbt.physics import PAPER_OOD_FRACTION, TIGHT_RECIPE, PaperCNN, evaluation_set, training_set

ADAM_EPOCHS = 40
"""Adam epochs of ``TIGHT_RECIPE`` before the L-BFGS polish, whatever the training set's size."""

PICK_V1 = (0.1, 0.5, 1.0, 3.0, 30.0)
"""V1 of the influence / RelatIF test points (nearest reference test points)."""


def physics_mlp() -> nn.Module:
    """Flatten · Linear(924→4) · Tanh · Linear(4→2): 924·4 + 4 + 4·2 + 2 = 3,710 parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(924, 4), nn.Tanh(), nn.Linear(4, 2))


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "paper_cnn": (PaperCNN, "the paper's 1D CNN (Conv1d×3, Linear 140→2), 740 parameters"),
    "mlp": (physics_mlp, "MLP Flatten·Linear(924→4)·Tanh·Linear(4→2), 3,710 parameters"),
}


@dataclass
class PhysicsProblem:
    """A trained float64 model, its objective, the test data of every method and the dense oracle.

    Shapes: ``picks`` (5, 1, 924) with labels (5,); ``test`` (50, 1, 924); ``ood_inputs``
    (50, 1, 924) with the boolean ``ood`` mask (50,).
    """

    name: str
    description: str
    objective: Objective
    picks: tuple[Tensor, Tensor]
    test: Tensor
    ood_inputs: Tensor
    ood: np.ndarray
    exact: Toolbox
    fit_seconds: float
    fit_hvps: int
    train_seconds: float

    @property
    def damping(self) -> float:
        """δ = max(−λ_min, 0) + 0.01 from the dense spectrum (the paper's rule)."""
        return self.exact.damping

    def info(self) -> dict[str, Any]:
        obj = self.objective
        return {"model": self.name, "description": self.description, "M": obj.num_params, "n": obj.n,
                "weight_decay": obj.weight_decay, "damping": self.damping, "dtype": "float64",
                "device": str(obj.device), "dense_fit_seconds": self.fit_seconds,
                "dense_fit_hvps": self.fit_hvps, "training_seconds": self.train_seconds,
                "n_test": len(self.test), "n_ood": int(self.ood.sum())}


def build_problem(name: str, n_per_phase: int, device: str, seed: int = 0) -> PhysicsProblem:
    """Generate the data, train ``MODELS[name]`` and fit the dense oracle (timed)."""
    make_model, description = MODELS[name]
    train = training_set(12, n_per_phase, progress=False)
    test = evaluation_set(12, progress=False)
    test_ood = evaluation_set(12, ood_fraction=PAPER_OOD_FRACTION, seed=seed, progress=False)
    t0 = time.perf_counter()
    trained = train_classifier(make_model, train, TIGHT_RECIPE, seed=seed, device=device, epochs=ADAM_EPOCHS,
                               progress=False)
    train_seconds = time.perf_counter() - t0
    obj = trained.build_objective(progress=False)
    Xt, yt = trained.tensors(test)
    Xo, _ = trained.tensors(test_ood)
    idx = [int(np.argmin(np.abs(test.v1 - v))) for v in PICK_V1]
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    t0 = time.perf_counter()
    exact.fit()
    fit_seconds = time.perf_counter() - t0
    fit_hvps = exact.operator.num_hvps  # other backends later share this operator and add to its count
    return PhysicsProblem(name, description, obj, (Xt[idx], yt[idx]), Xt, Xo, np.asarray(test_ood.ood, dtype=bool),
                          exact, fit_seconds, fit_hvps, train_seconds)
