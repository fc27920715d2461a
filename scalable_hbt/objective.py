"""The training objective: model + per-sample loss + training data + weight decay.

Notation (docs/design.md §1). θ ∈ R^M are all trainable parameters flattened in
``named_parameters()`` order. The per-sample objective and the training objective are

.. math::

    ℓ(z, θ) = \\mathrm{loss}(f(x; θ), y) + \\tfrac{wd}{2}\\,\\|θ\\|^2, \\qquad
    L(θ) = \\frac1n \\sum_{i=0}^{n-1} ℓ(z_i, θ).

:class:`Objective` owns the functional view of the model (``torch.func.functional_call``
on a flat parameter vector), per-sample losses and gradients (``vmap(grad)``), weighted
full-data gradients and chunked iteration over the data. Nothing above it touches
``model.parameters()``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from . import distributed
from .data import Batch, DataLike, DataSource
from .errors import InputError, TrainModeWarning
from .losses import LossFn, check_per_sample, predicted_targets, resolve_loss
from .log import progress_bar
from .validation import check_choice, check_integer, check_number

Labels = Literal["true", "predicted"]
TestLoss = Literal["objective", "loss"]

_STOCHASTIC_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                       nn.AlphaDropout, nn.FeatureAlphaDropout)
_PER_SAMPLE_GRADIENT_BUDGET = 2**26  # floats held at once by one chunk of per-sample gradients
SUPPORTED_DTYPES = (torch.float32, torch.float64)


class Objective:
    """Model, loss, training data and weight decay, seen as a function of flat θ.

    Parameters
    ----------
    model:
        Any ``nn.Module``. It is copied, moved to ``device``/``dtype`` and put in eval mode
        (curvature is taken with dropout off and batch-norm running statistics); the
        caller's module is left untouched. A model handed over in train mode with dropout
        or batch-norm triggers a :class:`TrainModeWarning`.
    loss:
        ``"cross_entropy"``, ``"mse"`` or a callable ``(outputs, targets) -> (B,)``.
    train:
        Training data: ``(X, y)``, a ``Dataset`` of ``(x, y)`` or a ``DataLoader``.
    weight_decay:
        wd in ℓ(z, θ) = loss + (wd/2)‖θ‖²; the paper uses wd = λ/n with λ = 0.05.
    batch_size:
        Samples per chunk for every pass over the data (forward, HVP, per-sample
        gradients; the latter additionally capped so one chunk holds ≤ 2²⁶ numbers).
    device, dtype:
        Where and in which floating type all computation happens.
    classification:
        For a callable ``loss``: whether targets are class indices (default ``True``).
    progress:
        Show tqdm progress bars for passes over the data.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn = "cross_entropy",
        train: DataLike | None = None,
        *,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        classification: bool | None = None,
        progress: bool = True,
    ) -> None:
        if train is None:
            raise InputError("Objective needs training data: train=(X, y), a Dataset or a DataLoader.")
        if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
            raise InputError(
                f"dtype = {dtype}: expected torch.float32 or torch.float64. Half precision (bfloat16, float16) is "
                "not supported: its rounding error exceeds the curvature it would measure; build the Objective in "
                "float32 or float64 (the model is copied and cast, the caller's module is untouched).")
        check_number("weight_decay", weight_decay)
        check_integer("batch_size", batch_size, 1)
        self.loss = resolve_loss(loss, classification)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.progress = progress

        if model.training and any(isinstance(m, _STOCHASTIC_MODULES) for m in model.modules()):
            warnings.warn(
                "the model is in train mode and has dropout or batch-norm layers; the curvature is "
                "taken in eval mode (dropout off, batch-norm running statistics). Call model.eval() "
                "before building the Objective to silence this warning.",
                TrainModeWarning, stacklevel=2,
            )
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise InputError("the model has no trainable parameters (requires_grad=True).")
        for name, p in named:
            if not torch.isfinite(p).all():
                raise InputError(
                    f"parameter {name!r} contains NaN or Inf; the Hessian of a diverged model is "
                    "meaningless. Retrain or reload a finite checkpoint."
                )
        self.param_names = [k for k, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.param_numels = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.buffers = {k: b for k, b in self.model.named_buffers()}
        frozen = {k: p.detach() for k, p in self.model.named_parameters() if not p.requires_grad}
        self.buffers.update(frozen)

        self.train = train if isinstance(train, DataSource) else DataSource(train, name="training data")
        if not self.train.has_targets:
            raise InputError("training data must carry targets: pass (X, y) or a Dataset of (x, y).")
        self.n = len(self.train)
        self._sample_shape = self.train.sample_shape()
        self._output_shape: torch.Size | None = None  # of one sample's output, set by _check_forward
        self._check_forward()

    # ------------------------------------------------------------------ parameters
    @property
    def num_params(self) -> int:
        """M, the number of trainable parameters."""
        return self.theta.numel()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(M,)`` vector into named parameter tensors (views)."""
        parts = torch.split(theta, self.param_numels)
        return {k: t.view(s) for k, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, named: dict[str, Tensor]) -> Tensor:
        """Concatenate named parameter tensors into a flat ``(M,)`` vector."""
        return torch.cat([named[k].reshape(-1) for k in self.param_names])

    # ------------------------------------------------------------------ functional pieces
    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """f(x; θ) for a batch ``x`` of shape ``(B, *input_shape)``."""
        return functional_call(self.model, (self.unflatten(theta), self.buffers), (x,))

    def loss_sum(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Σ_{i in batch} loss(f(x_i; θ), y_i), without the regulariser (a scalar)."""
        return self.loss.fn(self.forward(theta, x), y).sum()

    def regulariser(self, theta: Tensor) -> Tensor:
        """(wd/2)‖θ‖²."""
        return 0.5 * self.weight_decay * theta.pow(2).sum()

    # ------------------------------------------------------------------ data handling
    def source(self, data: DataLike | DataSource, y: Tensor | None = None, name: str = "test data") -> DataSource:
        """Wrap test data and check that one input has the training inputs' shape."""
        src = data if isinstance(data, DataSource) else DataSource(data, y, name=name)
        if src is not self.train and src.sample_shape() != self._sample_shape:
            raise InputError(
                f"{src.name}: one input has shape {tuple(src.sample_shape())}, but training inputs "
                f"have shape {tuple(self._sample_shape)}. Reshape the test inputs to match."
            )
        return src

    def check_test_data(self, data: DataLike | DataSource, y: Tensor | None = None, labels: Labels = "true") -> None:
        """Check test points before any work: input shape, and for ``labels="true"`` that targets
        exist and fit the loss and the model's output (all at once for tensors)."""
        check_choice("labels", labels, ("true", "predicted"))
        src = self.source(data, y)
        if labels == "true":
            if not src.has_targets:
                raise InputError(f"{src.name} has no targets; pass y or use labels='predicted'.")
            if src.targets is not None:
                self._targets(src.targets.to(self.device), 0, src.name)

    def prepare(self, batch: Batch, labels: Labels = "true", what: str = "data") -> tuple[Tensor, Tensor]:
        """Move a batch to device/dtype, check it, and return ``(x, targets)``.

        ``labels="true"`` uses the batch's targets; ``"predicted"`` uses the model's own
        ``argmax`` labels at θ̃ (classification losses only).
        """
        x = batch.x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).reshape(len(x), -1).any(dim=1).nonzero().flatten()
            raise InputError(
                f"{what}: inputs of samples {(bad + batch.start).tolist()[:10]} contain NaN or Inf; "
                "clean or drop them before computing curvature."
            )
        if labels == "predicted":
            if not self.loss.classification:
                raise InputError(
                    f"labels='predicted' needs a classification loss, but {self.loss.name!r} is a regression "
                    "loss (the predicted target would make the loss zero). Use labels='true'."
                )
            with torch.no_grad():
                return x, predicted_targets(self.forward(self.theta, x))
        check_choice("labels", labels, ("true", "predicted"))
        if batch.y is None:
            raise InputError(f"{what} has no targets; pass y or use labels='predicted'.")
        return x, self._targets(batch.y.to(self.device), batch.start, what)

    def _targets(self, y: Tensor, start: int, what: str) -> Tensor:
        """Targets checked against the loss and the model's output: integer classes in [0, C)
        (or the loss's documented ignore index) for classification, finite values shaped like
        one output for regression; a violation names the samples."""
        if self.loss.classification:
            if y.is_floating_point():
                if not torch.equal(y, y.round()):
                    raise InputError(f"{what}: classification targets must be integer class indices; got fractional values.")
            y = y.long()
            if self._output_shape is not None:
                C = self._output_shape[0]
                bad = (y < 0) | (y >= C)
                if self.loss.ignore_index is not None:
                    bad &= y != self.loss.ignore_index
                if bad.any():
                    rows = _sample_indices(bad, start)
                    raise InputError(
                        f"{what}: class labels of samples {rows} are {y[bad].flatten()[:10].tolist()}, outside "
                        f"[0, {C}) for a model with {C} outputs. Fix the labels (the loss {self.loss.name!r} has no "
                        "ignore index).")
            return y
        y = y.to(self.dtype)
        if self._output_shape is not None and y.shape[1:] != self._output_shape:
            raise InputError(
                f"{what}: regression targets have per-sample shape {tuple(y.shape[1:])} but the model outputs "
                f"{tuple(self._output_shape)} per sample; reshape y to match (e.g. y.view(-1, 1)).")
        if not torch.isfinite(y).all():
            rows = _sample_indices(~torch.isfinite(y), start)
            raise InputError(f"{what}: targets of samples {rows} contain NaN or Inf; clean or drop them.")
        return y

    def _check_forward(self) -> None:
        """Run the model and loss on two training samples to fail early with a clear message,
        and learn the shape of one output (which every later batch of targets is checked against)."""
        batch = next(self.train.batches(min(2, self.n)))
        x, y = self.prepare(batch, "true", "training data")
        with torch.no_grad():
            try:
                out = self.forward(self.theta, x)
            except RuntimeError as err:
                raise InputError(f"the model cannot be evaluated on the training inputs of shape {tuple(x.shape)}: {err}") from err
            if not isinstance(out, Tensor):
                raise InputError(f"the model returns a {type(out).__name__}; the loss needs a tensor of outputs.")
            if self.loss.classification:
                if out.ndim != 2:
                    raise InputError(
                        f"a classification loss needs outputs of shape (B, C); the model returns {tuple(out.shape)}."
                    )
                if y.ndim != 1:
                    raise InputError(f"classification targets must have shape (B,); got {tuple(y.shape)}.")
            elif y.shape != out.shape:
                raise InputError(
                    f"regression targets have per-batch shape {tuple(y.shape)} but the model outputs "
                    f"{tuple(out.shape)}; reshape y to match (e.g. y.view(-1, 1))."
                )
            check_per_sample(self.loss.fn(out, y), len(x), self.loss.name)
        self._output_shape = out.shape[1:]
        if self.train.targets is not None:  # tensor data: every label now; datasets: batch by batch as read
            self._targets(self.train.targets.to(self.device), 0, "training data")

    def batches(self, source: DataSource, labels: Labels = "true", *, batch_size: int | None = None,
                desc: str | None = None, shard: bool = True) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(start, x, targets)`` chunk by chunk, with a progress bar if ``desc``.

        Under ``torch.distributed`` the training data yields only this rank's shard (see
        :mod:`scalable_hbt.distributed`) unless ``shard=False``; callers all-reduce what
        they accumulate.
        """
        bs = batch_size or self.batch_size
        sharded = shard and source is self.train
        start, stop = distributed.shard(len(source)) if sharded else (0, len(source))
        it = source.batches(bs, start, stop)
        if desc is not None:
            it = progress_bar(it, total=source.num_batches(bs, start, stop), desc=desc, enabled=self.progress)
        for batch in it:
            x, y = self.prepare(batch, labels, source.name)
            yield batch.start, x, y

    # ------------------------------------------------------------------ per-sample quantities
    def per_sample_losses(self, data: DataLike | DataSource, y: Tensor | None = None, *,
                          labels: Labels = "true", test_loss: TestLoss = "objective",
                          theta: Tensor | None = None) -> Tensor:
        """ℓ(z_t, θ) for every sample, shape ``(T,)`` (regulariser included unless
        ``test_loss="loss"``); θ defaults to the trained θ̃. Predicted labels are taken at θ̃."""
        check_choice("test_loss", test_loss, ("objective", "loss"))
        src = self.source(data, y)
        theta = self.theta if theta is None else theta
        reg = self.regulariser(theta) if test_loss == "objective" else 0.0
        out = []
        with torch.no_grad():
            for _, x, t in self.batches(src, labels):
                out.append(self.loss.fn(self.forward(theta, x), t) + reg)
        return torch.cat(out)

    def per_sample_grad_chunk(self) -> int:
        """Samples per chunk of per-sample gradients: ≤ batch_size and ≤ 2²⁶ / M numbers."""
        return max(1, min(self.batch_size, _PER_SAMPLE_GRADIENT_BUDGET // self.num_params))

    def sample_gradients(self, scalar: Callable[[Tensor, Tensor], Tensor], x: Tensor, extra: Tensor,
                         indices: Tensor | None = None) -> Tensor:
        """∇_θ scalar(f(x_i; θ̃), e_i) for every sample i of a batch, shape ``(B, M)`` — or
        ``(B, len(indices))``, the gradient with respect to the parameters at the flat
        ``indices`` only. ``scalar`` maps one sample's output ``(1, ...)`` and its ``e_i``
        ``(1, ...)`` (a target, a direction in output space) to a number. One ``vmap(grad)``
        over the batch: the way every per-sample gradient of the library is taken."""
        base = self.theta

        def one(params: Tensor, xi: Tensor, ei: Tensor) -> Tensor:
            theta = params if indices is None else torch.index_put(base, (indices,), params)
            return scalar(self.forward(theta, xi.unsqueeze(0)), ei.unsqueeze(0))

        params = base if indices is None else base[indices]
        return vmap(grad(one), in_dims=(None, 0, 0))(params, x, extra)

    def batch_gradients(self, x: Tensor, y: Tensor, test_loss: TestLoss = "objective") -> Tensor:
        """Per-sample gradients g_i = ∇_θ ℓ(z_i, θ̃) of one batch, shape ``(B, M)``."""
        g = self.sample_gradients(lambda out, t: self.loss.fn(out, t).squeeze(0), x, y)
        if test_loss == "objective" and self.weight_decay:
            g = g + self.weight_decay * self.theta
        return g

    def iter_gradients(self, data: DataLike | DataSource, y: Tensor | None = None, *,
                       labels: Labels = "true", test_loss: TestLoss = "objective",
                       desc: str | None = None, shard: bool = True) -> Iterator[tuple[int, Tensor]]:
        """Stream per-sample gradients: yields ``(start, G)`` with ``G`` of shape ``(B, M)``.

        Only one chunk of gradients exists at a time, so memory is O(chunk·M), never n·M.
        The training data is sharded across ranks unless ``shard=False`` (see :meth:`batches`).
        """
        check_choice("test_loss", test_loss, ("objective", "loss"))
        src = self.source(data, y)
        for start, x, t in self.batches(src, labels, batch_size=self.per_sample_grad_chunk(), desc=desc,
                                        shard=shard):
            yield start, self.batch_gradients(x, t, test_loss)

    def training_rows(self, fn: Callable[[Tensor], Tensor], columns: int, *, desc: str | None = None,
                      collective: bool = False) -> Tensor:
        """R (n, columns) with R[r] the row of training point r in ``fn(G)``, for every chunk of
        per-sample training gradients G (c, M) ↦ rows (c, columns): the one pass over the
        training data that methods use. Only one chunk of gradients exists at a time.

        Under ``torch.distributed`` each rank fills its shard and the rows are summed over the
        ranks. ``collective=True`` is for an ``fn`` that itself runs collective operations
        (full-data Hessian products): every rank then walks all n points in the same order, and
        those products do the sharding.
        """
        sharded = not (collective and distributed.active())
        rows = torch.zeros(self.n, columns, device=self.device, dtype=self.dtype)
        for start, G in self.iter_gradients(self.train, desc=desc, shard=sharded):
            rows[start:start + G.shape[0]] = fn(G)
        return distributed.all_reduce_sum(rows) if sharded else rows

    def gradients(self, data: DataLike | DataSource, y: Tensor | None = None, *,
                  labels: Labels = "true", test_loss: TestLoss = "objective") -> Tensor:
        """All per-sample gradients of (small) test data at once, shape ``(T, M)``."""
        return torch.cat([g for _, g in self.iter_gradients(data, y, labels=labels, test_loss=test_loss)])

    def gradient(self, weights: Tensor | None = None) -> Tensor:
        """Weighted full-data gradient (1/n) Σ_i w_i ∇ℓ(z_i, θ̃).

        ``weights`` of shape ``(n,)`` gives ``(M,)``; of shape ``(B, n)`` gives ``(B, M)``,
        one weighted gradient per row (used by the RUE bootstrap). ``None`` means w = 1,
        the gradient of L itself.
        """
        if weights is None:
            total = torch.zeros_like(self.theta)
            for _, x, t in self.batches(self.train):
                total += torch.func.grad(self.loss_sum)(self.theta, x, t)
            return distributed.all_reduce_sum(total) / self.n + self.weight_decay * self.theta
        w = weights.to(device=self.device, dtype=self.dtype)
        squeeze = w.ndim == 1
        w = w.reshape(-1, w.shape[-1])
        if w.shape[1] != self.n:
            raise InputError(f"weights must have n = {self.n} entries per row; got shape {tuple(weights.shape)}.")
        total = torch.zeros(w.shape[0], self.num_params, device=self.device, dtype=self.dtype)
        for start, G in self.iter_gradients(self.train, desc="weighted gradients"):
            total += w[:, start:start + G.shape[0]] @ G
        distributed.all_reduce_sum(total)
        total /= self.n
        return total[0] if squeeze else total

    def fingerprint_parts(self) -> dict:
        """Settings that determine the objective (for caches and reports)."""
        return {"M": self.num_params, "n": self.n, "loss": self.loss.name,
                "weight_decay": self.weight_decay, "dtype": str(self.dtype), "device": str(self.device)}


def _sample_indices(bad: Tensor, start: int, shown: int = 10) -> list[int]:
    """Indices (offset by ``start``) of the samples with any True entry in ``bad`` (B, ...)."""
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten() + start
    return rows[:shown].tolist()


def _module_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


