"""Bad input gets a clear error (or warning) that names the problem and the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scalable_hbt import (DenseCurvature, DenseTooLargeError, HessianOperator, IndefiniteDampingError, InputError,
                          Objective, Toolbox, TrainModeWarning)
from conftest import brute_force_hessian, make_problem, tiny_mlp


def _data(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_non_finite_parameters():
    model = tiny_mlp().double()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"parameter '0.weight' contains NaN"):
        Objective(model, "cross_entropy", _data(), dtype=torch.float64)


def test_non_finite_training_and_test_data():
    X, y = _data()
    X[5, 1] = float("inf")
    with pytest.raises(InputError, match=r"samples \[5\] contain NaN or Inf"):
        Objective(tiny_mlp(), "cross_entropy", (X, y), dtype=torch.float64, batch_size=8).gradient()
    obj = make_problem("mlp")
    Xt = torch.randn(3, 4, dtype=torch.float64)
    Xt[2, 0] = float("nan")
    with pytest.raises(InputError, match=r"test data: inputs of samples \[2\]"):
        Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").influence(Xt, torch.tensor([0, 1, 2]))


def test_wrong_shapes():
    X, y = _data()
    with pytest.raises(InputError, match="first dimension of X and y must agree"):
        Objective(tiny_mlp(), "cross_entropy", (X, y[:-1]))
    with pytest.raises(InputError, match="cannot be evaluated on the training inputs"):
        Objective(tiny_mlp(), "cross_entropy", (X[:, :3], y))
    obj = make_problem("mlp")
    with pytest.raises(InputError, match=r"one input has shape \(5,\), but training inputs have shape \(4,\)"):
        Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").influence(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="regression targets"):
        Objective(tiny_mlp(), "mse", (X, torch.randn(20, 2, dtype=torch.float64)), dtype=torch.float64)
    with pytest.raises(InputError, match=r"per-sample losses of shape \(2,\)"):
        Objective(tiny_mlp(), lambda out, t: nn.functional.cross_entropy(out, t), (X, y), dtype=torch.float64)
    with pytest.raises(InputError, match=r"expected a vector \(M,\) or a matrix \(M, k\)"):
        HessianOperator(obj).matvec(torch.ones(3, dtype=torch.float64))


def test_missing_targets_and_bad_options():
    obj = make_problem("mlp")
    tb = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    Xt = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="has no targets; pass y or use labels='predicted'"):
        tb.influence(Xt)
    with pytest.raises(InputError, match="labels = 'truth': expected one of"):
        tb.influence(Xt, torch.tensor([0, 1]), labels="truth")
    with pytest.raises(InputError, match="test_loss = 'mean': expected one of"):
        tb.influence(Xt, torch.tensor([0, 1]), test_loss="mean")
    with pytest.raises(InputError, match="inverse = 'magic': expected one of"):
        Toolbox(obj, inverse="magic")
    with pytest.raises(InputError, match="damping = -1: expected a number"):
        Toolbox(obj, damping=-1, inverse="dense", eigen="dense")
    with pytest.raises(InputError, match="unknown loss 'hinge'"):
        Objective(tiny_mlp(), "hinge", _data())
    X, y = _data()
    reg = Objective(tiny_mlp(), "mse", (X, torch.randn(20, 3, dtype=torch.float64)), dtype=torch.float64, progress=False)
    with pytest.raises(InputError, match="labels='predicted' needs a classification loss"):
        Toolbox(reg, damping="auto", inverse="dense", eigen="dense").extrapolation_score(X[:2])


def test_indefinite_damping_names_lambda_min_and_a_safe_damping():
    obj = make_problem("cnn")  # random weights: H has negative eigenvalues
    lam_min = torch.linalg.eigvalsh(brute_force_hessian(obj))[0].item()
    assert lam_min < 0
    tb = Toolbox(obj, damping=0.5 * abs(lam_min), inverse="dense", eigen="dense")
    with pytest.raises(IndefiniteDampingError) as info:
        tb.influence(torch.randn(2, 1, 16, dtype=torch.float64), torch.tensor([0, 1]))
    assert info.value.min_eigenvalue == pytest.approx(lam_min, abs=1e-10)
    assert info.value.suggested_damping == pytest.approx(abs(lam_min) + 0.01)
    assert "λ_min" in str(info.value) and "damping='auto'" in str(info.value)
    auto = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    assert auto.damping == pytest.approx(abs(lam_min) + 0.01, abs=1e-10)
    # a standalone dense backend refuses the same solve
    dense = DenseCurvature().fit(HessianOperator(obj))
    with pytest.raises(IndefiniteDampingError):
        dense.solve(torch.ones(obj.num_params, 1, dtype=torch.float64), 0.0)


def test_auto_damping_without_a_spectral_backend_uses_arpack():
    obj = make_problem("mlp")
    tb = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    exact = -torch.linalg.eigvalsh(brute_force_hessian(obj))[0].item()
    assert tb._estimate_min_eigenvalue() == pytest.approx(-exact, abs=1e-6)


def test_train_mode_with_dropout_warns_and_uses_eval_mode():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double().train()
    with pytest.warns(TrainModeWarning, match="eval mode"):
        obj = Objective(model, "cross_entropy", _data(), dtype=torch.float64, progress=False)
    assert model.training  # the caller's module is untouched
    v = torch.ones(obj.num_params, dtype=torch.float64)
    op = HessianOperator(obj)
    # the curvature is the eval-mode one (dropout off): the brute-force Hessian of an eval copy
    X, y = _data()
    H = brute_force_hessian(obj, data=(X, y), model=copy.deepcopy(model).eval())
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)


def test_dense_refuses_when_m_squared_does_not_fit():
    obj = make_problem("mlp")
    M = obj.num_params
    with pytest.raises(DenseTooLargeError, match=r"M = 43 parameters needs about .* inverse='cg' or 'lissa'"):
        DenseCurvature(max_memory=DenseCurvature.required_bytes(M) - 1).fit(HessianOperator(obj))
    big = nn.Linear(2000, 2000)  # M ≈ 4e6: M² float64 ≈ 128 TB
    X = torch.randn(4, 2000)
    obj_big = Objective(big, "mse", (X, torch.randn(4, 2000)), progress=False)
    with pytest.raises(DenseTooLargeError, match="eigen='lanczos'"):
        Toolbox(obj_big, damping=1.0, inverse="dense", eigen="dense").fit()
