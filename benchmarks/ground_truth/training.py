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

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


def objective_value(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float, count: int | None = None) -> Tensor:
    """Σ_i CE(f(x_i), y_i) / count + (wd/2)·Σ‖θ‖² over the trainable parameters; ``count``
    defaults to len(y) (the mean). A mini-batch step divides by the nominal batch size instead,
    so that removing a point from its batch removes its term and nothing else."""
    reg = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
    ce = nn.functional.cross_entropy(model(X), y, reduction="sum")
    return ce / (len(y) if count is None else count) + 0.5 * weight_decay * reg


def content_batches(X: Tensor, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """One epoch's mini-batches, each point placed by its content: index tensors into ``X``.

    Point i goes to batch h(x_i) mod N_b, N_b = ⌈len(X)/batch_size⌉, h a BLAKE2b hash of the
    bytes of x_i keyed by (seed, epoch); the batches are visited in an order seeded the same way,
    empty ones left out. A retrain on all points but one therefore sees the very batches of the
    full run, less that point (N_b is unchanged unless len(X) crosses a multiple of
    ``batch_size``), and the copies of a point in a bootstrap resample share its batch: the
    retrains differ by their data, not by a reshuffle. Batch sizes are binomial around
    len(X)/N_b. Cost: one hash of every input per epoch.
    """
    count = -(-len(X) // batch_size)
    key = f"{seed}:{epoch}".encode()
    rows = X.detach().cpu().contiguous().reshape(len(X), -1).numpy()
    slot = np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), key=key, digest_size=8).digest(), "little")
                     % count for row in rows], dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return [torch.from_numpy(index) for index in (np.flatnonzero(slot == b) for b in order) if len(index)]


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
