"""Shared fixtures: tiny float64 models, and brute-force references that are independent of
the library.

The references below never call the library's loss, forward, flattening or regulariser
(``Objective.loss``, ``Objective.forward``, ``Objective.unflatten``/``flatten``,
``Objective.regulariser``, ``Objective.theta``): they take the raw ``nn.Module`` (the
Objective's own deep copy, ``obj.model``, which holds θ̃), flatten its trainable
``named_parameters()`` themselves, evaluate it with ``torch.func.functional_call``, write
the losses and the regulariser (wd/2)‖θ‖² out, and differentiate with
``torch.autograd``. The training tensors are the ones the test built (recorded by
``make_problem``), not what the Objective's data source hands back.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

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


# The training tensors each make_problem objective was built from (what the brute force reads).
_RAW_DATA: "weakref.WeakKeyDictionary[Objective, tuple[Tensor, Tensor]]" = weakref.WeakKeyDictionary()


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
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=weight_decay, batch_size=batch_size,
                    device=device, dtype=torch.float64, progress=False)
    _RAW_DATA[obj] = (X, y)
    return obj


def register_data(obj: Objective, X: Tensor, y: Tensor) -> Objective:
    """Record the tensors ``obj`` was built from, for the brute-force references."""
    _RAW_DATA[obj] = (X, y)
    return obj


# --------------------------------------------------------------------------- independent pieces
def ref_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """−log softmax(out)_y written out, per sample: logsumexp(out) − out_y."""
    return torch.logsumexp(out, dim=1) - out.gather(1, y.long().unsqueeze(1)).squeeze(1)


def ref_mse(out: Tensor, y: Tensor) -> Tensor:
    """mean over output components of (out − y)², per sample."""
    return (out - y).square().reshape(out.shape[0], -1).mean(dim=1)


REF_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": ref_cross_entropy, "mse": ref_mse}


def ref_loss(obj: Objective) -> Callable[[Tensor, Tensor], Tensor]:
    """Our own per-sample loss for the loss ``obj`` was built with (by name only)."""
    if obj.loss.name not in REF_LOSSES:
        raise NotImplementedError(f"no independent reference for the loss {obj.loss.name!r}")
    return REF_LOSSES[obj.loss.name]


class Flat:
    """Our own flat view of a module's trainable parameters, in ``named_parameters()`` order."""

    def __init__(self, model: nn.Module) -> None:
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.model = model
        self.names = [k for k, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()

    @property
    def M(self) -> int:
        return self.theta.numel()

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        return {k: theta[o:o + s].reshape(shape)
                for k, o, s, shape in zip(self.names, self.offsets, self.sizes, self.shapes)}

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def outputs(self, theta: Tensor, X: Tensor) -> Tensor:
        return functional_call(self.model, self.split(theta), (X,))


def _inputs(flat: Flat, X: Tensor) -> Tensor:
    X = X.to(flat.theta.device)
    return X.to(flat.theta.dtype) if X.is_floating_point() else X


def training_tensors(obj: Objective) -> tuple[Tensor, Tensor]:
    """The training tensors ``obj`` was built from (make_problem / register_data); otherwise
    the raw tensors its data source was constructed with."""
    if obj in _RAW_DATA:
        return _RAW_DATA[obj]
    if obj.train._X is not None and obj.train._y is not None:
        return obj.train._X, obj.train._y
    raise NotImplementedError("register the objective's training tensors with register_data")


def brute_force_outputs(obj: Objective, X: Tensor) -> Tensor:
    """f(x; θ̃) by functional_call on the module, shape (T, K)."""
    flat = Flat(obj.model)
    with torch.no_grad():
        return flat.outputs(flat.theta, _inputs(flat, X))


def brute_force_hessian(obj: Objective, data: tuple[Tensor, Tensor] | None = None,
                        model: nn.Module | None = None) -> Tensor:
    """∇²L(θ̃), L(θ) = (1/n) Σ_i loss(f(x_i; θ), y_i) + (wd/2)‖θ‖², by
    torch.autograd.functional.hessian on our own flattening (reverse-over-reverse), of
    ``model`` (default: the Objective's module) on ``data`` (default: its training tensors)."""
    flat, loss = Flat(obj.model if model is None else model), ref_loss(obj)
    X, y = training_tensors(obj) if data is None else data
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    if y.is_floating_point():
        y = y.to(flat.theta.dtype)
    wd = obj.weight_decay

    def L(theta: Tensor) -> Tensor:
        return loss(flat.outputs(theta, X), y).sum() / len(X) + 0.5 * wd * theta.square().sum()

    return torch.autograd.functional.hessian(L, flat.theta)


def brute_force_gradients(obj: Objective, X: Tensor, y: Tensor, objective_term: bool = True) -> Tensor:
    """Per-sample gradients ∇_θ [loss(f(x; θ̃), y) (+ (wd/2)‖θ̃‖²)], one sample at a time with
    torch.autograd.grad on our own flattening; shape (T, M)."""
    flat, loss = Flat(obj.model), ref_loss(obj)
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    if y.is_floating_point():
        y = y.to(flat.theta.dtype)
    rows = []
    for xi, yi in zip(X, y):
        theta = flat.theta.clone().requires_grad_(True)
        value = loss(flat.outputs(theta, xi[None]), yi[None]).sum()
        if objective_term:
            value = value + 0.5 * obj.weight_decay * theta.square().sum()
        rows.append(torch.autograd.grad(value, theta)[0])
    return torch.stack(rows)


def brute_force_losses(obj: Objective, X: Tensor, y: Tensor, theta: Tensor | None = None,
                       objective_term: bool = True) -> Tensor:
    """Per-sample ℓ(z, θ) (θ = θ̃ by default, in our own flat order), shape (T,)."""
    flat, loss = Flat(obj.model), ref_loss(obj)
    theta = flat.theta if theta is None else theta
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    with torch.no_grad():
        out = loss(flat.outputs(theta, X), y)
        return out + 0.5 * obj.weight_decay * theta.square().sum() if objective_term else out


def output_hessian(obj: Objective, out: Tensor, y: Tensor) -> Tensor:
    """Λ = ∇²_f loss(f, y) of one sample (out (K,), y scalar), by torch.func.hessian of our loss."""
    loss = ref_loss(obj)
    return torch.func.hessian(lambda o: loss(o.view(1, -1), y.view(1, *y.shape))[0])(out)


def brute_force_ggn(obj: Objective, data: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(1/n) Σ_i J_iᵀ Λ_i J_i + wd·I with J_i = ∂f(x_i)/∂θ (torch.func.jacrev on our flattening)
    and Λ_i the Hessian of our loss in the output."""
    flat = Flat(obj.model)
    X, y = training_tensors(obj) if data is None else data
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    if y.is_floating_point():
        y = y.to(flat.theta.dtype)
    ggn = torch.zeros(flat.M, flat.M, dtype=flat.theta.dtype, device=flat.theta.device)
    for xi, yi in zip(X, y):
        f = lambda th: flat.outputs(th, xi[None])[0].reshape(-1)  # noqa: E731
        J = torch.func.jacrev(f)(flat.theta)                          # (K, M)
        Lam = output_hessian(obj, f(flat.theta).detach(), yi)
        ggn += J.T @ Lam @ J
    return ggn / len(X) + obj.weight_decay * torch.eye(flat.M, dtype=ggn.dtype, device=ggn.device)


@pytest.fixture(params=["mlp", "cnn"])
def problem(request) -> Objective:
    return make_problem(request.param)
