"""The demo's trained classifiers: a model trained in float64 with the paper's weight decay,
its data in model-ready form, and the objective the toolbox analyses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ... import Objective
from ...physics import MinMaxScaler, PhaseDataset, TrainingRecipe, paper_weight_decay
from .config import DemoConfig, Network

DTYPE = torch.float64

SATURATED_LOSS = 1e-6
"""A training point is *saturated* when its cross-entropy is below this (its gradient ~ loss)."""

OBJECTIVE_BATCH_SIZE = 250
"""Training points per chunk of the toolbox's passes over the training data."""


@dataclass
class TrainedModel:
    """A trained classifier with its data in model-ready form.

    Attributes:
        model: the trained network (eval mode).
        scaler: the training set's min-max scaling, applied to every test set.
        X, y: the scaled training inputs and their labels.
        weight_decay: wd of the training objective, the paper's 0.05 / n.
        final_training_loss: the training objective's final value, mean CE + (wd/2)‖θ‖².
        grad_norm: ‖∇‖ of that objective at the trained parameters.
    """

    model: nn.Module
    scaler: MinMaxScaler
    X: torch.Tensor
    y: torch.Tensor
    weight_decay: float
    final_training_loss: float
    grad_norm: float

    def build_objective(self, progress: bool = True) -> Objective:
        """The paper's objective (mean CE + wd/2 ‖θ‖²) on the training data, on the model's device."""
        return Objective(self.model, "cross_entropy", (self.X, self.y), weight_decay=self.weight_decay,
                         batch_size=OBJECTIVE_BATCH_SIZE, device=self.device, dtype=DTYPE, progress=progress)

    def tensors(self, data: PhaseDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Test data scaled with the training set's min and max."""
        return data.tensors(self.scaler, DTYPE)

    def predict(self, data: PhaseDataset) -> np.ndarray:
        """Predicted labels (argmax of the logits) of ``data``, shape (N,)."""
        X, _ = self.tensors(data)
        with torch.no_grad():
            return self.model(X.to(self.device)).argmax(1).cpu().numpy()

    def accuracy(self, data: PhaseDataset) -> float:
        """Fraction of ``data`` classified correctly."""
        return float((self.predict(data) == data.labels).mean())

    def misclassified(self, data: PhaseDataset) -> np.ndarray:
        """V1 of the misclassified points of ``data``."""
        return data.v1[self.predict(data) != data.labels]

    def saturated_fraction(self, tol: float = SATURATED_LOSS) -> float:
        """Fraction of training points whose cross-entropy is below ``tol`` (saturated)."""
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(self.model(self.X.to(self.device)), self.y.to(self.device),
                                                       reduction="none")
        return (losses < tol).double().mean().item()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def train_classifier(make_model: Callable[[], nn.Module], train: PhaseDataset, recipe: TrainingRecipe, *,
                     seed: int, device: str = "cpu", epochs: int | None = None,
                     progress: bool = True) -> TrainedModel:
    """Build a model (initialised with ``seed``) and train it in float64 on ``train`` with
    ``recipe`` (``epochs`` overrides its epoch count) and the paper's wd = 0.05 / n."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    scaler = MinMaxScaler.fit(train.amplitudes)
    X, y = train.tensors(scaler, DTYPE)
    wd = paper_weight_decay(len(X))
    result = recipe.train(model.to(DTYPE).to(device), X, y, weight_decay=wd, seed=seed, epochs=epochs,
                          progress=progress)
    return TrainedModel(result.model, scaler, X, y, wd, result.objective, result.grad_norm)


def train_network(make_model: Callable[[], nn.Module], network: Network, train: PhaseDataset,
                  cfg: DemoConfig) -> TrainedModel:
    """``train_classifier`` with the configuration's recipe for ``network``, seed and device."""
    return train_classifier(make_model, train, cfg.recipe(network), seed=cfg.seed, device=cfg.device,
                            epochs=cfg.epochs, progress=cfg.progress)
