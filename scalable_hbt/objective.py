"""The training objective: model + task + training data + weight decay, as functions of flat θ.

Notation (docs/design.md §1). θ ∈ R^M are the studied parameters — all trainable ones, or
those whose names match the ``params`` patterns — flattened in ``named_parameters()`` order.
The per-sample objective and the training objective are

.. math::

    ℓ(z, θ) = \\mathrm{loss}(f(x; θ), y) + \\tfrac{wd}{2}\\,\\|θ\\|^2, \\qquad
    L(θ) = \\frac1n \\sum_{i=0}^{n-1} ℓ(z_i, θ),

and a test point is measured by the task's measurement (the loss unless the task says
otherwise), plus the regulariser unless ``test_loss="loss"``.

:class:`Objective` owns the functional view of the model (``torch.func.functional_call`` with
θ in place of the studied parameters and the model's own tensors for the rest), per-sample
losses and gradients (one ``vmap(grad)`` path, with a per-sample loop where ``vmap`` cannot go),
weighted full-data gradients and chunked iteration over the data. Nothing above it touches
``model.parameters()``.

Memory and precision. The caller's module is never modified. Its module tree is copied
without its tensors; θ is a copy of the studied parameters, and frozen parameters are used in
place — neither copied nor cast — when they already have the compute dtype and device (so
training the caller's model further changes the frozen part the Objective sees; buffers are
copied). θ is kept in ``dtype`` (float32 or
float64: the accumulators, products and solves); the forward and backward passes run in
``compute_dtype`` (default ``dtype``; bfloat16 or float16 for mixed precision), with outputs
cast back to ``dtype`` before the loss.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed
from .data import Batch, DataLike, DataSource, Inputs, batch_size_of, map_tensors, sample_shapes
from .errors import InputError, TrainModeWarning
from .log import logger, progress_bar
from .task import LossFn, Task, check_per_sample, resolve_task
from .validation import check_choice, check_integer, check_number

Labels = Literal["true", "predicted"]
TestLoss = Literal["objective", "loss"]

_STOCHASTIC_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                       nn.AlphaDropout, nn.FeatureAlphaDropout)
_PER_SAMPLE_GRADIENT_BUDGET = 2**26  # floats held at once by one chunk of per-sample gradients
SUPPORTED_DTYPES = (torch.float32, torch.float64)
COMPUTE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_VMAP_UNSUPPORTED = (nn.RNNBase,)  # recurrent layers: their fused kernels have no batching rule


def select_parameters(model: nn.Module, patterns: list[str] | tuple[str, ...] | None) -> list[tuple[str, Tensor]]:
    """(name, tensor) of the parameters an ``Objective(model, params=patterns)`` studies, in
    ``named_parameters()`` order: every parameter with ``requires_grad`` when ``patterns`` is
    ``None``, else those whose name matches a pattern (``fnmatch.fnmatchcase``), frozen or not.
    A tensor tied under several names (an LM head sharing its embedding) is listed once, under the
    first name that selects it. Raises ``InputError`` for malformed patterns, a pattern that
    matches nothing, or a model without trainable parameters."""
    named = list(model.named_parameters())
    if patterns is None:
        selected = [(k, p) for k, p in named if p.requires_grad]
        if not selected:
            raise InputError("the model has no trainable parameters (requires_grad=True).")
        return selected
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns) or not patterns:
        raise InputError(f"params must be a non-empty list of name patterns such as ['head.*']; got {patterns!r}.")
    every = list(model.named_parameters(remove_duplicate=False))
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(k, pat) for k, _ in every)]
    if unmatched:
        names = [k for k, _ in named]
        raise InputError(f"params pattern(s) {unmatched} match no parameter of the model; its parameters are "
                         f"named like {names[:6]}{' …' if len(names) > 6 else ''}.")
    chosen = {id(p) for k, p in every if any(fnmatch.fnmatchcase(k, pat) for pat in patterns)}
    first = {id(p): k for k, p in reversed(every) if any(fnmatch.fnmatchcase(k, pat) for pat in patterns)}
    return [(first[id(p)], p) for _, p in named if id(p) in chosen]


class Objective:
    """Model, task, training data and weight decay, seen as a function of flat θ.

    Parameters
    ----------
    model:
        Any ``nn.Module`` (a Hugging Face model too). Curvature is taken in eval mode (dropout
        off, batch-norm running statistics); the caller's module is left untouched. A model
        handed over in train mode with dropout or batch-norm triggers a :class:`TrainModeWarning`.
    loss:
        A preset name (``"cross_entropy"``, ``"mse"``, ``"bce"``, ``"token_cross_entropy"``,
        ``"causal_lm"``), a :class:`~scalable_hbt.task.Task`, or a callable
        ``(outputs, targets) -> (B,)``.
    train:
        Training data: ``(X, y)`` tensors or arrays, a dict of tensors (targets under the
        task's ``target_key``), a ``Dataset`` or a ``DataLoader``.
    weight_decay:
        wd in ℓ(z, θ) = loss + (wd/2)‖θ‖²; the paper uses wd = λ/n with λ = 0.05.
    batch_size:
        Samples per chunk for every pass over the data (forward, products, per-sample
        gradients; the latter additionally capped so one chunk holds ≤ 2²⁶ numbers).
    device, dtype:
        Where, and in which floating type (float32 or float64), θ, products and solves live.
    compute_dtype:
        The floating type of the forward and backward passes (default ``dtype``); bfloat16 or
        float16 run the model in half precision with float32/float64 accumulators.
    params:
        Module-name patterns (``fnmatch``, e.g. ``["transformer.h.5.*", "lm_head.*"]``) of the
        parameters to study; the curvature is then with respect to those only. Default: every
        parameter with ``requires_grad``.
    classification:
        For a callable ``loss``: whether targets are class indices (default ``True``).
    measurement:
        ``(outputs, targets) -> (B,)``, the quantity measured at a test point (replaces the task's).
    progress:
        Show tqdm progress bars for passes over the data.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn | Task = "cross_entropy",
        train: DataLike | None = None,
        *,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        params: list[str] | tuple[str, ...] | None = None,
        classification: bool | None = None,
        measurement: LossFn | None = None,
        progress: bool = True,
    ) -> None:
        if train is None:
            raise InputError("Objective needs training data: train=(X, y), a dict of tensors, a Dataset or a "
                             "DataLoader.")
        if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
            raise InputError(
                f"dtype = {dtype}: expected torch.float32 or torch.float64 (θ, products and solves). For half "
                "precision pass compute_dtype=torch.bfloat16 (or float16): the model then runs in half precision "
                "with float32/float64 accumulators.")
        compute_dtype = dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in COMPUTE_DTYPES:
            raise InputError(f"compute_dtype = {compute_dtype}: expected one of {list(COMPUTE_DTYPES)}.")
        if torch.finfo(compute_dtype).bits > torch.finfo(dtype).bits:
            raise InputError(f"compute_dtype = {compute_dtype} is wider than dtype = {dtype}; accumulators must be "
                             "at least as precise as the forward pass.")
        check_number("weight_decay", weight_decay)
        check_integer("batch_size", batch_size, 1)
        self.task = resolve_task(loss, classification, measurement)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.progress = progress

        if model.training and any(isinstance(m, _STOCHASTIC_MODULES) for m in model.modules()):
            warnings.warn(
                "the model is in train mode and has dropout or batch-norm layers; the curvature is "
                "taken in eval mode (dropout off, batch-norm running statistics). Call model.eval() "
                "before building the Objective to silence this warning.",
                TrainModeWarning, stacklevel=2,
            )
        # the module tree is copied, its tensors are not: eval() here leaves the caller's model as it was
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.model = copy.deepcopy(model, memo=shared).eval()
        selected = select_parameters(self.model, params)
        for name, p in selected:
            if not torch.isfinite(p).all():
                raise InputError(
                    f"parameter {name!r} contains NaN or Inf; the Hessian of a diverged model is "
                    "meaningless. Retrain or reload a finite checkpoint."
                )
        self.param_names = [k for k, _ in selected]
        self.param_shapes = [p.shape for _, p in selected]
        self.param_numels = [p.numel() for _, p in selected]
        self.params = None if params is None else list(params)
        self.theta = torch.cat([p.detach().reshape(-1).to(self.device, dtype) for _, p in selected])
        self._own_tensors([p for _, p in selected])
        self.per_sample_mode = "loop" if any(isinstance(m, _VMAP_UNSUPPORTED) for m in self.model.modules()) \
            else "vmap"
        if self.per_sample_mode == "loop":
            self._notice_loop([type(m).__name__ for m in self.model.modules() if isinstance(m, _VMAP_UNSUPPORTED)])

        self.train = train if isinstance(train, DataSource) else DataSource(train, name="training data",
                                                                            target_key=self.task.target_key)
        if not self.train.has_targets:
            raise InputError("training data must carry targets: pass (X, y), a dict with "
                             f"{self.task.target_key!r}, or a Dataset of (x, y).")
        self.n = len(self.train)
        self._sample_shape = self.train.sample_shape()
        self._output_shape: torch.Size | None = None  # of one sample's output, set by _check_forward
        self._check_forward()

    def _compute_tensor(self, t: Tensor) -> Tensor:
        """A frozen tensor as the forward pass needs it: itself when its device and dtype are
        already right (no copy), else a copy moved to the device (floating point: cast too)."""
        t = t.detach()
        target_dtype = self.compute_dtype if t.is_floating_point() else t.dtype
        if t.device == self.device and t.dtype == target_dtype:
            return t
        return t.to(device=self.device, dtype=target_dtype)

    def _own_tensors(self, studied: list[Tensor]) -> None:
        """Give the module copy its own tensors where it needs them: the studied parameters become
        views of θ̃ (cast to the compute dtype if it differs), buffers are copied (so training the
        caller's model further cannot change them), frozen parameters stay shared unless they
        must be moved or cast. ``self.buffers`` is what ``functional_call`` takes besides θ."""
        views = {id(p): v for p, v in zip(studied, torch.split(self.theta, self.param_numels))}
        self.buffers = {}
        replaced: dict[int, nn.Parameter] = {}  # tied parameters stay tied: one replacement per tensor
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for leaf, p in list(module._parameters.items()):
                if p is None:
                    continue
                name = dot + leaf
                if id(p) not in replaced:
                    if id(p) in views:
                        value = views[id(p)].view(p.shape)
                        value = value if self.compute_dtype == self.dtype else value.to(self.compute_dtype)
                        replaced[id(p)] = nn.Parameter(value, requires_grad=True)
                    else:
                        replaced[id(p)] = nn.Parameter(self._compute_tensor(p), requires_grad=False)
                        self.buffers[name] = replaced[id(p)].detach()
                    replaced[id(replaced[id(p)])] = replaced[id(p)]  # a module met again keeps its new tensor
                module._parameters[leaf] = replaced[id(p)]
            for leaf, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[leaf] = self._compute_tensor(b).clone()
                    self.buffers[dot + leaf] = module._buffers[leaf]

    def _notice_loop(self, modules: list[str]) -> None:
        logger.warning("per-sample gradients of this model are taken one sample at a time (torch.func.vmap "
                       "cannot batch %s); results are the same, a pass over the data is slower.",
                       ", ".join(sorted(set(modules))))

    # ------------------------------------------------------------------ parameters
    @property
    def num_params(self) -> int:
        """M, the number of studied parameters."""
        return self.theta.numel()

    @property
    def loss(self) -> Task:
        """The task (its ``loss`` is the per-sample training loss)."""
        return self.task

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(M,)`` vector into named parameter tensors (views)."""
        parts = torch.split(theta, self.param_numels)
        return {k: t.view(s) for k, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, named: dict[str, Tensor]) -> Tensor:
        """Concatenate named parameter tensors into a flat ``(M,)`` vector."""
        return torch.cat([named[k].reshape(-1) for k in self.param_names])

    # ------------------------------------------------------------------ functional pieces
    def forward(self, theta: Tensor, x: Inputs) -> Tensor:
        """f(x; θ) for a batch of inputs (a tensor ``(B, ...)``, a tuple or a dict of such), as
        the task's outputs in ``dtype``. Scaled-dot-product attention runs on its math kernel,
        which has the second derivatives every curvature product needs."""
        params = self.unflatten(theta)
        if self.compute_dtype != self.dtype:
            params = {k: v.to(self.compute_dtype) for k, v in params.items()}
        if isinstance(x, dict):
            args, kwargs = (), x
        elif isinstance(x, tuple):
            args, kwargs = x, {}
        else:
            args, kwargs = (x,), {}
        with sdpa_kernel([SDPBackend.MATH]):
            raw = functional_call(self.model, (params, self.buffers), args, kwargs)
        out = self.task.outputs(raw)
        return out.to(self.dtype) if out.is_floating_point() and out.dtype != self.dtype else out

    def loss_sum(self, theta: Tensor, x: Inputs, y: Tensor) -> Tensor:
        """Σ_{i in batch} loss(f(x_i; θ), y_i), without the regulariser (a scalar)."""
        return self.task.loss(self.forward(theta, x), y).sum()

    def regulariser(self, theta: Tensor) -> Tensor:
        """(wd/2)‖θ‖²."""
        return 0.5 * self.weight_decay * theta.pow(2).sum()

    # ------------------------------------------------------------------ data handling
    def source(self, data: DataLike | DataSource, y: Tensor | None = None, name: str = "test data") -> DataSource:
        """Wrap test data and check that one input has the training inputs' shape."""
        src = data if isinstance(data, DataSource) else DataSource(data, y, name=name,
                                                                   target_key=self.task.target_key)
        if src is not self.train and not _same_structure(src.sample_shape(), self._sample_shape):
            raise InputError(
                f"{src.name}: one input has shape {src.sample_shape()}, but training inputs "
                f"have shape {self._sample_shape}. Reshape the test inputs to match."
            )
        return src

    def check_test_data(self, data: DataLike | DataSource, y: Tensor | None = None, labels: Labels = "true") -> None:
        """Check test points before any work: input shape, and for ``labels="true"`` that targets
        exist and fit the task and the model's output (all at once for tensors)."""
        check_choice("labels", labels, ("true", "predicted"))
        src = self.source(data, y)
        if labels == "true":
            if not src.has_targets:
                raise InputError(f"{src.name} has no targets; pass y or use labels='predicted'.")
            if src.targets is not None:
                self._targets(src.targets.to(self.device), 0, src.name)
        elif not self.task.classification and self.task.targets != "binary":
            self.task.predicted(torch.empty(0))  # raises: a regression task has no predicted labels

    def prepare(self, batch: Batch, labels: Labels = "true", what: str = "data") -> tuple[Inputs, Tensor]:
        """Move a batch to the device (floating inputs to the compute dtype), check it, and
        return ``(x, targets)``.

        ``labels="true"`` uses the batch's targets; ``"predicted"`` the model's own at θ̃ (argmax
        over classes or tokens, the sign of a binary logit). Token targets at positions whose
        ``attention_mask`` is 0 become the ignore index, and for a shifted task (causal LM) so do
        targets whose predicting position is masked.
        """
        x = map_tensors(lambda t: t.to(self.device, self.compute_dtype if t.is_floating_point() else t.dtype),
                        batch.x)
        for key, t in _named_leaves(x):
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).reshape(len(t), -1).any(dim=1).nonzero().flatten()
                raise InputError(
                    f"{what}: inputs{key} of samples {(bad + batch.start).tolist()[:10]} contain NaN or Inf; "
                    "clean or drop them before computing curvature."
                )
        check_choice("labels", labels, ("true", "predicted"))
        if labels == "predicted":
            with torch.no_grad():
                y = self.task.predicted(self.forward(self.theta, x))
        else:
            if batch.y is None:
                raise InputError(f"{what} has no targets; pass y or use labels='predicted'.")
            y = self._targets(batch.y.to(self.device), batch.start, what)
        if self.task.targets == "token" and isinstance(x, dict) and "attention_mask" in x:
            masked = x["attention_mask"] == 0
            s = self.task.shift
            if s:  # the outputs at t − s predict the target at t: a masked predicting position ignores it too
                masked = masked.clone()
                masked[:, s:] |= masked[:, :-s].clone()
            y = y.masked_fill(masked, self.task.ignore_index)
        return x, y

    def _targets(self, y: Tensor, start: int, what: str) -> Tensor:
        """Targets checked against the task and the model's output: integer classes in [0, C)
        (or the task's ignore index) for classes and tokens, values in [0, 1] for binary
        targets, finite values shaped like one output otherwise; a violation names the samples."""
        kind, shape = self.task.targets, self._output_shape
        if kind in ("class", "token"):
            if y.is_floating_point() and not torch.equal(y, y.round()):
                raise InputError(f"{what}: {kind} targets must be integer indices; got fractional values.")
            y = y.long()
            if shape is None:
                return y
            expected = () if kind == "class" else tuple(shape[:-1])
            if tuple(y.shape[1:]) != expected:
                raise InputError(f"{what}: {kind} targets have per-sample shape {tuple(y.shape[1:])}, but the model's "
                                 f"outputs {tuple(shape)} need {expected} (one index per "
                                 f"{'sample' if kind == 'class' else 'token'}).")
            C = shape[-1]
            bad = (y < 0) | (y >= C)
            if self.task.ignore_index is not None:
                bad &= y != self.task.ignore_index
            if bad.any():
                rows = _sample_indices(bad, start)
                raise InputError(
                    f"{what}: class labels of samples {rows} are {y[bad].flatten()[:10].tolist()}, outside "
                    f"[0, {C}) for a model with {C} outputs. Fix the labels (the loss {self.task.name!r} has "
                    + ("no ignore index)." if self.task.ignore_index is None else
                       f"ignore index {self.task.ignore_index} for positions it skips)."))
            return y
        y = y.to(self.dtype)
        if shape is not None and tuple(y.shape[1:]) != tuple(shape):
            raise InputError(
                f"{what}: regression targets have per-sample shape {tuple(y.shape[1:])} but the model outputs "
                f"{tuple(shape)} per sample; reshape y to match (e.g. y.view(-1, 1)).")
        if not torch.isfinite(y).all():
            rows = _sample_indices(~torch.isfinite(y), start)
            raise InputError(f"{what}: targets of samples {rows} contain NaN or Inf; clean or drop them.")
        if kind == "binary" and ((y < 0) | (y > 1)).any():
            rows = _sample_indices((y < 0) | (y > 1), start)
            raise InputError(f"{what}: binary targets of samples {rows} lie outside [0, 1].")
        return y

    def _check_forward(self) -> None:
        """Run the model and the task on two training samples to fail early with a clear message,
        and learn the shape of one output (which every later batch of targets is checked against)."""
        batch = next(self.train.batches(min(2, self.n)))
        x, y = self.prepare(batch, "true", "training data")
        with torch.no_grad():
            try:
                out = self.forward(self.theta, x)
            except (RuntimeError, TypeError, ValueError) as err:
                raise InputError(f"the model cannot be evaluated on the training inputs "
                                 f"{sample_shapes(x)}: {err}") from err
            kind = self.task.targets
            if kind == "class" and out.ndim != 2:
                raise InputError(f"a classification loss needs outputs of shape (B, C); the model returns "
                                 f"{tuple(out.shape)}. For sequence outputs (B, T, V) use loss='token_cross_entropy' "
                                 "or 'causal_lm'.")
            if kind == "token" and out.ndim != 3:
                raise InputError(f"a token loss needs outputs of shape (B, T, V); the model returns {tuple(out.shape)}.")
            self._output_shape = out.shape[1:]
            y = self._targets(y, batch.start, "training data")
            check_per_sample(self.task.loss(out, y), len(out), "loss", self.task.name)
            if self.task.measurement is not None:
                check_per_sample(self.task.measurement(out, y), len(out), "measurement", self.task.name)
        if self.train.targets is not None:  # tensor data: every label now; datasets: batch by batch as read
            self._targets(self.train.targets.to(self.device), 0, "training data")

    def batches(self, source: DataSource, labels: Labels = "true", *, batch_size: int | None = None,
                desc: str | None = None, shard: bool = True) -> Iterator[tuple[int, Inputs, Tensor]]:
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
        """The measurement f(z_t, θ) of every test point (plus the regulariser unless
        ``test_loss="loss"``), shape ``(T,)``; θ defaults to the trained θ̃. Predicted labels
        are taken at θ̃."""
        check_choice("test_loss", test_loss, ("objective", "loss"))
        src = self.source(data, y)
        theta = self.theta if theta is None else theta
        reg = self.regulariser(theta) if test_loss == "objective" else 0.0
        out = []
        with torch.no_grad():
            for _, x, t in self.batches(src, labels):
                out.append(self.task.measure(self.forward(theta, x), t) + reg)
        return torch.cat(out)

    def per_sample_grad_chunk(self) -> int:
        """Samples per chunk of per-sample gradients: ≤ batch_size and ≤ 2²⁶ / M numbers."""
        return max(1, min(self.batch_size, _PER_SAMPLE_GRADIENT_BUDGET // self.num_params))

    def sample_gradients(self, scalar: Callable[[Tensor, Tensor], Tensor], x: Inputs, extra: Tensor,
                         indices: Tensor | None = None) -> Tensor:
        """∇_θ scalar(f(x_i; θ̃), e_i) for every sample i of a batch, shape ``(B, M)`` — or
        ``(B, len(indices))``, the gradient with respect to the parameters at the flat
        ``indices`` only. ``scalar`` maps one sample's output ``(1, ...)`` and its ``e_i``
        ``(1, ...)`` (a target, a direction in output space) to a number.

        One ``vmap(grad)`` over the batch: the way every per-sample gradient of the library is
        taken. Where ``vmap`` cannot batch a model (recurrent layers, or an operation without a
        batching rule, found at the first failure and announced once) the same gradient is taken
        sample by sample."""
        base = self.theta

        def one(params: Tensor, xi: Inputs, ei: Tensor) -> Tensor:
            theta = params if indices is None else torch.index_put(base, (indices,), params)
            return scalar(self.forward(theta, map_tensors(lambda t: t.unsqueeze(0), xi)), ei.unsqueeze(0))

        params = base if indices is None else base[indices]
        if self.per_sample_mode == "vmap":
            try:
                return vmap(grad(one), in_dims=(None, 0, 0))(params, x, extra)
            except (RuntimeError, NotImplementedError) as err:
                if not _vmap_failure(err):
                    raise
                self.per_sample_mode = "loop"
                self._notice_loop([f"an operation ({str(err).splitlines()[0][:120]})"])
        g = grad(one)
        return torch.stack([g(params, map_tensors(lambda t: t[i], x), extra[i])
                            for i in range(batch_size_of(x))])

    def batch_gradients(self, x: Inputs, y: Tensor, test_loss: TestLoss = "objective", *,
                        measure: bool = False) -> Tensor:
        """Per-sample gradients of one batch, shape ``(B, M)``: g_i = ∇_θ ℓ(z_i, θ̃) of the
        training loss, or with ``measure`` of the task's measurement; the regulariser's
        gradient wd·θ̃ is added unless ``test_loss="loss"``."""
        fn = self.task.measure if measure else self.task.loss
        g = self.sample_gradients(lambda out, t: fn(out, t).squeeze(0), x, y)
        if test_loss == "objective" and self.weight_decay:
            g = g + self.weight_decay * self.theta
        return g

    def iter_gradients(self, data: DataLike | DataSource, y: Tensor | None = None, *,
                       labels: Labels = "true", test_loss: TestLoss = "objective",
                       desc: str | None = None, shard: bool = True) -> Iterator[tuple[int, Tensor]]:
        """Stream per-sample gradients: yields ``(start, G)`` with ``G`` of shape ``(B, M)``, of
        the training loss for the training data and of the measurement for any other data.

        Only one chunk of gradients exists at a time, so memory is O(chunk·M), never n·M.
        The training data is sharded across ranks unless ``shard=False`` (see :meth:`batches`).
        """
        check_choice("test_loss", test_loss, ("objective", "loss"))
        src = self.source(data, y)
        measure = src is not self.train
        for start, x, t in self.batches(src, labels, batch_size=self.per_sample_grad_chunk(), desc=desc,
                                        shard=shard):
            yield start, self.batch_gradients(x, t, test_loss, measure=measure)

    def training_chunks(self, visit: Callable[[int, Tensor], None], *, desc: str | None = None,
                        collective: bool = False) -> None:
        """Call ``visit(start, G)`` for every chunk of per-sample training gradients G (c, M), the
        samples [start, start + c): the one pass over the training data that methods use. Only
        one chunk of gradients exists at a time. Under ``torch.distributed`` each rank visits its
        shard (the caller combines the ranks' results), unless ``collective`` (for a ``visit``
        that itself runs collective operations, such as full-data products): then every rank
        walks all n points in the same order."""
        sharded = not (collective and distributed.active())
        for start, G in self.iter_gradients(self.train, desc=desc, shard=sharded):
            visit(start, G)

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
        rows = torch.zeros(self.n, columns, device=self.device, dtype=self.dtype)

        def fill(start: int, G: Tensor) -> None:
            rows[start:start + G.shape[0]] = fn(G)

        self.training_chunks(fill, desc=desc, collective=collective)
        return rows if collective and distributed.active() else distributed.all_reduce_sum(rows)

    def gradients(self, data: DataLike | DataSource, y: Tensor | None = None, *,
                  labels: Labels = "true", test_loss: TestLoss = "objective") -> Tensor:
        """All per-sample gradients of (small) test data at once, shape ``(T, M)``: the
        measurement's gradients (the loss's when ``data`` is the training source itself)."""
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
        return {"M": self.num_params, "n": self.n, "loss": self.task.name, "targets": self.task.targets,
                "weight_decay": self.weight_decay, "dtype": str(self.dtype), "compute_dtype": str(self.compute_dtype),
                "params": self.params, "device": str(self.device)}

    def describe(self) -> dict[str, Any]:
        """Sizes and per-stage dtypes, for diagnostics."""
        return {"M": self.num_params, "n": self.n, "task": self.task.name, "dtype": str(self.dtype),
                "compute_dtype": str(self.compute_dtype), "params": self.params,
                "per_sample_gradients": self.per_sample_mode}


def _same_structure(a: Any, b: Any) -> bool:
    """Whether two sample-shape structures agree: tensors exactly; dicts and tuples by keys and ranks
    (sequence lengths may differ between training and test data)."""
    if isinstance(a, tuple) and all(isinstance(v, int) for v in a):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(len(u) == len(v) for u, v in zip(a, b))
    return a == b


def _named_leaves(x: Inputs) -> list[tuple[str, Tensor]]:
    if isinstance(x, dict):
        return [(f"[{k!r}]", v) for k, v in x.items() if isinstance(v, Tensor)]
    if isinstance(x, tuple):
        return [(f"[{i}]", v) for i, v in enumerate(x) if isinstance(v, Tensor)]
    return [("", x)]


def _vmap_failure(err: Exception) -> bool:
    """Whether an error comes from ``torch.func.vmap`` being unable to batch an operation."""
    text = str(err).lower()
    return any(k in text for k in ("vmap", "batching rule", "batched", "doesn't match the broadcast shape",
                                   "in-place operation"))


def _sample_indices(bad: Tensor, start: int, shown: int = 10) -> list[int]:
    """Indices (offset by ``start``) of the samples with any True entry in ``bad`` (B, ...)."""
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten() + start
    return rows[:shown].tolist()


def _module_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
