r"""The paper's phase-classification CNNs and a seeded training routine.

Both networks take min-max normalised ground states of shape (N, 1, dim) (one Conv1d
channel) and return two logits (0 = Luttinger liquid, 1 = CDW-I).

Training minimises the objective of `scalable_hbt` (DESIGN.md section 1), the per-sample
loss with the regulariser inside every term, averaged over the n training points:

.. math::

    L(\theta) = \frac{1}{n} \sum_i \mathrm{CE}(f(x_i; \theta), y_i)
                + \frac{\mathrm{wd}}{2} \lVert \theta \rVert^2 ,
    \qquad \mathrm{wd} = \lambda / n, \ \lambda = 0.05 \ \text{(the paper's choice)} .
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "PaperCNN",
    "SizeInvariantCNN",
    "count_parameters",
    "paper_weight_decay",
    "Optimizer",
    "Schedule",
    "TrainingResult",
    "train_model",
    "TrainingRecipe",
    "PAPER_CNN_RECIPE",
    "GAP_CNN_RECIPE",
    "TIGHT_RECIPE",
]

Optimizer = Literal["adam", "sgd"]
"""First-phase optimiser of `train_model`: Adam, or SGD with (heavy-ball) momentum."""

Schedule = Literal["constant", "cosine", "step"]
"""Learning-rate schedule of `train_model`'s first phase, stepped once per epoch e of E:
"constant" lr; "cosine" lr * (1 + cos(pi e / E)) / 2; "step" lr, then lr/10 from e = E/2 and
lr/100 from e = 3E/4."""


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars, sum of p.numel() over parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def paper_weight_decay(n: int, lam: float = 0.05) -> float:
    """The paper's weight decay wd = lam / n for n training points (lam = 0.05)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of training points, got {n!r}.")
    if not lam >= 0:
        raise ValueError(f"lam must be a non-negative regularisation strength, got {lam!r}.")
    return lam / n


class PaperCNN(nn.Module):
    """The CNN of the paper's figure 7(a) for 12-site states (input length 924).

    Layers and the length of a 924-long input after each stage:

    ====================================  ==========  ==========
    layer                                 output      parameters
    ====================================  ==========  ==========
    Conv1d(1 -> 5, k=15, padding=1)       5 x 912     5*1*15 + 5 = 80
    MaxPool1d(4), ReLU                    5 x 228
    Conv1d(5 -> 8, k=5)                   8 x 224     8*5*5 + 8 = 208
    MaxPool1d(4), ReLU                    8 x 56
    Conv1d(8 -> 10, k=2, padding=1)       10 x 57     10*8*2 + 10 = 170
    AvgPool1d(4), ReLU                    10 x 14
    flatten, Dropout(p)                   140
    Linear(140 -> 2)                      2           140*2 + 2 = 282
    ====================================  ==========  ==========

    740 trainable parameters in total, as in the paper's published model (its Appendix B
    text quotes 720). Only inputs of length 924 (or others that flatten to 140) work.
    """

    input_length = 924

    def __init__(self, dropout: float = 0.5, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 5, kernel_size=15, padding=1),
            nn.MaxPool1d(4),
            nn.ReLU(),
            nn.Conv1d(5, 8, kernel_size=5),
            nn.MaxPool1d(4),
            nn.ReLU(),
            nn.Conv1d(8, 10, kernel_size=2, padding=1),
            nn.AvgPool1d(4),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(140, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 924) -> logits (N, num_classes)."""
        features = self.features(x).flatten(1)
        if features.shape[1] != self.classifier.in_features:
            raise ValueError(
                f"PaperCNN needs inputs of shape (N, 1, {self.input_length}) (12-site states), "
                f"got {tuple(x.shape)}; use SizeInvariantCNN for other lengths."
            )
        return self.classifier(self.dropout(features))


class SizeInvariantCNN(nn.Module):
    """A CNN with global average pooling (GAP) that accepts any input length >= 60.

    Same role as the paper's figure 7(b) network (1675 parameters, trained on 12- and
    14-site states); the paper gives its layer sizes only in the figure, so this is our
    design with exactly the same parameter count. Lengths for inputs of 924 (L = 12) and
    3432 (L = 14):

    ====================================  ===========  ===========  ====================
    layer                                 924 input    3432 input   parameters
    ====================================  ===========  ===========  ====================
    Conv1d(1 -> 8, k=15, padding=1)       8 x 912      8 x 3420     8*1*15 + 8 = 128
    MaxPool1d(4), ReLU                    8 x 228      8 x 855
    Conv1d(8 -> 10, k=5)                  10 x 224     10 x 851     10*8*5 + 10 = 410
    MaxPool1d(4), ReLU                    10 x 56      10 x 212
    Conv1d(10 -> 10, k=3, padding=1)      10 x 56      10 x 212     10*10*3 + 10 = 310
    MaxPool1d(2), ReLU                    10 x 28      10 x 106
    Conv1d(10 -> 25, k=3, padding=1)      25 x 28      25 x 106     25*10*3 + 25 = 775
    ReLU, global average pool             25           25
    Dropout(p), Linear(25 -> 2)           2            2            25*2 + 2 = 52
    ====================================  ===========  ===========  ====================

    1675 trainable parameters, independent of the input length.
    """

    min_input_length = 60

    def __init__(self, dropout: float = 0.5, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, kernel_size=15, padding=1),
            nn.MaxPool1d(4),
            nn.ReLU(),
            nn.Conv1d(8, 10, kernel_size=5),
            nn.MaxPool1d(4),
            nn.ReLU(),
            nn.Conv1d(10, 10, kernel_size=3, padding=1),
            nn.MaxPool1d(2),
            nn.ReLU(),
            nn.Conv1d(10, 25, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(25, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, length) -> logits (N, num_classes), any length >= 60."""
        if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] < self.min_input_length:
            raise ValueError(
                f"SizeInvariantCNN needs inputs of shape (N, 1, length) with length >= "
                f"{self.min_input_length}, got {tuple(x.shape)}."
            )
        return self.classifier(self.dropout(self.features(x).flatten(1)))


@dataclass
class TrainingResult:
    """What `train_model` returns.

    Attributes:
        model: the trained model, in eval mode.
        objective: final full-batch objective, mean CE + (wd/2)||theta||^2, eval mode.
        grad_norm: 2-norm of the gradient of that objective at the final parameters.
        lbfgs_iterations: L-BFGS iterations used (0 without the polish).
        history: objective after every first-phase epoch (train mode, last mini-batch) and
            after every block of L-BFGS iterations (eval mode).
    """

    model: nn.Module
    objective: float
    grad_norm: float
    lbfgs_iterations: int
    history: list[float] = field(default_factory=list)


def _objective(model: nn.Module, params: list[nn.Parameter], X: torch.Tensor, y: torch.Tensor,
               weight_decay: float) -> torch.Tensor:
    penalty = sum((p * p).sum() for p in params)
    return F.cross_entropy(model(X), y) + 0.5 * weight_decay * penalty


def _scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, epochs: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule named by `schedule` (see `Schedule`)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[epochs // 2, (3 * epochs) // 4], gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_model(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    weight_decay: float,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int | None = None,
    optimizer: Optimizer = "adam",
    momentum: float = 0.9,
    schedule: Schedule = "constant",
    lbfgs_iterations: int = 500,
    grad_tol: float = 1e-9,
    progress: bool = True,
) -> TrainingResult:
    r"""Train `model` on mean CE + (wd/2)||theta||^2, reproducibly, in one of two regimes.

    Two phases, in the model's dtype (float32 or float64):

    1. `epochs` epochs of `optimizer` -- Adam, or SGD with heavy-ball momentum `momentum`
       (v <- momentum v + g, theta <- theta - lr_e v) -- at learning rate lr_e given by
       `schedule` (see `Schedule`), on mini-batches of `batch_size` (None: full batch)
       shuffled by a generator seeded with `seed`, model in train mode (dropout on, as in
       the paper's training);
    2. full-batch L-BFGS with strong-Wolfe line search, model in eval mode (dropout off,
       the objective the Hessian toolbox analyses), until the largest gradient component
       is <= `grad_tol`, L-BFGS stalls, or `lbfgs_iterations` are used.

    The two regimes: Adam + the L-BFGS polish ends at a tight minimum where most training
    points are saturated (loss ~ e^-20) and the Hessian is nearly positive semi-definite.
    SGD with momentum and a decreasing learning rate for a fixed epoch budget and
    `lbfgs_iterations=0` (no polish) ends where SGD stopped, as the paper's published
    model: not saturated, an indefinite Hessian (use ``damping="auto"``).

    The same seed, data and initial model give the same result on CPU; the global torch
    RNG state is restored afterwards. The model is modified in place.

    Args:
        model: the network; its parameters are trained in place.
        X: inputs, shape (n, ...) accepted by `model`; converted to the model's dtype.
        y: class labels, shape (n,), integer.
        weight_decay: wd >= 0 (the paper: `paper_weight_decay(n)` = 0.05 / n).
        epochs: first-phase epochs (>= 0).
        lr: first-phase (initial) learning rate (> 0).
        seed: seeds mini-batch shuffling and dropout.
        batch_size: first-phase mini-batch size; None for full batch.
        optimizer: "adam" or "sgd" (with momentum).
        momentum: SGD momentum in [0, 1); ignored by Adam.
        schedule: learning-rate schedule of the first phase, "constant", "cosine" or "step".
        lbfgs_iterations: maximum L-BFGS iterations (>= 0); 0 skips the polish.
        grad_tol: L-BFGS stops when max |dL/dtheta| <= grad_tol.
        progress: show tqdm progress bars.

    Returns:
        TrainingResult with the model in eval mode, final objective and gradient norm.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True) to train.")
    dtype, device = params[0].dtype, params[0].device
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point:
        raise ValueError("y must be a 1D integer tensor of class labels, shape (n,).")
    if not isinstance(X, torch.Tensor) or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(
            f"X must be a tensor with one row per label: got X of shape "
            f"{tuple(getattr(X, 'shape', ()))} for {y.shape[0]} labels."
        )
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values; clean the data before training.")
    if not (weight_decay >= 0 and weight_decay != float("inf")):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}.")
    if epochs < 0 or lbfgs_iterations < 0:
        raise ValueError(
            f"epochs and lbfgs_iterations must be >= 0, got {epochs} and {lbfgs_iterations}."
        )
    if epochs > 0 and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    if optimizer == "sgd" and not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1) for SGD, got {momentum!r}.")
    if schedule not in ("constant", "cosine", "step"):
        raise ValueError(f"schedule must be 'constant', 'cosine' or 'step', got {schedule!r}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (full batch), got {batch_size}.")

    X = X.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=torch.long)
    n = X.shape[0]
    batch = n if batch_size is None else min(batch_size, n)
    history: list[float] = []

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shuffler = torch.Generator(device="cpu").manual_seed(seed)

        if epochs > 0:
            model.train()
            first = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
                     else torch.optim.SGD(params, lr=lr, momentum=momentum))
            scheduler = _scheduler(first, schedule, epochs)
            for _ in tqdm(range(epochs), desc=optimizer, disable=not progress, leave=False):
                order = torch.randperm(n, generator=shuffler).to(device)
                for start in range(0, n, batch):
                    index = order[start:start + batch]
                    first.zero_grad()
                    loss = _objective(model, params, X[index], y[index], weight_decay)
                    loss.backward()
                    first.step()
                scheduler.step()
                history.append(loss.item())

        model.eval()
        lbfgs_used = 0
        if lbfgs_iterations > 0:
            block = 20

            def fresh_lbfgs() -> torch.optim.LBFGS:
                return torch.optim.LBFGS(params, lr=1.0, max_iter=block, history_size=50,
                                         tolerance_grad=grad_tol,
                                         tolerance_change=float(torch.finfo(dtype).eps),
                                         line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                lbfgs.zero_grad()
                value = _objective(model, params, X, y, weight_decay)
                value.backward()
                return value

            lbfgs = fresh_lbfgs()
            best = closure().item()
            used_before_restart = 0
            just_restarted = False
            bar = tqdm(total=lbfgs_iterations, desc="L-BFGS", disable=not progress, leave=False)
            while lbfgs_used < lbfgs_iterations:
                lbfgs.param_groups[0]["max_iter"] = min(block, lbfgs_iterations - lbfgs_used)
                lbfgs.step(closure)
                done = used_before_restart + lbfgs.state[params[0]].get("n_iter", 0)
                bar.update(done - lbfgs_used)
                lbfgs_used = done
                current = closure().item()
                history.append(current)
                if max(p.grad.abs().max().item() for p in params) <= grad_tol:
                    break
                if current < best:
                    best, just_restarted = current, False
                    continue
                # No decrease over a whole block: the line search stalled, typically at a
                # ReLU / max-pool kink. Restart the quasi-Newton memory; a stall right
                # after a restart ends the phase.
                if just_restarted:
                    break
                used_before_restart = lbfgs_used
                lbfgs = fresh_lbfgs()
                just_restarted = True
            bar.close()

    model.zero_grad(set_to_none=True)
    value = _objective(model, params, X, y, weight_decay)
    grads = torch.autograd.grad(value, params)
    grad_norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
    return TrainingResult(model=model, objective=value.item(), grad_norm=grad_norm,
                          lbfgs_iterations=lbfgs_used, history=history)


_TRAIN_MODEL_PARAMETERS = inspect.signature(train_model).parameters


def _train_model_default(name: str) -> Any:
    """The default of `train_model`'s argument `name`: a recipe takes its defaults from there."""
    return _TRAIN_MODEL_PARAMETERS[name].default


@dataclass(frozen=True)
class TrainingRecipe:
    """A named `train_model` configuration whose first-phase budget is counted in mini-batch
    steps; `train` is a thin front of `train_model`, and every default is `train_model`'s.

    The number of epochs for n training points is ceil(steps * batch_size / n), so a recipe
    takes about the same number of mini-batch steps on the quick (200-point) and the full
    (1000-point) training sets.

    Attributes:
        optimizer, lr, batch_size, momentum, schedule, lbfgs_iterations: as in `train_model`.
        steps: mini-batch steps of the first phase.
    """

    optimizer: Optimizer
    lr: float
    steps: int
    batch_size: int | None = _train_model_default("batch_size")
    momentum: float = _train_model_default("momentum")
    schedule: Schedule = _train_model_default("schedule")
    lbfgs_iterations: int = _train_model_default("lbfgs_iterations")

    def epochs(self, n: int) -> int:
        """First-phase epochs for n training points: ceil(steps * batch_size / n)."""
        if n < 1:
            raise ValueError(f"n must be a positive number of training points, got {n!r}.")
        batch = n if self.batch_size is None else min(self.batch_size, n)
        return -(-self.steps * batch // n)

    def train(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
              seed: int, epochs: int | None = None,
              progress: bool = _train_model_default("progress")) -> TrainingResult:
        """`train_model` with this recipe; `epochs` overrides `self.epochs(len(X))`."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "steps"}
        return train_model(model, X, y, weight_decay=weight_decay, seed=seed, progress=progress,
                           epochs=self.epochs(len(X)) if epochs is None else epochs, **settings)


PAPER_CNN_RECIPE = TrainingRecipe(optimizer="sgd", lr=1e-2, momentum=0.9, schedule="step",
                                  steps=2000, batch_size=50, lbfgs_iterations=0)
"""`PaperCNN` in the paper's regime: SGD with momentum 0.9, lr 1e-2 divided by 10 at half and
again at three quarters of 2000 mini-batch steps of 50 (100 epochs of 1000 points), dropout
on, no L-BFGS polish. On the paper's 1000 L = 12 training points it ends, like the published
model, unsaturated, misclassifying the first CDW-I test points, with an indefinite Hessian;
with half the steps some seeds stay on the initial ln 2 plateau (examples/README.md, training
regimes, has the numbers)."""

GAP_CNN_RECIPE = TrainingRecipe(optimizer="adam", lr=3e-3, schedule="step", steps=400,
                                batch_size=50, lbfgs_iterations=0)
"""`SizeInvariantCNN` in the same stopped regime, the same recipe for L = 12 and L = 14 (the
paper trains "two copies"): Adam at 3e-3 with the step schedule for 400 steps of 50 (100
epochs of 200 points), dropout on, no polish. The global average pool makes the initial
gradients so small that SGD stays on the ln 2 plateau; Adam at 1e-2 collapses to a constant
output; Adam at 1e-3 trains at L = 12 but leaves L = 14 on the plateau; 3e-3 trains both
(examples/README.md, training regimes)."""

TIGHT_RECIPE = TrainingRecipe(optimizer="adam", lr=1e-2, steps=1200, batch_size=50)
"""The tight-minimum regime: Adam at 1e-2, then `train_model`'s full-batch L-BFGS polish to
max |grad| <= its `grad_tol`. Most training points end saturated (loss ~ e^-20) and every test
point is classified correctly, but the paper's findings on LEES, RelatIF and RUE do not show
(examples/README.md)."""
