"""The protocol iterative algorithms are written against, and operators derived from another.

CG, Lanczos and LiSSA's recursion need only a symmetric operator A with ``shape``,
``dtype``, ``device``, ``matvec`` / ``matmat`` and a ``num_hvps`` counter (the work done in
units of full-data products). Besides a :class:`~scalable_hbt.operators.base.CurvatureOperator`
itself, the views below satisfy it, so the same algorithm runs on

* ``Scaled(C, −1)`` = −C (the smallest eigenvalue of C as the largest of −C),
* ``Shifted(C, δ)`` = C + δI (the damped curvature),
* ``Projected(C, U)`` = P C P with P = I − U Uᵀ (the complement of a deflated span),
* ``MiniBatch(C, indices)`` = (1/b) Σ_{i∈B} C_i + wd·I (a stochastic curvature).

Each view forwards ``num_hvps`` to the operator underneath, so HVP accounting stays in one place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric M × M operator acting on vectors ``(M,)`` and blocks ``(M, k)``."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def num_hvps(self) -> float: ...

    def matvec(self, v: Tensor) -> Tensor: ...

    def matmat(self, V: Tensor) -> Tensor: ...


class _View(ABC):
    """An operator defined through ``base``; shape, dtype, device and accounting are base's."""

    def __init__(self, base: LinearOperator) -> None:
        self.base = base

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def num_hvps(self) -> float:
        return self.base.num_hvps

    @abstractmethod
    def matmat(self, V: Tensor) -> Tensor:
        """The view's product with ``V (M, k)``."""

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.unsqueeze(1))[:, 0]


class Scaled(_View):
    """α·A."""

    def __init__(self, base: LinearOperator, factor: float) -> None:
        super().__init__(base)
        self.factor = float(factor)

    def matmat(self, V: Tensor) -> Tensor:
        return self.factor * self.base.matmat(V)


class Shifted(_View):
    """A + σI."""

    def __init__(self, base: LinearOperator, shift: float) -> None:
        super().__init__(base)
        self.shift = float(shift)

    def matmat(self, V: Tensor) -> Tensor:
        return self.base.matmat(V).add_(V, alpha=self.shift)


def project_out(basis: Tensor | None, V: Tensor) -> Tensor:
    """(I − U Uᵀ) V for orthonormal columns ``basis`` U ``(M, k)`` (``V`` itself when there is none)."""
    if basis is None or basis.shape[1] == 0:
        return V
    return V - basis @ (basis.T @ V)


class Projected(_View):
    """P A P with P = I − U Uᵀ, U = ``basis`` (M, k) orthonormal: A restricted to the complement of span(U)."""

    def __init__(self, base: LinearOperator, basis: Tensor | None) -> None:
        super().__init__(base)
        self.basis = basis

    def matmat(self, V: Tensor) -> Tensor:
        return project_out(self.basis, self.base.matmat(project_out(self.basis, V)))


class MiniBatch(_View):
    """The curvature of the training samples ``indices`` only: (1/b) Σ_{i∈B} C_i + wd·I."""

    def __init__(self, base, indices: Tensor) -> None:
        super().__init__(base)
        self.indices = indices

    def matmat(self, V: Tensor) -> Tensor:
        return self.base.minibatch_matmat(V, self.indices)
