"""Block CG: k right-hand sides cost one ``matmat`` per iteration, and the block solve is the
column-by-column solve (float64, against the brute-force Hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from scalable_hbt import HessianOperator
from scalable_hbt.curvature.cg import conjugate_gradients

from conftest import brute_force_hessian, make_problem


class CountingOperator:
    """Forwards to a HessianOperator and records the column count of every ``matmat`` / ``matvec``."""

    def __init__(self, base: HessianOperator) -> None:
        self.base = base
        self.matmat_columns: list[int] = []
        self.matvec_calls = 0

    shape = property(lambda self: self.base.shape)
    dtype = property(lambda self: self.base.dtype)
    device = property(lambda self: self.base.device)
    num_hvps = property(lambda self: self.base.num_hvps)

    def matmat(self, V: Tensor) -> Tensor:
        self.matmat_columns.append(V.shape[1])
        return self.base.matmat(V)

    def matvec(self, v: Tensor) -> Tensor:
        self.matvec_calls += 1
        return self.base.matvec(v)


@pytest.fixture(scope="module")
def problem():
    obj = make_problem("cnn", n=30)
    H = brute_force_hessian(obj)
    shift = max(-torch.linalg.eigvalsh(H)[0].item(), 0.0) + 0.05
    return obj, H, shift


def test_one_matmat_per_iteration_for_a_block(problem):
    obj, H, shift = problem
    k = 6
    B = torch.randn(obj.num_params, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = CountingOperator(HessianOperator(obj))
    X, info = conjugate_gradients(op, B, shift, rtol=1e-12, max_iter=500)

    assert info["converged"]
    assert op.matvec_calls == 0
    assert len(op.matmat_columns) == info["iterations"]
    assert op.matmat_columns[0] == k                        # all columns in the first product
    assert all(c <= k for c in op.matmat_columns)           # converged columns leave the block
    assert op.num_hvps == sum(op.matmat_columns)
    exact = torch.linalg.solve(H + shift * torch.eye(obj.num_params, dtype=torch.float64), B)
    assert ((X - exact).norm(dim=0) / exact.norm(dim=0)).max().item() < 1e-9


def test_block_solve_equals_single_solves(problem):
    obj, _, shift = problem
    B = torch.randn(obj.num_params, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    X, _ = conjugate_gradients(HessianOperator(obj), B, shift, rtol=1e-12, max_iter=500)
    for j in range(B.shape[1]):
        xj, _ = conjugate_gradients(HessianOperator(obj), B[:, j:j + 1], shift, rtol=1e-12, max_iter=500)
        assert ((X[:, j:j + 1] - xj).norm() / xj.norm()).item() < 1e-10
