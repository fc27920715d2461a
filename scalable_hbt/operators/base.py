"""What every curvature operator shares: the sum over the training data, batching over
vectors, HVP accounting, the dense matrix and the SciPy / CuPy adapters.

A curvature operator is the matrix-free M × M matrix

.. math::

    C = \\frac1n \\sum_{i=0}^{n-1} C_i(θ̃) + wd\\,I, \\qquad C V \\text{ for } V ∈ R^{M×k},

where C_i is the curvature of sample i's loss term (its Hessian, or its Gauss–Newton
matrix) and wd·I the curvature of the regulariser (wd/2)‖θ‖² that sits inside every
per-sample term. A subclass implements one method, :meth:`CurvatureOperator.batch_product`,
Σ_{i∈B} C_i v for the rows v of a block and one batch B; this class turns it into
full-data and mini-batch products. Under ``torch.distributed`` each rank sums its shard of
the training data and the partial sums are all-reduced, so every rank holds the same C V.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..data import Batch
from ..errors import InputError
from ..log import progress_bar
from ..objective import Objective


class CurvatureOperator(ABC):
    """C = (1/n) Σ_i C_i + wd·I of an :class:`~scalable_hbt.objective.Objective` (symmetric, M × M).

    Parameters
    ----------
    objective:
        The model, loss, training data and weight decay; C is taken at its parameters θ̃.
    max_vectors:
        Columns of V pushed through one pass over the data together; bounds the memory of a
        product (and of the solvers, which work on blocks of this many columns).
    cache_graphs:
        Keep each training chunk's autograd graphs (whatever a subclass builds per batch) for the
        operator's lifetime, so that later products skip rebuilding them; worth it for small
        networks under long sequences of products, for the memory of the graphs of all n samples.

    Attributes
    ----------
    num_hvps:
        Work done so far, counted in full-data products with one vector (a mini-batch product
        of b samples counts b/n).
    """

    #: Which curvature this operator applies ("hessian", "ggn"); part of every cache key.
    kind: ClassVar[str] = "abstract"

    def __init__(self, objective: Objective, *, max_vectors: int = 32, cache_graphs: bool = False) -> None:
        if not isinstance(max_vectors, int) or isinstance(max_vectors, bool) or max_vectors < 1:
            raise InputError(f"max_vectors must be an integer ≥ 1; got {max_vectors!r}.")
        self.objective = objective
        self.max_vectors = max_vectors
        self.num_hvps = 0.0
        self._graphs: dict[int, Any] | None = {} if cache_graphs else None

    # ------------------------------------------------------------------ the one per-batch product
    @abstractmethod
    def batch_product(self, rows: Tensor, x: Tensor, y: Tensor, key: int | None) -> Tensor:
        """Σ_{i∈batch} C_i v for every row v of ``rows (k, M)``; returns ``(k, M)``.

        ``key`` identifies a chunk of the training data (its first index) whose intermediate
        results a subclass may keep between calls; ``None`` for ad-hoc batches."""

    def settings(self) -> dict[str, Any]:
        """What, besides the objective, determines the products (for cache keys and reports)."""
        return {"curvature": self.kind}

    def _kept_graph(self, key: int | None, build: Callable[[], Any]) -> Any:
        """A batch's graphs: from the cache when chunk ``key`` was seen and graphs are kept, else
        ``build()`` (and kept when caching is on and ``key`` names a training chunk)."""
        if self._graphs is not None and key in self._graphs:
            return self._graphs[key]
        graph = build()
        if self._graphs is not None and key is not None:
            self._graphs[key] = graph
        return graph

    def _keeps_graphs(self, key: int | None) -> bool:
        return self._graphs is not None and key is not None

    @contextmanager
    def cached_graphs(self) -> Iterator[CurvatureOperator]:
        """Within this block, keep every chunk's graphs between products (see ``cache_graphs``);
        the graphs are dropped on exit unless the operator keeps them anyway."""
        outermost = self._graphs is None
        if outermost:
            self._graphs = {}
        try:
            yield self
        finally:
            if outermost:
                self._graphs = None

    # ------------------------------------------------------------------ shape of the operator
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

    # ------------------------------------------------------------------ products
    def _rows_product(self, rows: Tensor, x: Tensor, y: Tensor, key: int | None = None) -> Tensor:
        """:meth:`batch_product` on at most ``max_vectors`` rows at a time. Under a float16
        compute dtype every row is scaled to unit norm first and the product scaled back (C is
        linear): float16 overflows above 65504, and a product with a gradient-sized vector would."""
        scale = None
        if self.objective.compute_dtype == torch.float16:
            scale = rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
            rows = rows / scale
        if rows.shape[0] <= self.max_vectors:
            out = self.batch_product(rows, x, y, key)
        else:
            out = torch.cat([self.batch_product(block, x, y, key) for block in rows.split(self.max_vectors)])
        return out if scale is None else out * scale

    def _as_columns(self, V: Tensor) -> tuple[Tensor, bool]:
        M = self.shape[0]
        vector = V.ndim == 1
        if vector:
            V = V.unsqueeze(1)
        if V.ndim != 2 or V.shape[0] != M:
            raise InputError(f"expected a vector (M,) or a matrix (M, k) with M = {M}; got shape {tuple(V.shape)}.")
        return V.to(device=self.device, dtype=self.dtype), vector

    def matmat(self, V: Tensor, *, desc: str | None = None) -> Tensor:
        """C V for ``V`` of shape ``(M, k)`` (or ``(M,)``), summed exactly over all training data."""
        V, vector = self._as_columns(V)
        rows = V.T.contiguous()
        out = torch.zeros_like(rows)
        obj = self.objective
        for start, x, y in obj.batches(obj.train, desc=desc):
            out += self._rows_product(rows, x, y, key=start)
        out = distributed.all_reduce_sum(out) / obj.n + obj.weight_decay * rows
        self.num_hvps += rows.shape[0]
        return out[0] if vector else out.T

    def matvec(self, v: Tensor) -> Tensor:
        """C v for one vector ``v`` of shape ``(M,)``."""
        return self.matmat(v)

    __matmul__ = matmat

    def minibatch_matmat(self, V: Tensor, indices: Tensor) -> Tensor:
        """((1/b) Σ_{i∈B} C_i + wd·I) V for the b training samples ``indices`` (under
        ``torch.distributed`` the b samples are split across the ranks and all-reduced)."""
        V, vector = self._as_columns(V)
        rows = V.T.contiguous()
        obj = self.objective
        mine = distributed.split_indices(torch.as_tensor(indices))
        out = torch.zeros_like(rows)
        if len(mine):
            x_raw, y_raw = obj.train.take(mine)
            x, y = obj.prepare(Batch(0, x_raw, y_raw), "true", obj.train.name)
            out = self._rows_product(rows, x, y)
        out = distributed.all_reduce_sum(out) / len(indices) + obj.weight_decay * rows
        self.num_hvps += rows.shape[0] * len(indices) / obj.n
        return out[0] if vector else out.T

    # ------------------------------------------------------------------ the explicit matrix and adapters
    def dense(self, chunk: int | None = None, *, progress: bool | None = None) -> Tensor:
        """Assemble C (M × M) from products with blocks of ``chunk`` identity columns (default
        ``max_vectors``): ⌈M / chunk⌉ passes over the data."""
        M = self.shape[0]
        chunk = chunk or self.max_vectors
        C = torch.empty(M, M, device=self.device, dtype=self.dtype)
        starts = range(0, M, chunk)
        show = self.objective.progress if progress is None else progress
        for s in progress_bar(starts, total=len(starts), desc=f"dense {self.kind}", enabled=show):
            e = min(s + chunk, M)
            E = torch.zeros(M, e - s, device=self.device, dtype=self.dtype)
            E[torch.arange(s, e), torch.arange(e - s)] = 1
            C[:, s:e] = self.matmat(E)
        return C

    def to_scipy(self, damping: float = 0.0):
        """``scipy.sparse.linalg.LinearOperator`` for C + δI acting on float64 numpy arrays (the
        products run on the operator's device)."""
        from scipy.sparse.linalg import LinearOperator

        M = self.shape[0]

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64).reshape(M, -1)).to(self.device, self.dtype)
            out = self.matmat(V) + damping * V
            return out.to("cpu", torch.float64).numpy().reshape(X.shape)

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype=np.float64)

    def to_cupy(self, damping: float = 0.0):
        """``cupyx.scipy.sparse.linalg.LinearOperator`` for C + δI on a CUDA device (zero-copy via DLPack)."""
        import cupy
        from cupyx.scipy.sparse.linalg import LinearOperator

        if self.device.type != "cuda":
            raise InputError("to_cupy needs an Objective on a CUDA device; build it with device='cuda'.")
        M = self.shape[0]

        def mm(X):
            V = torch.from_dlpack(cupy.ascontiguousarray(X).reshape(M, -1)).to(self.dtype)
            out = (self.matmat(V) + damping * V).contiguous()
            return cupy.from_dlpack(out).reshape(X.shape).astype(X.dtype, copy=False)

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm,
                              dtype=cupy.dtype(str(self.dtype).split(".")[-1]))
