"""The task: what the model is trained on and what is measured at a test point.

A :class:`Task` says

* how the model's raw output becomes what the loss sees (a tensor as it is; a tuple → its
  first element; a dict or a Hugging Face ``ModelOutput`` → its ``logits``; or a key or a
  function given by the user);
* the **per-sample training loss** ℓ(z, θ) without the regulariser, a function
  ``(outputs (B, ...), targets (B, ...)) -> (B,)``; for sequences the sum over the tokens
  whose target is not the ignore index;
* the **measurement** f(z_t, θ) whose gradient every method uses for a test point: the loss by
  default, or any per-sample scalar the user defines (a logit margin, one token's
  log-probability, an observable predicted by the network);
* what kind of targets the loss takes, which decides how targets are checked and what
  ``labels="predicted"`` means (argmax over classes or tokens, the sign of a logit).

The one-word presets are Tasks: ``"cross_entropy"`` (classes), ``"mse"`` (real targets shaped
like the outputs; the mean over components), ``"bce"`` (binary targets in [0, 1] with logits;
the mean over components), ``"token_cross_entropy"`` (logits (B, T, V) against tokens (B, T),
summed over tokens, −100 ignored, as in Hugging Face ``transformers``) and ``"causal_lm"``
(the same with the shift of a causal language model: logits at t predict the token at t + 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

LossFn = Callable[[Tensor, Tensor], Tensor]
TargetKind = Literal["class", "binary", "real", "token"]
TARGET_KINDS = ("class", "binary", "real", "token")
IGNORE_INDEX = -100
"""The target value token losses skip (transformers' convention for padding and prompt tokens)."""


# ---------------------------------------------------------------------------------------------- losses
def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = −log softmax(f(x))_y for logits ``(B, C)`` and class indices ``(B,)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = mean_k (f_k(x) − y_k)², the mean over output components (torch's ``MSELoss``
    convention applied per sample)."""
    return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).mean(dim=1)


def bce(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = mean_k [−y_k log σ(f_k) − (1 − y_k) log(1 − σ(f_k))] for logits and targets in [0, 1]
    of the same shape."""
    per = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
    return per.reshape(outputs.shape[0], -1).mean(dim=1)


def token_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = Σ_t −log softmax(f_t(x))_{y_t} over the tokens with y_t ≠ −100, for logits
    ``(B, T, V)`` and tokens ``(B, T)``."""
    per = F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return per.sum(dim=1)


def causal_lm_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """:func:`token_cross_entropy` of the logits at positions 0..T−2 against the tokens at 1..T−1."""
    return token_cross_entropy(outputs[:, :-1], targets[:, 1:])


# ---------------------------------------------------------------------------------------------- outputs
def default_output(raw: Any) -> Tensor:
    """A tensor as it is; a tuple or list → its first element; a mapping (a dict, a Hugging Face
    ``ModelOutput``) → its ``"logits"``."""
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, Mapping):
        if "logits" not in raw:
            raise InputError(f"the model returns a mapping with keys {list(raw.keys())} and no 'logits'; pass "
                             "Task(output=<key>) or Task(output=<function of the model output>).")
        return raw["logits"]
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
        return raw[0]
    raise InputError(f"the model returns a {type(raw).__name__}; pass Task(output=<function returning a tensor>).")


# ---------------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class Task:
    """What is trained and what is measured (see the module docstring).

    Attributes
    ----------
    loss:
        ``(outputs, targets) -> (B,)``: the per-sample training loss without the regulariser.
    targets:
        "class" (integer classes, outputs (B, C)), "token" (integer tokens, outputs (B, T, V)),
        "binary" (values in [0, 1] shaped like the outputs) or "real" (shaped like the outputs).
    name:
        Used in messages, reports and fingerprints.
    measurement:
        ``(outputs, targets) -> (B,)``: the quantity whose gradient the methods use at a test
        point; ``None`` means the loss.
    output:
        How the raw model output becomes ``outputs``: ``None`` (see :func:`default_output`), a
        key of a mapping output, or a function.
    target_key:
        The key holding the targets in dict batches (the rest are the model's keyword arguments).
    ignore_index:
        A target value the loss skips by design (tokens: −100); other values outside [0, C) are errors.
    shift:
        For token targets: the outputs at position t − shift predict the target at t (a causal
        language model: 1). Targets at positions whose ``attention_mask`` is 0 are ignored, and
        so are targets whose predicting position is masked (the first real token after left
        padding), so that padding never changes the loss.
    """

    loss: LossFn
    targets: TargetKind = "class"
    name: str = "custom"
    measurement: LossFn | None = None
    output: str | Callable[[Any], Tensor] | None = None
    target_key: str = "labels"
    ignore_index: int | None = None
    shift: int = 0

    def __post_init__(self) -> None:
        if not callable(self.loss):
            raise InputError(f"Task.loss must be a function (outputs, targets) -> (B,); got {self.loss!r}.")
        if self.targets not in TARGET_KINDS:
            raise InputError(f"Task.targets = {self.targets!r}: expected one of {list(TARGET_KINDS)}.")
        if self.measurement is not None and not callable(self.measurement):
            raise InputError(f"Task.measurement must be a function (outputs, targets) -> (B,); got {self.measurement!r}.")

    @property
    def classification(self) -> bool:
        """Whether targets are integer classes or tokens (they admit predicted labels by argmax)."""
        return self.targets in ("class", "token")

    @property
    def fn(self) -> LossFn:
        return self.loss

    def outputs(self, raw: Any) -> Tensor:
        """The tensor the loss sees, from the model's raw output."""
        if self.output is None:
            return default_output(raw)
        if isinstance(self.output, str):
            try:
                return raw[self.output]
            except (KeyError, TypeError, IndexError) as err:
                raise InputError(f"Task.output = {self.output!r}, but the model output has no such entry ({err}).") \
                    from None
        return self.output(raw)

    def measure(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """f(z, θ) per sample: the measurement, or the loss when none is given."""
        return (self.measurement or self.loss)(outputs, targets)

    def predicted(self, outputs: Tensor) -> Tensor:
        """The model's own targets: argmax over classes or tokens, the sign of a binary logit."""
        if self.targets == "class":
            if outputs.ndim != 2:
                raise InputError(f"labels='predicted' needs class scores of shape (B, C); the model returned "
                                 f"{tuple(outputs.shape)}. Pass true targets with labels='true' instead.")
            return outputs.argmax(dim=1)
        if self.targets == "token":
            return outputs.argmax(dim=-1)
        if self.targets == "binary":
            return (outputs > 0).to(outputs.dtype)
        raise InputError(f"labels='predicted' needs a classification loss, but {self.name!r} is a regression "
                         "loss (the predicted target would make the loss zero). Use labels='true'.")


PRESETS: dict[str, Task] = {
    "cross_entropy": Task(cross_entropy, "class", "cross_entropy"),
    "mse": Task(mse, "real", "mse"),
    "bce": Task(bce, "binary", "bce"),
    "token_cross_entropy": Task(token_cross_entropy, "token", "token_cross_entropy", ignore_index=IGNORE_INDEX),
    "causal_lm": Task(causal_lm_cross_entropy, "token", "causal_lm", ignore_index=IGNORE_INDEX, shift=1),
}
_ALIASES = {"ce": "cross_entropy", "crossentropy": "cross_entropy", "nll": "cross_entropy",
            "mean_squared_error": "mse", "l2": "mse"}


def resolve_task(loss: str | LossFn | Task, classification: bool | None = None,
                 measurement: LossFn | None = None) -> Task:
    """A :class:`Task` from a preset name, a per-sample loss function (a classification loss unless
    ``classification=False``) or a Task; ``measurement`` replaces the Task's."""
    if isinstance(loss, Task):
        task = loss
    elif isinstance(loss, str):
        key = _ALIASES.get(loss.lower().replace("-", "_"), loss.lower().replace("-", "_"))
        if key not in PRESETS:
            raise InputError(f"unknown loss {loss!r}; use one of {sorted(PRESETS)}, a Task, or a callable "
                             "(outputs, targets) -> per-sample losses of shape (B,).")
        task = PRESETS[key]
    elif callable(loss):
        task = Task(loss, "class" if classification in (None, True) else "real",
                    getattr(loss, "__name__", type(loss).__name__))
    else:
        raise InputError(f"loss must be a name, a callable or a Task; got {type(loss).__name__}.")
    return task if measurement is None else replace(task, measurement=measurement)


def check_per_sample(values: Tensor, batch: int, what: str, name: str) -> None:
    """Raise unless a loss or a measurement (``what``) returned one value per sample."""
    if not isinstance(values, Tensor) or values.shape != torch.Size([batch]):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        plural = "losses" if what == "loss" else "values"
        raise InputError(
            f"{what} {name!r} must return per-sample {plural} of shape ({batch},); it returned {shape}. "
            "Use reduction='none' (and reduce over non-batch dimensions).")
