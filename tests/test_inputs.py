"""Bad input is refused before any work, with a message that names the problem and the fix."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from scalable_hbt import DenseCurvature, HessianOperator, IndefiniteDampingError, InputError, Objective, Toolbox
from scalable_hbt.cache import fingerprint
from scalable_hbt.curvature import CGCurvature, LiSSACurvature, LowRankCurvature
from scalable_hbt.errors import SolverDivergenceError
from conftest import CUDA, make_problem, tiny_mlp


def _data(n: int = 20, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _objective(X, y, loss="cross_entropy", model=None, **kw):
    if model is None:
        torch.manual_seed(0)
        model = tiny_mlp()
    return Objective(model, loss, (X, y), dtype=torch.float64, progress=False, **kw)


# ------------------------------------------------------------------ targets
def test_class_labels_outside_the_outputs_are_named_with_their_samples():
    X, y = _data()
    y[7] = 3  # the model has 3 outputs: classes 0, 1, 2
    with pytest.raises(InputError, match=r"samples \[7\] are \[3\], outside \[0, 3\)"):
        _objective(X, y)
    y[7] = -100  # torch's ignore_index: silently a zero loss without the check
    with pytest.raises(InputError, match=r"samples \[7\] are \[-100\].*no ignore index"):
        _objective(X, y)
    X, y = _data()
    obj = _objective(X, y)
    with pytest.raises(InputError, match=r"test data: class labels of samples \[1\]"):
        Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").influence(X[:2], torch.tensor([0, 5]))


def test_regression_test_targets_get_the_training_shape_check():
    """(T,) targets against (T, 1) outputs would broadcast to (T, T) inside the loss."""
    X, _ = _data()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    obj = _objective(X, torch.randn(20, 1, dtype=torch.float64), loss="mse", model=model)
    tb = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    with pytest.raises(InputError, match=r"per-sample shape \(\) but the model outputs \(1,\).*y.view\(-1, 1\)"):
        tb.rue(X[:4], torch.randn(4, dtype=torch.float64), n_bootstrap=4)
    with pytest.raises(InputError, match=r"per-sample shape \(\) but the model outputs \(1,\)"):
        tb.influence(X[:4], torch.randn(4, dtype=torch.float64))


def test_nan_targets_are_named_by_sample():
    X, _ = _data()
    y = torch.randn(20, 3, dtype=torch.float64)
    y[3, 1] = math.nan
    with pytest.raises(InputError, match=r"targets of samples \[3\] contain NaN"):
        _objective(X, y, loss="mse")


def test_numpy_arrays_are_accepted_and_other_pairs_named():
    X, y = _data()
    a = _objective(X.numpy(), y.numpy())
    b = _objective(X, y)
    torch.testing.assert_close(a.gradient(), b.gradient(), rtol=0, atol=0)
    with pytest.raises(InputError, match=r"got a tuple of \(ndarray, list\)"):
        _objective(X.numpy(), y.tolist())


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("make, message", [
    (lambda obj: Toolbox(obj, damping=math.inf), r"damping = inf: expected a number ≥ 0 \(finite\)"),
    (lambda obj: Toolbox(obj, damping=math.nan), r"damping = nan: expected a number"),
    (lambda obj: Objective(tiny_mlp(), "cross_entropy", _data(), weight_decay=math.inf), r"weight_decay = inf"),
    (lambda obj: Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").extrapolation_score(
        obj.train.take(range(2))[0], threshold=math.nan), r"threshold = nan"),
    (lambda obj: Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").rue(
        *obj.train.take(range(2)), seed=None), r"seed = None: expected an integer ≥ 0"),
    (lambda obj: Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").rue(
        *obj.train.take(range(2)), seed=2.7), r"seed = 2.7: expected an integer ≥ 0"),
    (lambda obj: Toolbox(obj, damping=1.0, inverse="dense", eigen="dense").rue(
        *obj.train.take(range(2)), n_bootstrap=1), r"n_bootstrap = 1: expected an integer ≥ 2"),
    (lambda obj: Toolbox(obj, inverse="cg", inverse_options={"rtol": "tight"}), r"cg: rtol = 'tight'"),
    (lambda obj: Toolbox(obj, inverse="cg", inverse_options={"rtl": 1e-8}),
     r"inverse_options: the 'cg' backend takes no option\(s\) \['rtl'\]"),
])
def test_bad_numbers_are_refused_with_the_setting_named(make, message):
    obj = make_problem("mlp")
    with pytest.raises(InputError, match=message):
        make(obj)


def test_half_precision_accumulators_are_refused_naming_compute_dtype():
    """Half precision belongs to the forward pass (compute_dtype), never to θ and the solves."""
    X, y = _data()
    with pytest.raises(InputError, match=r"dtype = torch.bfloat16: expected torch.float32 or torch.float64.*"
                                         r"compute_dtype=torch.bfloat16"):
        Objective(tiny_mlp(), "cross_entropy", (X, y), dtype=torch.bfloat16)
    with pytest.raises(InputError, match="compute_dtype = torch.float64 is wider than dtype = torch.float32"):
        Objective(tiny_mlp(), "cross_entropy", (X, y), dtype=torch.float32, compute_dtype=torch.float64)


# ------------------------------------------------------------------ indefinite damping and diverging solvers
def test_cg_reports_a_bound_on_lambda_min_and_suggests_auto():
    obj = make_problem("cnn")
    op = HessianOperator(obj)
    evals, evecs = torch.linalg.eigh(op.dense())
    assert evals[0] < 0
    cg = CGCurvature().fit(op)
    with pytest.raises(IndefiniteDampingError) as info:
        cg.solve(evecs[:, :1] + 0.3 * evecs[:, 1:2], 0.0)
    text = str(info.value)
    assert "upper bound on λ_min" in text and "damping='auto'" in text
    assert info.value.evidence == "bound" and info.value.min_eigenvalue >= evals[0].item() - 1e-9


def test_lowrank_refuses_an_explicit_damping_that_leaves_h_indefinite():
    obj = make_problem("cnn")
    lam_min = DenseCurvature().fit(HessianOperator(obj)).min_eigenvalue()
    assert lam_min < -0.05
    tb = Toolbox(obj, damping=0.5 * abs(lam_min), inverse="lowrank", eigen="lanczos",
                 inverse_options={"m": 10})
    with pytest.raises(IndefiniteDampingError, match="lowrank"):
        tb.influence(*obj.train.take(range(2)))
    ok = Toolbox(obj, damping=abs(lam_min) + 0.05, inverse=LowRankCurvature(m=10), eigen="lanczos")
    assert torch.isfinite(ok.influence(*obj.train.take(range(2)))).all()


def test_lissa_with_a_scale_just_below_stability_raises_naming_the_scale():
    """s = 0.49·(λ_max + δ): the top direction grows by |1 − (λ_max + δ)/s| ≈ 1.04 per step, too
    slowly for the growth check within 200 steps; the residual estimate catches it."""
    obj = make_problem("mlp")
    op = HessianOperator(obj)
    dense = DenseCurvature().fit(op)
    damping = abs(min(dense.min_eigenvalue(), 0.0)) + 0.1
    lam_max = dense.eigh(1)[0].item()
    scale = 0.49 * (lam_max + damping)
    lissa = LiSSACurvature(scale=scale, batch_size=obj.n, depth=200, deflate=0, progress=False).fit(op)
    V = torch.randn(obj.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SolverDivergenceError, match=rf"scale s = {scale:.6g}.*Use scale ≥"):
        lissa.solve(V, damping)


# ------------------------------------------------------------------ fingerprints see the code a model runs
_NET = '''
import torch
from torch import nn


def activation(x):
    return torch.{fn}(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(activation(self.a(x)))
'''


def _net_from_source(tmp_path, fn: str) -> nn.Module:
    (tmp_path / "fingerprinted_net.py").write_text(_NET.format(fn=fn))
    sys.modules.pop("fingerprinted_net", None)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("fingerprinted_net")
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    return module.Net().double()


def test_changing_a_helper_the_forward_calls_changes_the_cache_key(tmp_path):
    X, y = _data()
    keys = []
    for fn in ("tanh", "sigmoid"):
        obj = _objective(X, y, model=_net_from_source(tmp_path, fn))
        keys.append(fingerprint(obj, DenseCurvature()))
    sys.modules.pop("fingerprinted_net", None)
    assert keys[0] != keys[1]


# ------------------------------------------------------------------ devices
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_scipy_adapter_and_auto_damping_on_cuda():
    obj = make_problem("mlp", device="cuda")
    op = HessianOperator(obj)
    v = np.random.default_rng(0).standard_normal(obj.num_params)
    out = op.to_scipy(0.5) @ v
    ref = (op.matvec(torch.as_tensor(v, device="cuda")) + 0.5 * torch.as_tensor(v, device="cuda")).cpu().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    tb = Toolbox(obj, damping="auto", inverse="cg", eigen="lanczos", eigen_options={"method": "scipy", "m": 3})
    assert tb.damping > 0 and tb.extrapolation_score(obj.train.take(range(2))[0], m=3).shape == (2,)
