"""The seeded training routine every ground-truth workload uses for its model and its retrains.

Two phases on the objective L(θ) = (1/n) Σ_i CE(f(x_i; θ), y_i) + (wd/2)‖θ‖² (the one the
``Objective`` of the workload analyses): ``epochs`` epochs of Adam on shuffled mini-batches
(model in train mode), then full-batch L-BFGS with strong-Wolfe line search in eval mode until
max |∂L/∂θ| ≤ ``grad_tol`` or ``lbfgs_iterations`` are spent. A warm start (RUE's assumption:
the resampled optimum is the one nearest θ̃) is the second phase alone from θ̃.

Inputs may be floating point or integer (token ids); labels are class indices. The global
torch RNG state is restored afterwards; the same seed, data and model give the same result.
Cost: epochs · n/b mini-batch steps + ≤ 2·lbfgs_iterations full-data gradients (line search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def objective_value(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    """Mean cross-entropy + (wd/2)·Σ‖θ‖² over the trainable parameters."""
    reg = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
    return nn.functional.cross_entropy(model(X), y) + 0.5 * weight_decay * reg


@dataclass(frozen=True)
class Recipe:
    """Adam for ``epochs`` epochs of mini-batches of ``batch_size`` at ``lr``, then L-BFGS.

    Calling the recipe is a ``Trainer``: ``recipe(model, X, y, seed) -> model`` (trained in
    place, returned in eval mode). ``recipe.warm`` is the same recipe without the Adam phase.
    """

    weight_decay: float
    epochs: int
    lr: float = 1e-2
    batch_size: int = 64
    lbfgs_iterations: int = 200
    grad_tol: float = 1e-7

    @property
    def warm(self) -> Recipe:
        """The L-BFGS phase alone: training continued from the model's current parameters."""
        return Recipe(self.weight_decay, 0, self.lr, self.batch_size, self.lbfgs_iterations, self.grad_tol)

    def __call__(self, model: nn.Module, X: Tensor, y: Tensor, seed: int) -> nn.Module:
        if len(X) != len(y) or len(y) == 0:
            raise ValueError(f"training needs one label per input and at least one point; got {len(X)} inputs "
                             f"and {len(y)} labels.")
        params = [p for p in model.parameters() if p.requires_grad]
        n = len(y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            order_rng = torch.Generator().manual_seed(seed)
            if self.epochs > 0:
                model.train()
                adam = torch.optim.Adam(params, lr=self.lr)
                for _ in range(self.epochs):
                    order = torch.randperm(n, generator=order_rng)
                    for start in range(0, n, self.batch_size):
                        index = order[start:start + self.batch_size]
                        adam.zero_grad()
                        objective_value(model, X[index], y[index], self.weight_decay).backward()
                        adam.step()
            model.eval()
            if self.lbfgs_iterations > 0:
                lbfgs = torch.optim.LBFGS(params, lr=1.0, max_iter=self.lbfgs_iterations, history_size=50,
                                          tolerance_grad=self.grad_tol, tolerance_change=1e-15,
                                          line_search_fn="strong_wolfe")

                def closure() -> Tensor:
                    lbfgs.zero_grad()
                    value = objective_value(model, X, y, self.weight_decay)
                    value.backward()
                    return value

                lbfgs.step(closure)
        model.zero_grad(set_to_none=True)
        return model.eval()
