"""Matrix-free backends (cg, lanczos, lowrank) against the dense oracle in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalable_hbt import DenseCurvature, HessianOperator, IndefiniteDampingError, Toolbox
from scalable_hbt.curvature import CGCurvature, LanczosCurvature, LowRankCurvature
from conftest import make_problem


@pytest.fixture(params=["mlp", "cnn"])
def fitted(request):
    obj = make_problem(request.param)
    op = HessianOperator(obj)
    dense = DenseCurvature().fit(op)
    return obj, op, dense


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_cg_matches_dense_solve(fitted):
    obj, op, dense = fitted
    damping = -dense.min_eigenvalue() + 0.05
    V = torch.randn(obj.num_params, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cg = CGCurvature(rtol=1e-10).fit(op)
    X = cg.solve(V, damping)
    assert _rel(X, dense.solve(V, damping)) <= 1e-6
    assert cg.diagnostics["converged"] and cg.diagnostics["hvps"] > 0


def test_cg_in_column_blocks_of_max_vectors_matches_dense(fitted):
    """max_vectors=2 splits 5 right-hand sides into blocks of 2, 2, 1: same solution, HVPs summed."""
    obj, op, dense = fitted
    damping = -dense.min_eigenvalue() + 0.05
    V = torch.randn(obj.num_params, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cg = CGCurvature(rtol=1e-10).fit(HessianOperator(obj, max_vectors=2))
    assert _rel(cg.solve(V, damping), dense.solve(V, damping)) <= 1e-6
    d = cg.diagnostics
    assert d["converged"] and d["max_relative_residual"] <= 1e-10 and d["hvps"] > d["iterations"]


def test_cg_preconditioned_by_the_exact_inverse_converges_in_one_step(fitted):
    obj, op, dense = fitted
    damping = -dense.min_eigenvalue() + 0.05
    V = torch.randn(obj.num_params, 3, dtype=torch.float64)
    cg = CGCurvature(rtol=1e-8, preconditioner=dense).fit(op)
    assert _rel(cg.solve(V, damping), dense.solve(V, damping)) <= 1e-6
    assert cg.diagnostics["iterations"] <= 2


def test_cg_detects_negative_curvature_and_suggests_damping():
    obj = make_problem("cnn")
    op = HessianOperator(obj)
    lam_min = DenseCurvature().fit(op).min_eigenvalue()
    assert lam_min < 0
    cg = CGCurvature().fit(op)
    with pytest.raises(IndefiniteDampingError, match="cg .*pᵀH_δp ≤ 0"):
        # a right-hand side along the most negative eigenvector meets negative curvature at once
        evals, evecs = torch.linalg.eigh(op.dense())
        cg.solve(evecs[:, :1], 0.0)


@pytest.mark.parametrize("method", ["torch", "scipy"])
def test_lanczos_top_eigenpairs_match_dense(fitted, method):
    obj, op, dense = fitted
    m = 20
    lanczos = LanczosCurvature(m=m, method=method, tol=1e-12).fit(op)
    values, vectors = lanczos.eigh(m)
    ref_values, ref_vectors = dense.eigh(m)
    assert ((values - ref_values).abs() / ref_values.abs()).max() <= 1e-8
    # angles between eigenvectors, where the eigenvalue is separated from its neighbours
    gaps = torch.minimum((ref_values[:-1] - ref_values[1:]).abs()[1:], (ref_values[1:-1] - ref_values[2:]).abs())
    separated = torch.cat([torch.tensor([True]), gaps > 1e-6 * ref_values.abs().max(), torch.tensor([False])])
    cosines = (vectors * ref_vectors).sum(0).abs()
    assert (1 - cosines[separated]).max() <= 1e-8
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(m, dtype=torch.float64), atol=1e-10, rtol=0)


def test_lees_from_lanczos_equals_dense():
    obj = make_problem("cnn")
    Xt, _ = obj.train.take(range(5))
    exact = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    approx = Toolbox(obj, damping=1.0, inverse="dense", eigen="lanczos", eigen_options={"m": 20, "tol": 1e-12})
    for kwargs in ({"m": 10}, {"threshold": 0.05}, {"m": "auto"}):
        a, b = approx.extrapolation_score(Xt, **kwargs), exact.extrapolation_score(Xt, **kwargs)
        assert approx.last_m == exact.last_m, kwargs
        assert _rel(a, b) <= 1e-6, kwargs


def test_lowrank_inverse_is_exact_on_its_span_and_with_full_rank(fitted):
    obj, op, dense = fitted
    M = obj.num_params
    damping = -dense.min_eigenvalue() + 0.05
    full = LowRankCurvature(m=M, tol=1e-12).fit(op)
    V = torch.randn(M, 4, dtype=torch.float64)
    assert _rel(full.solve(V, damping), dense.solve(V, damping)) <= 1e-7
    low = LowRankCurvature(m=5).fit(op)
    _, top = dense.eigh(5)
    assert _rel(low.solve(top, damping), dense.solve(top, damping)) <= 1e-7


def test_toolbox_with_cg_matches_dense_influence():
    obj = make_problem("mlp")
    Xt, yt = obj.train.take(range(4))
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    cg = Toolbox(obj, damping=exact.damping, inverse="cg", eigen="lanczos")
    assert _rel(cg.influence(Xt, yt), exact.influence(Xt, yt)) <= 1e-6
    assert _rel(cg.relatif(Xt, yt), exact.relatif(Xt, yt)) <= 1e-6
    assert _rel(cg.rue(Xt, yt, method="analytic"), exact.rue(Xt, yt, method="analytic")) <= 1e-6
    auto = Toolbox(obj, damping="auto", inverse="cg", eigen="lanczos")  # λ_min by ARPACK
    assert auto.damping == pytest.approx(exact.damping, abs=1e-6)
    np.testing.assert_allclose(cg.rue(Xt, yt, n_bootstrap=10, seed=3).numpy(),
                               exact.rue(Xt, yt, n_bootstrap=10, seed=3).numpy(), rtol=1e-5)


@pytest.mark.parametrize("inverse", ["dense", "cg", "lissa", "kfac", "ekfac", "lowrank"])
@pytest.mark.parametrize("eigen", ["dense", "lanczos", "lowrank"])
def test_every_backend_is_selectable_by_name(inverse, eigen):
    obj = make_problem("mlp", n=24)
    Xt, yt = obj.train.take(range(3))
    options = {"lissa": {"batch_size": 24, "deflate": 5}, "lowrank": {"m": 10}}
    tb = Toolbox(obj, damping=2.0, inverse=inverse, eigen=eigen, inverse_options=options.get(inverse),
                 eigen_options={"m": 10} if eigen != "dense" else None)
    assert tb.inverse.name == inverse and tb.eigen.name == eigen
    assert tb.influence(Xt, yt).shape == (3, 24)
    assert tb.extrapolation_score(Xt, m=3).shape == (3,)


def test_cg_preconditioned_by_kfac_matches_dense_in_fewer_iterations():
    from scalable_hbt.curvature import KFACCurvature

    obj = make_problem("cnn")
    op = HessianOperator(obj)
    dense = DenseCurvature().fit(op)
    damping = -dense.min_eigenvalue() + 0.05
    V = torch.randn(obj.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain = CGCurvature(rtol=1e-10).fit(op)
    pre = CGCurvature(rtol=1e-10, preconditioner=KFACCurvature()).fit(op)
    assert _rel(pre.solve(V, damping), dense.solve(V, damping)) <= 1e-6
    plain.solve(V, damping)
    assert pre.diagnostics["iterations"] <= plain.diagnostics["iterations"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lanczos_cupy_matches_dense_on_gpu():
    pytest.importorskip("cupy")
    obj = make_problem("mlp", device="cuda")
    op = HessianOperator(obj)
    values, _ = LanczosCurvature(m=10, method="cupy", tol=1e-12).fit(op).eigh(10)
    ref, _ = DenseCurvature().fit(op).eigh(10)
    assert ((values - ref).abs() / ref.abs()).max() <= 1e-8


def test_thick_restarted_lanczos_with_a_small_basis_matches_dense(fitted):
    from scalable_hbt.curvature import lanczos_top

    obj, op, dense = fitted
    values, vectors, info = lanczos_top(op, 5, tol=1e-11, basis_size=9, max_iter=2000)
    assert info["restarts"] > 0 and info["converged"] and info["basis_size"] == 9
    ref_values, ref_vectors = dense.eigh(5)
    assert ((values - ref_values).abs() / ref_values.abs()).max() <= 1e-8
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    residual = op.matmat(vectors) - vectors * values
    assert residual.norm(dim=0).max() <= 1e-9 * values.abs().max()
    # the Ritz vectors were formed in place: the result owns m columns, the rest of the basis is freed
    assert vectors.untyped_storage().nbytes() == obj.num_params * 5 * vectors.element_size()
