"""The exact Hessian of the training objective as a matrix-free operator.

.. math::

    H = ∇^2 L(θ̃) = \\frac1n \\sum_{\\text{chunks } C} ∇^2\\Big(\\sum_{i ∈ C} \\mathrm{loss}_i\\Big)(θ̃)
        + wd\\,I, \\qquad H V \\text{ for } V ∈ R^{M×k}.

Each chunk's product is computed without forming H, in one of two ways:

* reverse-over-reverse (the default): the gradient graph of the chunk is built once with
  ``create_graph=True`` and every column of V costs one more backward pass through it
  (double backward). On the paper's 740-parameter CNN this measured ≈ 1.0–1.5 gradients
  per HVP against ≈ 2.2–2.5 for forward-over-reverse, and its memory does not grow with k;
  see ``benchmarks/RESULTS.md``.
* forward-over-reverse: ``jvp`` of ``grad`` (Pearlmutter's R-operator), ``vmap``-ed over
  the columns of V. ``mode="auto"`` uses it and switches, with a warning, to
  reverse-over-reverse when an op lacks forward-mode AD.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from . import distributed
from .data import Batch
from .errors import InputError
from .objective import Objective
from .progress import progress_bar

HVPMode = Literal["auto", "forward-over-reverse", "reverse-over-reverse"]
_MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")


def _lacks_forward_ad(err: Exception) -> bool:
    msg = str(err).lower()
    return any(k in msg for k in ("forward ad", "forward-mode", "forward mode", "jvp", "fw_grad", "not implemented"))


class HessianOperator:
    """Matrix-free H = ∇²L(θ̃) of an :class:`Objective` (shape M × M, symmetric).

    Parameters
    ----------
    objective:
        The objective whose Hessian at its parameters θ̃ is applied.
    mode:
        ``"reverse-over-reverse"`` (default), ``"forward-over-reverse"`` or ``"auto"``
        (forward over reverse, falling back to reverse over reverse when an op lacks
        forward AD).
    max_vectors:
        Columns of V pushed through one pass over the data together (forward-over-reverse
        holds one batch of tangent activations per column).
    cache_graphs:
        Keep every training chunk's gradient graph for the operator's lifetime (see
        :meth:`cached_graphs`; reverse-over-reverse only): each later product costs one
        backward pass per chunk instead of a forward, a backward and a double backward
        (HVP / gradient 2.66 → 1.51 on the paper's CNN, benchmarks/RESULTS.md), for the
        memory of the graphs of all n samples (98 MB for that CNN on 1000 samples).
        Worth it for small networks under long sequences of single-vector products
        (Lanczos, ARPACK, full-batch LiSSA); leave it off when the graphs do not fit.

    Attributes
    ----------
    num_hvps:
        Work done so far, counted in full-data Hessian-vector products (a mini-batch
        product of b samples counts b/n).
    """

    def __init__(self, objective: Objective, mode: HVPMode = "reverse-over-reverse", max_vectors: int = 32,
                 cache_graphs: bool = False) -> None:
        if mode not in _MODES:
            raise InputError(f"mode must be one of {_MODES}; got {mode!r}.")
        if max_vectors < 1:
            raise InputError(f"max_vectors must be ≥ 1; got {max_vectors}.")
        self.objective = objective
        self.mode: HVPMode = mode
        self.max_vectors = int(max_vectors)
        self.num_hvps = 0.0
        self._graphs: dict[int, tuple[Tensor, Tensor]] | None = {} if cache_graphs else None

    @property
    def shape(self) -> tuple[int, int]:
        M = self.objective.num_params
        return (M, M)

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        return self.objective.device

    # ------------------------------------------------------------------ one chunk
    def _forward_over_reverse(self, V: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Rows of ``V (k, M)`` ↦ rows of ∇²(Σ loss)·v, by vmap over jvp(grad)."""
        g = grad(self.objective.loss_sum)
        theta = self.objective.theta

        def hvp(v: Tensor) -> Tensor:
            return jvp(lambda t: g(t, x, y), (theta,), (v,))[1]

        return vmap(hvp)(V)

    def _gradient_graph(self, x: Tensor, y: Tensor, key: int | None) -> tuple[Tensor, Tensor]:
        """(θ leaf, ∇_θ Σ loss with its graph) for a chunk, reused from the cache when allowed."""
        if self._graphs is not None and key in self._graphs:
            return self._graphs[key]
        with torch.enable_grad():
            theta = self.objective.theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.objective.loss_sum(theta, x, y), theta, create_graph=True)
        if self._graphs is not None and key is not None:
            self._graphs[key] = (theta, g)
        return theta, g

    def _reverse_over_reverse(self, V: Tensor, x: Tensor, y: Tensor, key: int | None = None) -> Tensor:
        """Rows of ``V (k, M)`` ↦ rows of ∇²(Σ loss)·v by double backward: the gradient graph is
        built once per chunk (or taken from the cache) and each vector costs one backward pass."""
        theta, g = self._gradient_graph(x, y, key)
        if not g.requires_grad:  # loss is linear in θ: zero Hessian
            return torch.zeros_like(V)
        keep = self._graphs is not None and key is not None
        last = V.shape[0] - 1
        with torch.enable_grad():
            rows = [torch.autograd.grad(g, theta, grad_outputs=v, retain_graph=keep or i < last)[0]
                    for i, v in enumerate(V)]
        return torch.stack(rows)

    @contextmanager
    def cached_graphs(self) -> Iterator[HessianOperator]:
        """Within this block, keep every chunk's gradient graph between products.

        Reverse-over-reverse then costs one backward pass per vector and chunk instead of a
        forward, a backward and a double backward (≈ 2.3× faster on the paper's CNN), at the
        price of holding the graphs of all training chunks in memory. Used by the dense
        backend; worth it for any long sequence of products on data whose graphs fit.
        """
        outermost = self._graphs is None
        if outermost:
            self._graphs = {}
        try:
            yield self
        finally:
            if outermost:
                self._graphs = None

    def _chunk_product(self, V: Tensor, x: Tensor, y: Tensor, key: int | None) -> Tensor:
        if self.mode == "reverse-over-reverse":
            return self._reverse_over_reverse(V, x, y, key)
        try:
            return self._forward_over_reverse(V, x, y)
        except (RuntimeError, NotImplementedError) as err:
            if self.mode != "auto" or not _lacks_forward_ad(err):
                raise
            warnings.warn(
                f"forward-mode AD is unavailable for an operation of this model ({str(err).splitlines()[0]}); "
                "switching this Hessian operator to reverse-over-reverse (double backward).",
                RuntimeWarning, stacklevel=3,
            )
            self.mode = "reverse-over-reverse"
            return self._reverse_over_reverse(V, x, y, key)

    def _rows_product(self, V: Tensor, x: Tensor, y: Tensor, key: int | None = None) -> Tensor:
        """∇²(Σ_batch loss) applied to the rows of V, at most ``max_vectors`` at a time;
        ``key`` identifies a training chunk whose gradient graph may be cached."""
        if V.shape[0] <= self.max_vectors:
            return self._chunk_product(V, x, y, key)
        return torch.cat([self._chunk_product(Vc, x, y, key) for Vc in V.split(self.max_vectors)])

    # ------------------------------------------------------------------ public products
    def _check_vectors(self, V: Tensor) -> tuple[Tensor, bool]:
        M = self.objective.num_params
        vector = V.ndim == 1
        if vector:
            V = V.unsqueeze(1)
        if V.ndim != 2 or V.shape[0] != M:
            raise InputError(f"expected a vector (M,) or a matrix (M, k) with M = {M}; got shape {tuple(V.shape)}.")
        return V.to(device=self.device, dtype=self.dtype), vector

    def matmat(self, V: Tensor, *, desc: str | None = None) -> Tensor:
        """H V for ``V`` of shape ``(M, k)`` (or ``(M,)``), summed exactly over all training data."""
        V, vector = self._check_vectors(V)
        rows = V.T.contiguous()
        out = torch.zeros_like(rows)
        for start, x, y in self.objective.batches(self.objective.train, desc=desc):
            out += self._rows_product(rows, x, y, key=start)
        out = distributed.all_reduce_sum(out) / self.objective.n + self.objective.weight_decay * rows
        self.num_hvps += rows.shape[0]
        return out[0] if vector else out.T

    def matvec(self, v: Tensor) -> Tensor:
        """H v for one vector ``v`` of shape ``(M,)``."""
        return self.matmat(v)

    __matmul__ = matmat

    def minibatch_matmat(self, V: Tensor, indices: Tensor) -> Tensor:
        """Mini-batch Hessian product ((1/b) Σ_{i∈B} ∇²loss_i + wd·I) V for the given sample indices
        (under ``torch.distributed`` the b samples are split across ranks and all-reduced)."""
        V, vector = self._check_vectors(V)
        rows = V.T.contiguous()
        mine = distributed.split_indices(torch.as_tensor(indices))
        out = torch.zeros_like(rows)
        if len(mine):
            x_raw, y_raw = self.objective.train.take(mine)
            x, y = self.objective.prepare(Batch(0, x_raw, y_raw), "true", "training data")
            out = self._rows_product(rows, x, y)
        out = distributed.all_reduce_sum(out) / len(indices) + self.objective.weight_decay * rows
        self.num_hvps += rows.shape[0] * len(indices) / self.objective.n
        return out[0] if vector else out.T

    # ------------------------------------------------------------------ adapters
    def to_scipy(self, damping: float = 0.0):
        """``scipy.sparse.linalg.LinearOperator`` for H + δI acting on float64 numpy arrays."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64).reshape(self.shape[0], -1))
            out = self.matmat(V.to(self.dtype)) + damping * V.to(self.dtype)
            return out.to("cpu", torch.float64).numpy().reshape(X.shape)

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype=np.float64)

    def to_cupy(self, damping: float = 0.0):
        """``cupyx.scipy.sparse.linalg.LinearOperator`` for H + δI on a CUDA device (zero-copy via DLPack)."""
        import cupy
        from cupyx.scipy.sparse.linalg import LinearOperator

        if self.device.type != "cuda":
            raise InputError("to_cupy needs an Objective on a CUDA device; build it with device='cuda'.")

        def mm(X):
            V = torch.from_dlpack(cupy.ascontiguousarray(X).reshape(self.shape[0], -1)).to(self.dtype)
            out = (self.matmat(V) + damping * V).contiguous()
            return cupy.from_dlpack(out).reshape(X.shape).astype(X.dtype, copy=False)

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, dtype=cupy.dtype(str(self.dtype).split(".")[-1]))

    def dense(self, chunk: int | None = None, *, progress: bool | None = None) -> Tensor:
        """Assemble H (M × M) from batched products against chunks of the identity.

        ``chunk`` basis vectors go through each pass over the data (default
        ``max_vectors``), so the cost is ⌈M / chunk⌉ passes, not M.
        """
        M = self.objective.num_params
        chunk = chunk or self.max_vectors
        H = torch.empty(M, M, device=self.device, dtype=self.dtype)
        starts = range(0, M, chunk)
        show = self.objective.progress if progress is None else progress
        for s in progress_bar(starts, total=len(starts), desc="dense Hessian", enabled=show):
            e = min(s + chunk, M)
            E = torch.zeros(M, e - s, device=self.device, dtype=self.dtype)
            E[torch.arange(s, e), torch.arange(e - s)] = 1
            H[:, s:e] = self.matmat(E)
        return H
