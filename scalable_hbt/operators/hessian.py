"""The exact Hessian of the training objective as a matrix-free operator.

.. math::

    H = ∇^2 L(θ̃) = \\frac1n \\sum_{\\text{chunks } B} ∇^2\\Big(\\sum_{i ∈ B} \\mathrm{loss}_i\\Big)(θ̃)
        + wd\\,I.

Each batch's product is computed without forming H, in one of two ways:

* reverse-over-reverse (the default): the gradient graph of the batch is built once with
  ``create_graph=True`` and every vector costs one more backward pass through it (double
  backward); the memory does not grow with the number of vectors.
* forward-over-reverse: ``jvp`` of ``grad`` (Pearlmutter's R-operator), ``vmap``-ed over the
  vectors; it holds one set of tangent activations per vector. ``mode="auto"`` uses it and
  switches, with a warning, to reverse-over-reverse when an operation lacks forward-mode AD.

With ``cache_graphs=True`` every training chunk's gradient graph is kept between products,
so a later product costs one backward pass per chunk instead of a forward pass, a backward
pass and a double backward, for the memory of the graphs of all n samples.
``benchmarks/RESULTS.md`` measures both modes and the cache in units of one gradient.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from ..errors import InputError
from ..objective import Objective
from .base import CurvatureOperator

HVPMode = Literal["auto", "forward-over-reverse", "reverse-over-reverse"]
HVP_MODES: tuple[str, ...] = ("auto", "forward-over-reverse", "reverse-over-reverse")


def _lacks_forward_ad(err: Exception) -> bool:
    msg = str(err).lower()
    return any(k in msg for k in ("forward ad", "forward-mode", "forward mode", "jvp", "fw_grad", "not implemented"))


class HessianOperator(CurvatureOperator):
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
        Vectors pushed through one pass over the data together.
    cache_graphs:
        Keep every training chunk's gradient graph for the operator's lifetime (see
        :meth:`cached_graphs`; reverse-over-reverse only). Worth it for small networks under
        long sequences of products (Lanczos, ARPACK, full-batch LiSSA); leave it off when
        the graphs of all training data do not fit in memory.
    """

    kind = "hessian"

    def __init__(self, objective: Objective, mode: HVPMode = "reverse-over-reverse", max_vectors: int = 32,
                 cache_graphs: bool = False) -> None:
        if mode not in HVP_MODES:
            raise InputError(f"mode must be one of {HVP_MODES}; got {mode!r}.")
        super().__init__(objective, max_vectors=max_vectors, cache_graphs=cache_graphs)
        self.mode: HVPMode = mode

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "hvp_mode": self.mode}

    # ------------------------------------------------------------------ the two ways of one product
    def _forward_over_reverse(self, rows: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Rows v ↦ ∇²(Σ loss)·v, by vmap over jvp(grad)."""
        g = grad(self.objective.loss_sum)
        theta = self.objective.theta

        def hvp(v: Tensor) -> Tensor:
            return jvp(lambda t: g(t, x, y), (theta,), (v,))[1]

        return vmap(hvp)(rows)

    def _gradient_graph(self, x: Tensor, y: Tensor, key: int | None) -> tuple[Tensor, Tensor]:
        """(θ leaf, ∇_θ Σ loss with its graph) for a batch, reused from the cache when kept."""
        def build() -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                theta = self.objective.theta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.objective.loss_sum(theta, x, y), theta, create_graph=True)
            return theta, g

        return self._kept_graph(key, build)

    def _reverse_over_reverse(self, rows: Tensor, x: Tensor, y: Tensor, key: int | None) -> Tensor:
        """Rows v ↦ ∇²(Σ loss)·v by double backward through the batch's gradient graph."""
        theta, g = self._gradient_graph(x, y, key)
        if not g.requires_grad:  # loss is linear in θ: zero Hessian
            return torch.zeros_like(rows)
        keep = self._keeps_graphs(key)
        last = rows.shape[0] - 1
        with torch.enable_grad():
            out = [torch.autograd.grad(g, theta, grad_outputs=v, retain_graph=keep or i < last)[0]
                   for i, v in enumerate(rows)]
        return torch.stack(out)

    def batch_product(self, rows: Tensor, x: Tensor, y: Tensor, key: int | None) -> Tensor:
        if self.mode == "reverse-over-reverse":
            return self._reverse_over_reverse(rows, x, y, key)
        try:
            return self._forward_over_reverse(rows, x, y)
        except (RuntimeError, NotImplementedError) as err:
            if self.mode != "auto" or not _lacks_forward_ad(err):
                raise
            warnings.warn(
                f"forward-mode AD is unavailable for an operation of this model ({str(err).splitlines()[0]}); "
                "switching this Hessian operator to reverse-over-reverse (double backward).",
                RuntimeWarning, stacklevel=3,
            )
            self.mode = "reverse-over-reverse"
            return self._reverse_over_reverse(rows, x, y, key)
