"""Shared fixtures: tiny float64 models and brute-force references built with torch.autograd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from scalable_hbt import Objective

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module on one intra-op thread. Modules that train a network and then state
    measured properties of it use this: float64 reductions round differently with 1 and 2
    threads, a few hundred optimiser steps amplify that into a different trained model, and
    the measurements would then depend on the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def tiny_cnn() -> nn.Module:
    """Conv1d → MaxPool1d → ReLU → Conv1d → ReLU → Linear, on inputs of shape (1, 16)."""
    return nn.Sequential(
        nn.Conv1d(1, 3, kernel_size=5, padding=1), nn.MaxPool1d(2), nn.ReLU(),
        nn.Conv1d(3, 2, kernel_size=3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 5, 2),
    )


def make_problem(kind: str, n: int = 40, seed: int = 0, device: str = "cpu", weight_decay: float = 1e-2,
                 batch_size: int = 16) -> Objective:
    """A float64 objective on random data: ``kind`` is "mlp" (3 classes) or "cnn" (2 classes)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model, X = tiny_mlp(), torch.randn(n, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=gen)
    elif kind == "cnn":
        model, X = tiny_cnn(), torch.randn(n, 1, 16, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 2, (n,), generator=gen)
    else:
        raise ValueError(kind)
    return Objective(model, "cross_entropy", (X, y), weight_decay=weight_decay, batch_size=batch_size,
                     device=device, dtype=torch.float64, progress=False)


def brute_force_hessian(obj: Objective) -> torch.Tensor:
    """∇²L(θ̃) by torch.autograd.functional.hessian of the full-data objective."""
    X, y = obj.train.take(range(obj.n))
    X, y = X.to(obj.device), y.to(obj.device)

    def L(theta: torch.Tensor) -> torch.Tensor:
        return obj.loss_sum(theta, X, y) / obj.n + obj.regulariser(theta)

    return torch.autograd.functional.hessian(L, obj.theta)


def brute_force_gradients(obj: Objective, X: torch.Tensor, y: torch.Tensor, objective_term: bool = True) -> torch.Tensor:
    """Per-sample gradients one sample at a time with torch.autograd.grad, shape (T, M)."""
    rows = []
    for xi, yi in zip(X.to(obj.device), y.to(obj.device)):
        theta = obj.theta.detach().clone().requires_grad_(True)
        value = obj.loss_sum(theta, xi[None], yi[None])
        if objective_term:
            value = value + obj.regulariser(theta)
        rows.append(torch.autograd.grad(value, theta)[0])
    return torch.stack(rows)


@pytest.fixture(params=["mlp", "cnn"])
def problem(request) -> Objective:
    return make_problem(request.param)
