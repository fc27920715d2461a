"""K-FAC / EK-FAC backends against brute-force GGN, Hessian and the dense oracle (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from scalable_hbt import HessianOperator, InputError, Objective
from scalable_hbt.curvature.kfac import EKFACCurvature, KFACCurvature, KFACFallbackWarning
from conftest import (brute_force_ggn, brute_force_gradients, brute_force_hessian, brute_force_kronecker_factors,
                      kronecker_matrix, make_problem, register_data, training_tensors)

BACKENDS = [KFACCurvature, EKFACCurvature]


def _fit(cls, obj, **kw):
    return cls(**kw).fit(HessianOperator(obj))


def _rel(A, B):
    return ((A - B).norm() / B.norm()).item()


def _regression(bias=True, n=30, K=3, wd=1e-2):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    Y = torch.randn(n, K, generator=gen, dtype=torch.float64)
    torch.manual_seed(3)
    return register_data(Objective(nn.Linear(4, K, bias=bias), "mse", (X, Y), weight_decay=wd, batch_size=7,
                                   dtype=torch.float64, progress=False), X, Y)


# --------------------------------------------------------------------------- 1. exactness
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls", BACKENDS)
def test_exact_for_single_linear_layer_with_mse(cls, bias):
    """One Linear layer under MSE: GGN = Hessian = (2/K)·I ⊗ E[x̃x̃ᵀ] + wd·I, which K-FAC represents exactly."""
    obj = _regression(bias)
    H = brute_force_hessian(obj)
    kf = _fit(cls, obj)
    torch.testing.assert_close(kf.dense_matrix(), H, rtol=0, atol=1e-10)
    V = torch.randn(obj.num_params, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    damping = 0.3
    ref = torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), V)
    torch.testing.assert_close(kf.solve(V, damping), ref, rtol=1e-10, atol=1e-12)
    # the implied matrix of solve agrees with dense_matrix
    Minv = kf.solve(torch.eye(len(H), dtype=H.dtype), damping)
    torch.testing.assert_close(torch.linalg.inv(Minv) - damping * torch.eye(len(H), dtype=H.dtype), H,
                               rtol=0, atol=1e-10)
    assert kf.diagnostics["kronecker_params"] == obj.num_params and kf.diagnostics["diagonal_params"] == 0


# --------------------------------------------------------------------------- 2. tiny models
def _trained(kind: str) -> Objective:
    """make_problem's model after 300 full-batch Adam steps (curvature near a minimum)."""
    obj0 = make_problem(kind)
    X, y = training_tensors(obj0)
    model = obj0.model
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y) + 0.5 * obj0.weight_decay * sum(
            p.square().sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return register_data(Objective(model, "cross_entropy", (X, y), weight_decay=obj0.weight_decay, batch_size=16,
                                   dtype=torch.float64, progress=False), X, y)


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tiny_models_against_exact_ggn_and_hessian(kind, trained, capsys):
    obj = _trained(kind) if trained else make_problem(kind)
    H = brute_force_hessian(obj)
    ggn = brute_force_ggn(obj)
    kf, ek = _fit(KFACCurvature, obj), _fit(EKFACCurvature, obj)
    Hk, He = kf.dense_matrix(), ek.dense_matrix()
    # both are their definitions, assembled from independently computed factors (round-off: 1e-15)
    factors = brute_force_kronecker_factors(obj)
    torch.testing.assert_close(Hk, kronecker_matrix(obj, factors, corrected=False), rtol=0, atol=1e-12)
    torch.testing.assert_close(He, kronecker_matrix(obj, factors, corrected=True), rtol=0, atol=1e-12)

    # EK-FAC eigenvalues are exactly the diagonal of each GGN block in the Kronecker eigenbasis
    for lk, le in zip(kf.layers, ek.layers):
        idx = le.flat_index()
        Q = torch.kron(le.QG, le.QA)
        torch.testing.assert_close(le.S.reshape(-1), torch.diagonal(Q.T @ ggn[idx][:, idx] @ Q)
                                   - obj.weight_decay, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(lk.QA, le.QA)
    # ... hence, block by block and in total, EK-FAC is at least as close to the GGN as K-FAC
    err_k, err_e = _rel(Hk, ggn), _rel(He, ggn)
    assert err_e <= err_k + 1e-12

    damping = max(0.0, -torch.linalg.eigvalsh(H)[0].item()) + 0.05
    X, y = training_tensors(obj)
    G = brute_force_gradients(obj, X, y)
    eye = torch.eye(len(H), dtype=H.dtype)
    exact = torch.linalg.solve(H + damping * eye, G.T).norm(dim=0)
    ggn_exact = torch.linalg.solve(ggn + damping * eye, G.T).norm(dim=0)
    nk, ne = kf.inverse_norms(G, damping), ek.inverse_norms(G, damping)
    torch.testing.assert_close(nk, torch.linalg.solve(Hk + damping * eye, G.T).norm(dim=0), rtol=1e-10, atol=0)
    torch.testing.assert_close(ne, torch.linalg.solve(He + damping * eye, G.T).norm(dim=0), rtol=1e-10, atol=0)
    rho = {name: spearmanr(v.numpy(), exact.numpy())[0] for name, v in
           [("kfac", nk), ("ekfac", ne), ("ggn", ggn_exact)]}
    rho_ggn = {name: spearmanr(v.numpy(), ggn_exact.numpy())[0] for name, v in [("kfac", nk), ("ekfac", ne)]}
    with capsys.disabled():
        print(f"\n[{kind}, {'trained' if trained else 'init'}] M={obj.num_params} δ={damping:.3f} rel.Frobenius vs GGN: kfac {err_k:.4f} ekfac {err_e:.4f}; "
              f"vs Hessian: kfac {_rel(Hk, H):.4f} ekfac {_rel(He, H):.4f}; Spearman of ‖H_δ⁻¹g_r‖ vs exact "
              f"Hessian: {', '.join(f'{k} {v:.3f}' for k, v in rho.items())}; vs exact GGN: "
              f"{', '.join(f'{k} {v:.3f}' for k, v in rho_ggn.items())}; median |ratio-1| "
              f"kfac {(nk / exact - 1).abs().median():.3f} ekfac {(ne / exact - 1).abs().median():.3f}")
    # These tiny models are untrained, so H differs strongly from the GGN (even the exact GGN
    # normalisers rank-correlate only weakly with the Hessian ones on the CNN): assert against the
    # GGN, which is what K-FAC/EK-FAC approximate, and only report the Hessian comparison.
    assert rho_ggn["kfac"] > 0.7 and rho_ggn["ekfac"] > 0.7
    if trained:  # near a minimum the GGN is close to H and the normalisers rank like the exact ones
        assert rho["kfac"] > 0.8 and rho["ekfac"] > 0.8


# --------------------------------------------------------------------------- 3. conv + fallback
class _Scale(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, k))

    def forward(self, x):
        return x * self.scale


def _obj(model, X, y, wd=1e-2, loss="cross_entropy"):
    return register_data(Objective(model.double().eval(), loss, (X, y), weight_decay=wd, batch_size=5,
                                   dtype=torch.float64, progress=False), X, y)


def test_conv_factor_shapes_and_exact_corrected_diagonal():
    """Conv2d (stride, padding, dilation, no bias) and Conv1d (padding='same', circular) factors:
    shapes, coverage and the EK-FAC diagonal against the brute-force GGN (checks the unfolding)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net2 = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1, bias=False), nn.Tanh(),
                         nn.Conv2d(3, 2, (2, 3), dilation=(1, 2)), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(2 * 2 * 1, 3))
    obj2 = _obj(net2, torch.randn(12, 2, 6, 9, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen))
    net1 = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"), nn.Tanh(),
                         nn.Conv1d(3, 2, 2, stride=2, dilation=2, padding=1), nn.Flatten(), nn.Linear(16, 2))
    obj1 = _obj(net1, torch.randn(12, 2, 15, generator=gen, dtype=torch.float64), torch.randn(12, 2, generator=gen, dtype=torch.float64), loss="mse")
    shapes2 = [((2 * 9, 2 * 9), (3, 3)), ((3 * 6 + 1, 3 * 6 + 1), (2, 2)), ((5, 5), (3, 3))]
    shapes1 = [((2 * 3 + 1,) * 2, (3, 3)), ((3 * 2 + 1,) * 2, (2, 2)), ((17, 17), (2, 2))]
    for obj, shapes in [(obj2, shapes2), (obj1, shapes1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", KFACFallbackWarning)
            ek = _fit(EKFACCurvature, obj)
        assert [(d["A"], d["G"]) for d in ek.diagnostics["layers"]] == shapes
        assert ek.diagnostics["kronecker_params"] == obj.num_params
        ggn = brute_force_ggn(obj)
        for layer in ek.layers:
            idx = layer.flat_index()
            Q = torch.kron(layer.QG, layer.QA)
            torch.testing.assert_close(layer.S.reshape(-1), torch.diagonal(Q.T @ ggn[idx][:, idx] @ Q)
                                       - obj.weight_decay, rtol=1e-9, atol=1e-12)
        # the unfolding (stride, padding, dilation, 'same', circular) against explicitly sliced patches
        factors = brute_force_kronecker_factors(obj)
        assert [(tuple(f["A"].shape), tuple(f["G"].shape)) for f in factors] == shapes
        scale = ggn.abs().max().item()
        torch.testing.assert_close(_fit(KFACCurvature, obj).dense_matrix(), kronecker_matrix(obj, factors, False),
                                   rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(ek.dense_matrix(), kronecker_matrix(obj, factors, True), rtol=0, atol=1e-12 * scale)


def test_diagonal_fallback_warns_once_and_is_the_ggn_diagonal():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), _Scale(5), nn.Linear(5, 3))
    obj = _obj(model, torch.randn(15, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (15,), generator=gen))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kf = _fit(KFACCurvature, obj)
    fallback = [w for w in rec if issubclass(w.category, KFACFallbackWarning)]
    assert len(fallback) == 1
    for name in ("1.weight", "1.bias", "3.scale"):
        assert name in str(fallback[0].message)
    assert kf.diagnostics["diagonal_params"] == 5 + 5 + 5
    assert kf.diagnostics["kronecker_params"] == 25 + 18
    ggn = brute_force_ggn(obj)
    idx = kf.diag_index
    torch.testing.assert_close(kf.diag, torch.diagonal(ggn)[idx] - obj.weight_decay, rtol=1e-9, atol=1e-12)
    V = torch.randn(obj.num_params, 2, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(kf.solve(V, 0.1)[idx], V[idx] / (torch.diagonal(ggn)[idx] + 0.1).unsqueeze(1))
    # the whole solve: Kronecker blocks from independent factors, the GGN diagonal elsewhere
    C = kronecker_matrix(obj, brute_force_kronecker_factors(obj), corrected=False, ggn=ggn)
    torch.testing.assert_close(kf.solve(V, 0.1), torch.linalg.solve(C + 0.1 * torch.eye(len(C), dtype=C.dtype), V),
                               rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- 4. inverse_norms shortcut
@pytest.mark.parametrize("cls", BACKENDS)
def test_inverse_norms_equal_norm_of_solve(cls):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(1, 3, 5, padding=1), nn.ReLU(), _Scale(14), nn.Flatten(), nn.Linear(42, 2))
    gen = torch.Generator().manual_seed(2)
    obj = _obj(model, torch.randn(10, 1, 16, generator=gen, dtype=torch.float64), torch.randint(0, 2, (10,), generator=gen))
    with pytest.warns(KFACFallbackWarning, match="2.scale"):
        kf = _fit(cls, obj)
    X, y = training_tensors(obj)
    G = brute_force_gradients(obj, X, y)
    C = kronecker_matrix(obj, brute_force_kronecker_factors(obj), corrected=cls is EKFACCurvature,
                         ggn=brute_force_ggn(obj))
    for damping in (1e-3, 0.5):
        torch.testing.assert_close(kf.inverse_norms(G, damping), kf.solve(G.T, damping).norm(dim=0),
                                   rtol=1e-12, atol=0)
        # ‖(Ĉ + δI)⁻¹ g_r‖ with Ĉ of the backend's definition, assembled independently
        ref = torch.linalg.solve(C + damping * torch.eye(len(C), dtype=C.dtype), G.T).norm(dim=0)
        torch.testing.assert_close(kf.inverse_norms(G, damping), ref, rtol=1e-9, atol=0)
    with pytest.warns(KFACFallbackWarning), pytest.raises(InputError, match="damping"):
        cls().fit(HessianOperator(_obj(model, X, y, wd=0.0))).solve(G.T, 0.0)


# --------------------------------------------------------------------------- 5. unsupported layers
def test_grouped_conv_errors_or_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6, 2))
    gen = torch.Generator().manual_seed(0)
    obj = _obj(model, torch.randn(8, 2, 8, generator=gen, dtype=torch.float64), torch.randint(0, 2, (8,), generator=gen))
    with pytest.raises(InputError, match=r"'0'.*groups=2"):
        _fit(KFACCurvature, obj)
    with pytest.warns(KFACFallbackWarning, match=r"0\.weight.*0\.bias"):
        kf = _fit(EKFACCurvature, obj, unsupported="diagonal")
    assert kf.diagnostics["diagonal_params"] == 4 * 1 * 3 + 4
    assert [d["name"] for d in kf.diagnostics["layers"]] == ["2"]
    # the grouped conv gets the exact GGN diagonal, the Linear its EK-FAC block (independent factors)
    ref = kronecker_matrix(obj, brute_force_kronecker_factors(obj), corrected=True, ggn=brute_force_ggn(obj))
    torch.testing.assert_close(kf.dense_matrix(), ref, rtol=0, atol=1e-12 * ref.abs().max().item())


def test_not_fitted_and_bad_shapes():
    obj = _regression()
    with pytest.raises(InputError, match="not fitted"):
        KFACCurvature().solve(torch.zeros(obj.num_params, 1), 0.1)
    kf = _fit(KFACCurvature, obj)
    with pytest.raises(InputError, match="M = 15"):
        kf.solve(torch.zeros(3, 1, dtype=torch.float64), 0.1)
    with pytest.raises(InputError, match="unsupported"):
        KFACCurvature(unsupported="ignore")
