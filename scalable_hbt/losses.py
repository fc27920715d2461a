"""Per-sample loss functions ``(outputs (B, ...), targets (B, ...)) -> losses (B,)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = −log softmax(f(x))_y for logits ``(B, C)`` and class indices ``(B,)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = mean_k (f_k(x) − y_k)², the mean over output components (torch's ``MSELoss``
    convention applied per sample)."""
    return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).mean(dim=1)


@dataclass(frozen=True)
class LossSpec:
    """A per-sample loss and what kind of targets it takes.

    ``classification`` losses take integer class targets in [0, C) and admit predicted labels
    (``argmax`` of the outputs); regression losses take float targets shaped like the outputs.
    ``ignore_index``: a target value the loss skips (contributing 0), when it has one by design;
    any other label outside [0, C) is an error.
    """

    name: str
    fn: LossFn
    classification: bool
    ignore_index: int | None = None


LOSSES: dict[str, "LossSpec"] = {
    "cross_entropy": LossSpec("cross_entropy", cross_entropy, True),
    "mse": LossSpec("mse", mse, False),
}


def resolve_loss(loss: str | LossFn, classification: bool | None = None) -> LossSpec:
    """Turn a loss name or callable into a :class:`LossSpec`.

    A callable must return per-sample losses of shape ``(B,)``; it is treated as a
    classification loss (targets are class indices, predicted labels are ``argmax``)
    unless ``classification=False``.
    """
    if isinstance(loss, str):
        key = loss.lower().replace("-", "_")
        aliases = {"ce": "cross_entropy", "crossentropy": "cross_entropy", "nll": "cross_entropy",
                   "mean_squared_error": "mse", "l2": "mse"}
        key = aliases.get(key, key)
        if key not in LOSSES:
            raise InputError(
                f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable "
                "(outputs, targets) -> per-sample losses of shape (B,)."
            )
        return LOSSES[key]
    if callable(loss):
        name = getattr(loss, "__name__", type(loss).__name__)
        return LossSpec(name, loss, True if classification is None else classification)
    raise InputError(f"loss must be a name or a callable, got {type(loss).__name__}.")


def predicted_targets(outputs: Tensor) -> Tensor:
    """The model's own labels, ``argmax_k f_k(x)``, shape ``(B,)``."""
    if outputs.ndim != 2:
        raise InputError(
            f"labels='predicted' needs class scores of shape (B, C); the model returned {tuple(outputs.shape)}. "
            "Pass true targets with labels='true' instead."
        )
    return outputs.argmax(dim=1)


def check_per_sample(losses: Tensor, batch: int, name: str) -> None:
    """Raise unless a loss returned one finite-shaped value per sample."""
    if losses.shape != torch.Size([batch]):
        raise InputError(
            f"loss {name!r} must return per-sample losses of shape ({batch},); it returned "
            f"{tuple(losses.shape)}. Use reduction='none' (and reduce over non-batch dimensions)."
        )
