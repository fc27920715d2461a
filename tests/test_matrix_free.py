"""Matrix-free backends (cg, lanczos, lowrank) against the dense oracle in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalable_hbt import DenseCurvature, HessianOperator, IndefiniteDampingError, Toolbox
from scalable_hbt.curvature import CGCurvature, LanczosCurvature, LowRankCurvature
from conftest import (Flat, brute_force_gradients, brute_force_ggn, brute_force_hessian, brute_force_outputs,
                      make_problem, output_hessian, training_tensors)


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
    Xt = training_tensors(obj)[0][:5]
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
    # off the span: the formula V_5 diag(1/(λ+δ)) V_5ᵀ + (I − V_5 V_5ᵀ)/δ with eigh of the brute-force H
    # (relative gap λ_5 − λ_6 ≥ 2 % of λ_1, Lanczos tol 1e-10: eigenvectors to ≈ 5e-9)
    evals, evecs = torch.linalg.eigh(brute_force_hessian(obj))
    V5, l5 = evecs[:, -5:], evals[-5:]
    formula = V5 @ ((V5.T @ V) / (l5 + damping).unsqueeze(1)) + (V - V5 @ (V5.T @ V)) / damping
    assert _rel(low.solve(V, damping), formula) <= 1e-7
    assert _rel(formula, dense.solve(V, damping)) > 1e-3  # and that is not the exact inverse


def test_toolbox_with_cg_matches_dense_influence():
    obj = make_problem("mlp")
    Xt, yt = (t[:4] for t in training_tensors(obj))
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    cg = Toolbox(obj, damping=exact.damping, inverse="cg", eigen="lanczos")
    assert _rel(cg.influence(Xt, yt), exact.influence(Xt, yt)) <= 1e-6
    assert _rel(cg.relatif(Xt, yt), exact.relatif(Xt, yt)) <= 1e-6
    assert _rel(cg.rue(Xt, yt, method="analytic"), exact.rue(Xt, yt, method="analytic")) <= 1e-6
    auto = Toolbox(obj, damping="auto", inverse="cg", eigen="lanczos")  # λ_min by ARPACK
    assert auto.damping == pytest.approx(exact.damping, abs=1e-6)
    np.testing.assert_allclose(cg.rue(Xt, yt, n_bootstrap=10, seed=3).numpy(),
                               exact.rue(Xt, yt, n_bootstrap=10, seed=3).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- every backend by name, with values
MATRIX_N, MATRIX_DAMPING, MATRIX_RANK, MATRIX_T, LEES_M = 24, 2.0, 10, 3, 3


def _mlp_kronecker_factors(obj, X, y):
    """K-FAC factors of the tiny MLP (Linear(4, 5) → tanh → Linear(5, 3), softmax cross-entropy)
    written out by hand, independently of the library's hooks and unfolding.

    Layer l has W̃_l = [W_l | b_l] (out × d_in), input ã (with a trailing 1) and, for each
    output-Hessian square root b_c = √p_c (e_c − p) (Σ_c b_c b_cᵀ = diag p − ppᵀ), the output
    gradient δ_c: δ_c = b_c for the last layer, δ_c = (1 − tanh²(h)) ⊙ W_2ᵀ b_c for the first.
    A = (1/n) Σ ã ãᵀ, G = (1/n) Σ_{n,c} δ δᵀ, and the per-sample GGN gradients δ_c ãᵀ.
    Returns [(flat index of row-major vec W̃, A, G, grads (n, C, out, d_in))] per layer."""
    flat = Flat(obj.model)
    P = flat.split(flat.theta)
    W1, b1, W2, b2 = P["0.weight"], P["0.bias"], P["2.weight"], P["2.bias"]
    n = len(X)
    h = X @ W1.T + b1
    a = torch.tanh(h)
    p = torch.softmax(a @ W2.T + b2, dim=1)
    K = p.shape[1]
    B = p.sqrt().unsqueeze(2) * (torch.eye(K, dtype=p.dtype).unsqueeze(0) - p.unsqueeze(1))  # (n, c, K)
    for i in range(n):  # the square roots reproduce the autograd output Hessian of our loss
        torch.testing.assert_close(B[i].T @ B[i], output_hessian(obj, a[i] @ W2.T + b2, y[i]), rtol=0, atol=1e-14)
    layers = []
    for wname, bname, inp, delta in [("0.weight", "0.bias", X, (B @ W2) * (1 - a.square()).unsqueeze(1)),
                                     ("2.weight", "2.bias", a, B)]:
        a_h = torch.cat([inp, torch.ones(n, 1, dtype=inp.dtype)], dim=1)          # (n, d_in)
        out, d_w = P[wname].shape
        idx = torch.empty(out, d_w + 1, dtype=torch.long)
        idx[:, :d_w] = flat.slice(wname).start + torch.arange(out * d_w).view(out, d_w)
        idx[:, d_w] = flat.slice(bname).start + torch.arange(out)
        A = a_h.T @ a_h / n
        G = torch.einsum("nco,ncp->op", delta, delta) / n
        grads = delta.unsqueeze(3) * a_h.unsqueeze(1).unsqueeze(2)               # (n, c, out, d_in)
        layers.append((idx.reshape(-1), A, G, grads))
    return layers


@pytest.fixture(scope="module")
def matrix_reference():
    """Everything the 18 backend combinations are checked against, from the brute force:
    H, the per-sample gradients, eigenvectors from torch.linalg.eigh(H), and for each inverse
    backend the explicit matrix (C_δ)⁻¹ of its own definition."""
    obj = make_problem("mlp", n=MATRIX_N)
    X, y = training_tensors(obj)
    Xt, yt = X[:MATRIX_T], y[:MATRIX_T]
    M, d = obj.num_params, MATRIX_DAMPING
    eye = torch.eye(M, dtype=torch.float64)
    H = brute_force_hessian(obj)
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)                       # descending
    # the top-m subspaces used below are well defined: relative gaps after λ_3 and λ_10 ≥ 5 %
    for m in (LEES_M, MATRIX_RANK):
        assert (evals[m - 1] - evals[m]) / evals[0] >= 0.03, m
    ggn = brute_force_ggn(obj)
    kron = torch.zeros(M, M, dtype=torch.float64)
    ekfac = torch.zeros(M, M, dtype=torch.float64)
    for idx, A, G, grads in _mlp_kronecker_factors(obj, X, y):
        block = torch.einsum("ncij,nckl->ijkl", grads, grads).reshape(len(idx), len(idx)) / len(X)
        # the hand-written per-sample gradients give the GGN block of the brute force
        torch.testing.assert_close(block, ggn[idx][:, idx] - obj.weight_decay * torch.eye(len(idx), dtype=A.dtype),
                                   rtol=0, atol=1e-13)
        kron[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(G, A)
        lamA, QA = torch.linalg.eigh(A)
        lamG, QG = torch.linalg.eigh(G)
        for lam in (lamA, lamG):  # distinct eigenvalues: the Kronecker eigenbasis is unique up to signs
            assert (lam[1:] - lam[:-1]).min() > 1e-6 * lam.abs().max()
        S = (QG.T @ grads @ QA).square().sum(dim=(0, 1)) / len(X)          # (out, d_in)
        Q = torch.kron(QG, QA)
        ekfac[idx.unsqueeze(1), idx.unsqueeze(0)] = (Q * S.reshape(1, -1)) @ Q.T
    kron += obj.weight_decay * eye
    ekfac += obj.weight_decay * eye
    Vm, lm = evecs[:, :MATRIX_RANK], evals[:MATRIX_RANK]
    inverses = {
        "dense": torch.linalg.inv(H + d * eye),
        "kfac": torch.linalg.inv(kron + d * eye),
        "ekfac": torch.linalg.inv(ekfac + d * eye),
        "lowrank": Vm @ torch.diag(1 / (lm + d)) @ Vm.T + (eye - Vm @ Vm.T) / d,
    }
    inverses["cg"] = inverses["lissa"] = inverses["dense"]
    Gr, Gt = brute_force_gradients(obj, X, y), brute_force_gradients(obj, Xt, yt)
    Gp = brute_force_gradients(obj, Xt, brute_force_outputs(obj, Xt).argmax(1))   # LEES: predicted labels
    V3 = evecs[:, :LEES_M]
    return dict(obj=obj, Xt=Xt, yt=yt, inverses=inverses, Gr=Gr, Gt=Gt, n=len(X),
                lees=(Gp - Gp @ V3 @ V3.T).norm(dim=1))


# Relative error ‖got − ref‖/‖ref‖ allowed for each backend, in float64:
#  dense, kfac, ekfac: closed forms, round-off only (κ(C_δ) < 3)                    → 1e-10
#  cg: residual ≤ rtol = 1e-10 (the default) times κ(H_δ) ≈ 1.8                       → 1e-9
#  lissa (b = n, k = 5 deflated, target 1e-12): recursion error 1e-12, deflation
#    eigenpairs to Lanczos tol 1e-10 / relative gap ≈ 0.03                            → 1e-7
#  lowrank (m = 10, Lanczos tol 1e-10): eigenvector error ≈ 1e-10·λ_1/gap ≈ 3e-9      → 1e-7
#  eigen side (LEES, m = 3): dense round-off 1e-10; lanczos/lowrank ≈ 1e-10·λ_1/gap    → 1e-7
INVERSE_TOLERANCE = {"dense": 1e-10, "kfac": 1e-10, "ekfac": 1e-10, "cg": 1e-9, "lissa": 1e-7, "lowrank": 1e-7}
EIGEN_TOLERANCE = {"dense": 1e-10, "lanczos": 1e-7, "lowrank": 1e-7}


@pytest.mark.parametrize("inverse", ["dense", "cg", "lissa", "kfac", "ekfac", "lowrank"])
@pytest.mark.parametrize("eigen", ["dense", "lanczos", "lowrank"])
def test_every_backend_is_selectable_by_name(matrix_reference, inverse, eigen):
    """Each inverse × eigen combination, chosen by name, gives the influence and RelatIF of
    its inverse's own definition (the exact H_δ⁻¹ for dense, cg and full-batch deflated
    LiSSA; (Ĝ⊗Â + wd·I + δI)⁻¹ from hand-assembled factors for K-FAC/EK-FAC; the low-rank
    formula from eigh(H) for lowrank) and the LEES of H's own top eigenvectors."""
    ref = matrix_reference
    obj, Xt, yt = ref["obj"], ref["Xt"], ref["yt"]
    options = {"lissa": {"batch_size": MATRIX_N, "deflate": 5, "target": 1e-12},
               "lowrank": {"m": MATRIX_RANK}}
    tb = Toolbox(obj, damping=MATRIX_DAMPING, inverse=inverse, eigen=eigen, inverse_options=options.get(inverse),
                 eigen_options={"m": MATRIX_RANK} if eigen != "dense" else None)
    assert tb.inverse.name == inverse and tb.eigen.name == eigen
    Cinv = ref["inverses"][inverse]
    I_ref = ref["Gt"] @ Cinv @ ref["Gr"].T / ref["n"]
    R_ref = I_ref / (Cinv @ ref["Gr"].T).norm(dim=0)
    I = tb.influence(Xt, yt)
    assert I.shape == (MATRIX_T, MATRIX_N)
    assert _rel(I, I_ref) <= INVERSE_TOLERANCE[inverse]
    assert _rel(tb.relatif(Xt, yt), R_ref) <= INVERSE_TOLERANCE[inverse]
    E = tb.extrapolation_score(Xt, m=LEES_M)
    assert tb.last_m == LEES_M
    assert ((E - ref["lees"]).abs() / ref["lees"]).max() <= EIGEN_TOLERANCE[eigen]


@pytest.mark.parametrize("inverse,normalizer", [("dense", "kfac"), ("dense", "ekfac"), ("cg", "ekfac"),
                                                ("kfac", "dense"), ("dense", "lowrank")])
def test_relatif_with_another_normalizer(matrix_reference, inverse, normalizer):
    """RelatIF's numerator from the inverse backend, its normaliser ‖C_δ⁻¹ g_r‖ from another one
    (README: a K-FAC normaliser with a CG numerator): each part is its own backend's definition."""
    ref = matrix_reference
    obj, Xt, yt = ref["obj"], ref["Xt"], ref["yt"]
    tb = Toolbox(obj, damping=MATRIX_DAMPING, inverse=inverse, eigen="dense",
                 inverse_options={"m": MATRIX_RANK} if inverse == "lowrank" else None)
    if normalizer == "lowrank":
        from scalable_hbt.curvature import LowRankCurvature
        normalizer_arg = LowRankCurvature(m=MATRIX_RANK)
    else:
        normalizer_arg = normalizer
    got = tb.relatif(Xt, yt, normalizer=normalizer_arg)
    I_ref = ref["Gt"] @ ref["inverses"][inverse] @ ref["Gr"].T / ref["n"]
    R_ref = I_ref / (ref["inverses"][normalizer] @ ref["Gr"].T).norm(dim=0)
    assert _rel(got, R_ref) <= max(INVERSE_TOLERANCE[inverse], INVERSE_TOLERANCE[normalizer])
    assert tb.last_info["relatif"]["normalizer"] == normalizer


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
