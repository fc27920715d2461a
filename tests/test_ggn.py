"""The Gauss–Newton operator against a brute-force G = (1/n) Σ J_iᵀ Λ_i J_i + wd·I built from the
raw module (torch.func on the nn.Module, the loss written out), and every backend on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from scalable_hbt import DenseCurvature, Objective, Toolbox
from scalable_hbt.curvature import EKFACCurvature, KFACCurvature
from scalable_hbt.operators import GGNOperator
from conftest import DEVICES, make_problem


def _raw_ggn(model: nn.Module, X: torch.Tensor, y: torch.Tensor, wd: float, loss: str) -> torch.Tensor:
    """G from the module itself: J_i by torch.autograd.functional.jacobian of functional_call on
    a flat vector assembled here, Λ_i in closed form (softmax cross-entropy, or 2/K·I for the
    mean squared error)."""
    named = [(k, p.detach().to(torch.float64)) for k, p in model.named_parameters()]
    theta = torch.cat([p.reshape(-1) for _, p in named])
    sizes = [p.numel() for _, p in named]
    model = model.to(torch.float64)

    def outputs(t: torch.Tensor) -> torch.Tensor:
        params = {k: part.view(p.shape) for (k, p), part in zip(named, torch.split(t, sizes))}
        return functional_call(model, params, (X,))

    J = torch.autograd.functional.jacobian(outputs, theta)  # (n, K, M)
    out = outputs(theta)
    K = out.shape[1]
    if loss == "cross_entropy":
        p = F.softmax(out, dim=1)
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        Lam = (2.0 / K) * torch.eye(K, dtype=torch.float64).expand(len(X), K, K)
    n = len(X)
    return torch.einsum("nkm,nkl,nlj->mj", J, Lam, J) / n + wd * torch.eye(theta.numel(), dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_products_equal_brute_force(kind, device):
    obj = make_problem(kind, device=device)
    X, y = obj.train.take(range(obj.n))
    G_ref = _raw_ggn(obj.model.cpu() if device == "cpu" else obj.model, X.to(obj.device), y, obj.weight_decay,
                     "cross_entropy")
    op = GGNOperator(obj)
    V = torch.randn(obj.num_params, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matmat(V.to(obj.device)).cpu(), G_ref.cpu() @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense().cpu(), G_ref.cpu(), rtol=1e-10, atol=1e-12)
    assert op.num_hvps == 5 + obj.num_params


def test_ggn_of_mse_and_its_cached_graphs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    X = torch.randn(30, 3, dtype=torch.float64)
    Y = torch.randn(30, 2, dtype=torch.float64)
    obj = Objective(model, "mse", (X, Y), weight_decay=1e-3, batch_size=7, dtype=torch.float64, progress=False)
    G_ref = _raw_ggn(obj.model, X, Y, 1e-3, "mse")
    V = torch.randn(obj.num_params, 3, dtype=torch.float64)
    plain = GGNOperator(obj).matmat(V)
    cached = GGNOperator(obj, cache_graphs=True)
    first, second = cached.matmat(V), cached.matmat(V)
    torch.testing.assert_close(plain, G_ref @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first, plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second, plain, rtol=1e-12, atol=1e-14)


def test_ggn_is_positive_semidefinite_and_auto_damping_is_small():
    obj = make_problem("cnn")
    evals = torch.linalg.eigvalsh(GGNOperator(obj).dense())
    assert evals[0] >= obj.weight_decay - 1e-10  # the loss part is PSD; wd·I shifts it
    tb = Toolbox(obj, damping="auto", curvature="ggn", inverse="dense", eigen="dense")
    assert tb.damping == pytest.approx(0.01)  # max(−λ_min, 0) + 0.01 with λ_min > 0
    assert tb.diagnostics["curvature"] == "ggn"


@pytest.mark.parametrize("inverse", ["cg", "lissa", "lowrank"])
def test_matrix_free_backends_on_the_ggn_match_the_dense_ggn(inverse):
    obj = make_problem("mlp", n=24)
    Xt, yt = obj.train.take(range(3))
    exact = Toolbox(obj, damping=0.3, curvature="ggn", inverse="dense", eigen="dense")
    options = {"lissa": {"batch_size": 24, "deflate": 8, "target": 1e-8},
               "lowrank": {"m": obj.num_params, "tol": 1e-12}}.get(inverse)
    tb = Toolbox(obj, damping=0.3, curvature="ggn", inverse=inverse, inverse_options=options, eigen="lanczos",
                 eigen_options={"m": 6, "tol": 1e-12})
    I_exact, I = exact.influence(Xt, yt), tb.influence(Xt, yt)
    tol = {"cg": 1e-8, "lissa": 1e-5, "lowrank": 1e-7}[inverse]
    assert ((I - I_exact).norm() / I_exact.norm()).item() <= tol
    torch.testing.assert_close(tb.extrapolation_score(Xt, m=6), exact.extrapolation_score(Xt, m=6),
                               rtol=1e-7, atol=1e-10)


def test_kfac_is_exact_for_one_linear_layer_under_mse_on_the_ggn():
    """For a single Linear layer under MSE the GGN block is exactly G ⊗ A: K-FAC and EK-FAC
    reproduce the dense GGN, and EK-FAC is never farther from it than K-FAC."""
    torch.manual_seed(2)
    model = nn.Linear(4, 3)
    X = torch.randn(50, 4, dtype=torch.float64)
    obj = Objective(model, "mse", (X, torch.randn(50, 3, dtype=torch.float64)), weight_decay=1e-2,
                    dtype=torch.float64, progress=False)
    op = GGNOperator(obj)
    G = op.dense()
    for backend in (KFACCurvature(), EKFACCurvature()):
        torch.testing.assert_close(backend.fit(op).dense_matrix(), G, rtol=1e-10, atol=1e-12)
    cnn = make_problem("cnn")
    op = GGNOperator(cnn)
    G = op.dense()
    err = {b.name: (b.fit(op).dense_matrix() - G).norm().item() for b in (KFACCurvature(), EKFACCurvature())}
    assert err["ekfac"] <= err["kfac"] * (1 + 1e-12)


def test_dense_ggn_backend_and_cg_agree_on_influence_with_a_tiny_damping():
    obj = make_problem("cnn")
    Xt, yt = obj.train.take(range(4))
    dense = Toolbox(obj, damping=1e-4, curvature="ggn", inverse="dense", eigen="dense")
    cg = Toolbox(obj, damping=1e-4, curvature="ggn", inverse="cg", eigen="lanczos",
                 inverse_options={"rtol": 1e-12, "max_iter": 5000})
    I_dense, I_cg = dense.influence(Xt, yt), cg.influence(Xt, yt)
    assert ((I_cg - I_dense).norm() / I_dense.norm()).item() <= 1e-6
    assert isinstance(dense.inverse, DenseCurvature) and dense.inverse.min_eigenvalue() > 0
