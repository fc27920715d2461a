"""The generalised Gauss–Newton matrix of the training objective as a matrix-free operator.

.. math::

    G = \\frac1n \\sum_i J_i^T\\, Λ_i\\, J_i + wd\\,I, \\qquad
    J_i = \\frac{∂ f(x_i; θ)}{∂θ}\\Big|_{θ̃}, \\quad Λ_i = ∇^2_f\\,\\mathrm{loss}(f(x_i; θ̃), y_i).

G drops from the Hessian the term Σ_k ∂loss/∂f_k · ∇²_θ f_k, the network's own curvature
weighted by the residuals; what is left is positive semi-definite whenever the loss is convex
in the outputs (cross-entropy, squared error, binary cross-entropy), so a tiny damping makes
G + δI safely invertible. It is the curvature K-FAC and EK-FAC approximate, and what
influence at scale is usually computed with.

One batch's product, for every vector v, in reverse mode only (so it runs wherever the
gradient does, recurrent layers included): with the outputs F(θ) of the batch and a dummy
cotangent u, Jv = ∂/∂u ⟨Jᵀu, v⟩ (the "double-vjp" trick), then Λ(Jv) by forward-over-reverse
differentiation of the loss with respect to the outputs (cheap: output-sized), then
Jᵀ(ΛJv) by one more backward pass. Cost per vector: about three backward passes of the batch;
with ``cache_graphs`` the graphs of F and Jᵀu are kept per chunk and only two remain.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp

from ..objective import Objective
from .base import CurvatureOperator


class GGNOperator(CurvatureOperator):
    """Matrix-free G = (1/n) Σ_i J_iᵀ Λ_i J_i + wd·I of an :class:`Objective` (M × M, symmetric PSD
    for a loss convex in the outputs).

    Parameters
    ----------
    objective:
        The model, task, training data and weight decay; G is taken at θ̃.
    max_vectors:
        Vectors pushed through one pass over the data together.
    cache_graphs:
        Keep every training chunk's graphs (of the outputs and of Jᵀu) between products; worth it
        for small networks under long sequences of products.
    """

    kind = "ggn"

    def __init__(self, objective: Objective, max_vectors: int = 32, cache_graphs: bool = False) -> None:
        super().__init__(objective, max_vectors=max_vectors, cache_graphs=cache_graphs)

    def _graph(self, x, key: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(θ leaf, outputs F with its graph, dummy cotangent u, Jᵀu with its graph) for a batch."""
        def build() -> tuple[Tensor, Tensor, Tensor, Tensor]:
            with torch.enable_grad():
                theta = self.objective.theta.detach().requires_grad_(True)
                out = self.objective.forward(theta, x)
                u = torch.zeros_like(out, requires_grad=True)
                (jtu,) = torch.autograd.grad(out, theta, grad_outputs=u, create_graph=True)
            return theta, out, u, jtu

        return self._kept_graph(key, build)

    def _output_curvature(self, out: Tensor, y: Tensor, directions: Tensor) -> Tensor:
        """Λ w for each output-space direction w (one per row of ``directions``), Λ the per-sample
        Hessian of the training loss with respect to the outputs (block-diagonal over samples)."""
        loss = self.objective.task.loss
        point = out.detach()

        def total(o: Tensor) -> Tensor:
            return loss(o, y).sum()

        return torch.stack([jvp(grad(total), (point,), (w,))[1] for w in directions])

    def batch_product(self, rows: Tensor, x, y: Tensor, key: int | None) -> Tensor:
        theta, out, u, jtu = self._graph(x, key)
        keep = self._keeps_graphs(key)
        with torch.enable_grad():
            Jv = torch.stack([torch.autograd.grad(jtu, u, grad_outputs=v, retain_graph=True)[0] for v in rows])
        LJv = self._output_curvature(out, y, Jv)
        last = rows.shape[0] - 1
        with torch.enable_grad():
            result = [torch.autograd.grad(out, theta, grad_outputs=w, retain_graph=keep or i < last)[0]
                      for i, w in enumerate(LJv)]
        return torch.stack(result)
