"""Every curvature backend against the dense oracle on the paper's 740-parameter Conv1d CNN
(L = 12 spinless Fermi-Hubbard, reduced grid: 100 points per phase → n = 200), trained to a
minimum in float64 with the paper's weight decay wd = 0.05 / n.

All tests are slow (one dense fit of M = 740, ≈ 740 HVPs). Run with

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m slow tests/test_paper_cnn.py -s

The measured numbers are printed (lines starting with ``[paper_cnn]``) and tabulated in
``benchmarks/BACKENDS.md``. A bound that is not met is kept as is and its test marked
``xfail(strict=True)`` with the measured number in the reason.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from scalable_hbt import DenseCurvature, HessianOperator, Objective, Toolbox
from scalable_hbt.errors import SolverDivergenceError
from scalable_hbt.curvature import CGCurvature, EKFACCurvature, KFACCurvature, LanczosCurvature, LiSSACurvature
from scalable_hbt.physics import MinMaxScaler, PaperCNN, evaluation_set, paper_weight_decay, train_model, training_set
from conftest import (brute_force_ggn, brute_force_gradients, brute_force_hvp, brute_force_kronecker_factors,
                      kronecker_matrix, register_data)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

F64 = torch.float64
N_PER_PHASE = 100


def report(name: str, **values) -> None:
    parts = []
    for k, v in values.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    print(f"[paper_cnn] {name}: " + ", ".join(parts), flush=True)


def rel_cols(X: torch.Tensor, ref: torch.Tensor) -> float:
    """max over columns of ‖x − x_ref‖ / ‖x_ref‖."""
    return ((X - ref).norm(dim=0) / ref.norm(dim=0)).max().item()


class Setup:
    pass


def _one_blas_thread():
    """numpy/scipy BLAS on one thread too (exact diagonalisation of the data), when threadpoolctl
    is available; torch's own threads are set by the ``one_thread`` fixture."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


@pytest.fixture(scope="module")
def cnn(one_thread, tmp_path_factory) -> Setup:
    """Data, training and the dense fit, all on one thread (requested here, not only by the module's
    marker, so that it is in force before anything is computed)."""
    assert torch.get_num_threads() == 1
    s = Setup()
    s.t = {}
    t0 = time.perf_counter()
    cache = tmp_path_factory.mktemp("hubbard_cache")
    with _one_blas_thread():
        train = training_set(12, N_PER_PHASE, cache_dir=cache, progress=False)
        test = evaluation_set(12, cache_dir=cache, progress=False)
    s.t["data"] = time.perf_counter() - t0

    scaler = MinMaxScaler.fit(train.amplitudes)
    s.X, s.y = train.tensors(scaler, F64)
    s.Xt, s.yt = test.tensors(scaler, F64)
    s.v1 = np.asarray(test.v1)
    n = len(s.X)
    wd = paper_weight_decay(n)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = train_model(PaperCNN().to(F64), s.X, s.y, weight_decay=wd, epochs=40, lr=1e-2, seed=0, batch_size=50,
                      progress=False)
    s.t["training"] = time.perf_counter() - t0
    s.train_result = res

    s.obj = register_data(Objective(res.model, "cross_entropy", (s.X, s.y), weight_decay=wd, dtype=F64,
                                    batch_size=n, progress=False), s.X, s.y)
    s.op = HessianOperator(s.obj)
    t0 = time.perf_counter()
    s.dense = DenseCurvature().fit(s.op)
    s.t["dense_fit"] = time.perf_counter() - t0
    s.dense_hvps = s.dense.diagnostics["hvps"]
    lam = s.dense.eigenvalues
    s.lambda_min, s.lambda_max = lam[0].item(), lam[-1].item()
    s.damping = abs(s.lambda_min) + 0.01   # the paper's rule (= Toolbox(damping="auto") here)

    # 5 test points: deep LL, inside LL, near the transition (V1 = 1), inside CDW, deep CDW
    targets = [0.1, 0.5, 1.0, 3.0, 30.0]
    s.picks = [int(np.argmin(np.abs(s.v1 - v))) for v in targets]
    s.Gt = brute_force_gradients(s.obj, s.Xt[s.picks], s.yt[s.picks])  # (5, M), objective gradients
    s.Gtrain = brute_force_gradients(s.obj, s.X, s.y)                  # (n, M)
    gen = torch.Generator().manual_seed(1)
    s.Vrand = torch.randn(s.obj.num_params, 5, generator=gen, dtype=F64)
    s.infl_exact = Toolbox(s.obj, damping=s.damping, inverse=s.dense, eigen=s.dense).influence(
        s.Xt[s.picks], s.yt[s.picks])
    with torch.no_grad():
        acc = (res.model(s.Xt).argmax(1) == s.yt).double().mean().item()
    report("setup", n=n, M=s.obj.num_params, wd=wd, objective=float(res.objective), grad_norm=float(res.grad_norm),
           test_accuracy=acc, lambda_min=s.lambda_min, lambda_max=s.lambda_max,
           lambda_2=lam[-2].item(), lambda_11=lam[-11].item(), lambda_21=lam[-21].item(), damping=s.damping,
           dense_hvps=float(s.dense_hvps), data_s=s.t["data"], training_s=s.t["training"],
           dense_fit_s=s.t["dense_fit"], test_v1=[round(float(s.v1[i]), 3) for i in s.picks])
    return s


def test_dense_oracle_matches_brute_force_products(cnn):
    """The oracle at this scale, against products of our own double-backward Hessian: random
    vectors (relative error ≤ 1e-10 of ‖H‖‖v‖), and the extreme eigenpairs, whose residual
    ‖H q − λ q‖ must be round-off (≤ 1e-10·λ_max; λ_min ≈ −0.03 is 1.5e-5 of λ_max)."""
    Q, lam = cnn.dense.eigenvectors, cnn.dense.eigenvalues
    V = torch.cat([cnn.Vrand, Q[:, [0, -1]]], dim=1)
    HV = brute_force_hvp(cnn.obj, V)
    dense_HV = Q @ (lam.unsqueeze(1) * (Q.T @ V))
    scale = cnn.lambda_max
    err = ((HV - dense_HV).norm(dim=0) / V.norm(dim=0)).max().item()
    residual_min = (HV[:, -2] - lam[0] * V[:, -2]).norm().item()
    report("dense oracle vs brute-force HVPs", max_rel_err=err / scale, residual_lambda_min=residual_min / scale)
    assert err <= 1e-10 * scale
    assert residual_min <= 1e-10 * scale and (HV[:, -1] - lam[-1] * V[:, -1]).norm() <= 1e-10 * scale


def test_auto_damping_matches_paper_rule(cnn):
    tb = Toolbox(cnn.obj, damping="auto", inverse=cnn.dense, eigen=cnn.dense, operator=cnn.op)
    assert tb.damping == pytest.approx(cnn.damping, rel=1e-12)


# --------------------------------------------------------------------------- 1. CG
def test_cg_matches_dense(cnn):
    ref_r = cnn.dense.solve(cnn.Vrand, cnn.damping)
    ref_t = cnn.dense.solve(cnn.Gt.T, cnn.damping)
    cg = CGCurvature(rtol=1e-10, max_iter=2000).fit(cnn.op)
    t0 = time.perf_counter()
    X_r = cg.solve(cnn.Vrand, cnn.damping)
    d_r = dict(cg.diagnostics)
    X_t = cg.solve(cnn.Gt.T, cnn.damping)
    d_t = dict(cg.diagnostics)
    secs = time.perf_counter() - t0
    e_r, e_t = rel_cols(X_r, ref_r), rel_cols(X_t, ref_t)
    report("cg", err_random=e_r, err_test_grads=e_t, iters_random=d_r["iterations"], iters_test=d_t["iterations"],
           hvps_random=float(d_r["hvps"]), hvps_test=float(d_t["hvps"]), seconds=secs,
           converged=d_r["converged"] and d_t["converged"])
    assert d_r["converged"] and d_t["converged"]
    assert e_r <= 1e-6 and e_t <= 1e-6


# --------------------------------------------------------------------------- 2. LiSSA
# Full-batch recursion (batch_size = n, one of the documented modes): on this CNN the spectrum is
# λ_max ≈ 1.9e3 ≫ λ_2 ≈ 0.03, so mini-batch Hessians on the deflated complement still reach
# λ_B ≈ 2 (b = n/4), the automatic scale becomes s ≈ 1.6 and the automatic depth ≈ 1500 steps
# (κ = s/(λ_min + δ) ≈ 160) — minutes on 2 cores. Full batch keeps s ≈ 1.1(λ_11 + δ).
# lanczos_tol must be tight: the Ritz tolerance is relative to λ_max, and with the default 1e-6
# the fit stops after 15 Lanczos steps with wrong λ_2..λ_10 (the huge top eigenvalue converges
# first and the rest are not resolved), which breaks the deflation.
LISSA_COMMON = dict(batch_size=2 * N_PER_PHASE, seed=0, progress=False, warn_residual=None, lanczos_tol=1e-12)


@pytest.fixture(scope="module")
def lissa_runs(cnn):
    """Deflated (k = 10, automatic scale and depth) and plain LiSSA with the same HVP budget."""
    ref = cnn.dense.solve(cnn.Gt.T, cnn.damping)
    out = {}
    op = HessianOperator(cnn.obj)
    t0 = time.perf_counter()
    defl = LiSSACurvature(deflate=10, target=1e-4, **LISSA_COMMON).fit(op)
    X = defl.solve(cnn.Gt.T, cnn.damping)
    out["deflated"] = dict(backend=defl, err=rel_cols(X, ref), diag=dict(defl.diagnostics),
                           seconds=time.perf_counter() - t0)
    budget = out["deflated"]["diag"]["hvps_with_fit"]
    # the same, converged further (target 1e-8): for the influence rankings
    op_t = HessianOperator(cnn.obj)
    t0 = time.perf_counter()
    tight = LiSSACurvature(deflate=10, target=1e-8, **LISSA_COMMON).fit(op_t)
    X = tight.solve(cnn.Gt.T, cnn.damping)
    out["deflated_target1e-8"] = dict(backend=tight, err=rel_cols(X, ref), diag=dict(tight.diagnostics),
                                      seconds=time.perf_counter() - t0)
    # plain: same options, no deflation (automatic scale from λ_max); depth set so fit + solve use the same budget
    op2 = HessianOperator(cnn.obj)
    t0 = time.perf_counter()
    plain = LiSSACurvature(deflate=0, depth=1, **LISSA_COMMON).fit(op2)  # depth set below
    plain.depth = max(1, int((budget - plain.fit_hvps - 5.0) / 5.0))     # 5 columns per full-batch step, + residual
    X = plain.solve(cnn.Gt.T, cnn.damping)
    out["plain"] = dict(backend=plain, err=rel_cols(X, ref), diag=dict(plain.diagnostics),
                        seconds=time.perf_counter() - t0)
    # plain LiSSA, 100 mini-batch steps of b = n/4 (automatic scale, no control variate): its residual
    # estimate shows an answer no better than zero, and it says so instead of returning it
    op3 = HessianOperator(cnn.obj)
    t0 = time.perf_counter()
    classic = LiSSACurvature(deflate=0, depth=100, batch_size=N_PER_PHASE * 2 // 4, seed=0, progress=False,
                             warn_residual=None).fit(op3)
    try:  # its residual estimate reaches 1: reported as a SolverDivergenceError (recorded, tested below)
        classic.solve(cnn.Gt.T, cnn.damping)
        out["plain_minibatch_100_error"] = None
    except SolverDivergenceError as err:
        out["plain_minibatch_100_error"] = err
    report("lissa[plain_minibatch_100]", diverged=out["plain_minibatch_100_error"] is not None,
           message=str(out["plain_minibatch_100_error"])[:160], seconds=time.perf_counter() - t0)
    for name, r in out.items():
        if name.endswith("_error"):
            continue
        d = r["diag"]
        report(f"lissa[{name}]", err=r["err"], depth=d["depth"], scale=d["scale"], batch_size=d["batch_size"],
               solve_hvps=float(d["lissa_hvps"]), fit_hvps=float(d["fit_hvps"]), total_hvps=float(d["hvps_with_fit"]),
               lambda_top_complement=d["lambda_top_complement"], lambda_min_est=d["lambda_min_estimate"],
               seconds=r["seconds"])
    return out


def test_lissa_deflated_matches_dense(cnn, lissa_runs):
    d = lissa_runs["deflated"]
    assert d["diag"]["deflated"] == 10
    assert d["err"] <= 1e-2


def test_lissa_plain_minibatch_anchor_is_reported_as_diverging(lissa_runs):
    """The issue's anchor, plain LiSSA with 100 steps of b = n/4: its one-product residual
    estimate is ≥ 1 (no better than x = 0), which ``solve`` reports instead of returning."""
    err = lissa_runs["plain_minibatch_100_error"]
    assert isinstance(err, SolverDivergenceError)
    assert "no better than x = 0" in str(err)


def test_lissa_plain_same_budget_is_worse(cnn, lissa_runs):
    """Recorded side by side; plain LiSSA's error with the deflated run's budget (not bounded by the issue)."""
    p, d = lissa_runs["plain"], lissa_runs["deflated"]
    assert p["diag"]["hvps_with_fit"] <= 1.1 * d["diag"]["hvps_with_fit"]
    assert p["err"] > d["err"]


TIE_LEVEL = 1e-6


def _resolved(exact_row: np.ndarray) -> np.ndarray:
    """Training points whose exact influence is distinguishable from the bulk.

    At this minimum ≈ 90 % of the training points are saturated: their loss gradient is
    < 1e-9 of the largest, so g_r ≈ wd·θ̃ and their influences agree to ~1e-7 of the row's
    spread. Their mutual order is float64 noise (CG at rtol 1e-12, 1e-12 away from dense,
    ranks them with Spearman 0.89 against dense), so a rank correlation over them measures
    nothing. Points whose influence differs from the row median by more than TIE_LEVEL of
    the largest such difference carry a rank; the rest are one tie.
    """
    spread = np.abs(exact_row - np.median(exact_row))
    return spread > TIE_LEVEL * spread.max()


def _spearman_rows(infl, exact, top=None, resolved_only=False):
    rhos = []
    for a, b in zip(infl, exact):
        a, b = a.numpy(), b.numpy()
        if resolved_only:
            keep = _resolved(b)
            a, b = a[keep], b[keep]
        if top is not None:
            keep = np.argsort(-np.abs(b))[:top]
            a, b = a[keep], b[keep]
        rhos.append(float(spearmanr(a, b)[0]))
    return rhos


@pytest.mark.parametrize("run", ["deflated", "deflated_target1e-8"])
def test_lissa_influence_rankings_spearman(cnn, lissa_runs, run):
    """Spearman ≥ 0.95 per test point over the training points whose influence is resolved
    (see ``_resolved``); the tied bulk must agree in value instead."""
    lissa = lissa_runs[run]["backend"]
    tb = Toolbox(cnn.obj, damping=cnn.damping, inverse=lissa, eigen=cnn.dense)
    infl = tb.influence(cnn.Xt[cnn.picks], cnn.yt[cnn.picks])
    rhos = _spearman_rows(infl, cnn.infl_exact, resolved_only=True)
    rhos_all = _spearman_rows(infl, cnn.infl_exact)
    resolved = [int(_resolved(b.numpy()).sum()) for b in cnn.infl_exact]
    # control: CG to rtol 1e-12, the same metrics
    cg = CGCurvature(rtol=1e-12, max_iter=2000).fit(HessianOperator(cnn.obj))
    infl_cg = Toolbox(cnn.obj, damping=cnn.damping, inverse=cg, eigen=cnn.dense).influence(cnn.Xt[cnn.picks],
                                                                                             cnn.yt[cnn.picks])
    report(f"lissa[{run}] influence", spearman_resolved=[round(r, 4) for r in rhos], min_spearman=min(rhos),
           resolved_points=resolved, spearman_all_points=[round(r, 4) for r in rhos_all],
           control_cg_spearman_all=[round(r, 4) for r in _spearman_rows(infl_cg, cnn.infl_exact)],
           control_cg_spearman_resolved=[round(r, 4) for r in _spearman_rows(infl_cg, cnn.infl_exact, resolved_only=True)],
           max_abs_influence_diff=(infl - cnn.infl_exact).abs().max().item())
    assert min(rhos) >= 0.95
    rel = ((infl - cnn.infl_exact).norm(dim=1) / cnn.infl_exact.norm(dim=1)).max().item()
    assert rel <= 1e-2


# --------------------------------------------------------------------------- 3. Lanczos
@pytest.fixture(scope="module", params=["torch", "scipy"])
def lanczos(cnn, request):
    op = HessianOperator(cnn.obj)
    t0 = time.perf_counter()
    lz = LanczosCurvature(m=20, tol=1e-14, max_iter=400, method=request.param).fit(op)
    secs = time.perf_counter() - t0
    return request.param, lz, secs


def test_lanczos_top20_eigenpairs(cnn, lanczos):
    method, lz, secs = lanczos
    vals, vecs = lz.eigh(20)
    ref_vals, ref_vecs = cnn.dense.eigh(20)
    rel = ((vals - ref_vals).abs() / ref_vals.abs()).max().item()
    # separated eigenvalues: relative gap to both neighbours (among the top 21) ≥ 1 %
    all_top = cnn.dense.eigenvalues.flip(0)[:21]
    angles, sep = [], []
    for i in range(20):
        gap = min(abs(all_top[i] - all_top[j]).item() for j in (i - 1, i + 1) if 0 <= j < 21)
        if gap / abs(all_top[i].item()) >= 1e-2:
            cos = (vecs[:, i] @ ref_vecs[:, i]).abs().clamp(max=1.0).item()
            angles.append(float(np.arccos(cos)))
            sep.append(i)
    report(f"lanczos[{method}]", max_rel_eig_err=rel, separated=sep, max_angle_separated=max(angles),
           hvps=float(lz.diagnostics["hvps"]), iterations=lz.diagnostics.get("iterations"), seconds=secs)
    assert rel <= 1e-8
    assert max(angles) <= 1e-5


@pytest.mark.parametrize("rule", [dict(m=10), dict(m=None, threshold=1e-3), dict(m=None, threshold=0.1)],
                         ids=["m10", "threshold1e-3", "threshold0.1"])
def test_lanczos_lees_matches_dense(cnn, lanczos, rule):
    method, lz, _ = lanczos
    ref_tb = Toolbox(cnn.obj, damping=cnn.damping, inverse=cnn.dense, eigen=cnn.dense)
    tb = Toolbox(cnn.obj, damping=cnn.damping, inverse=cnn.dense, eigen=lz)
    ref = ref_tb.extrapolation_score(cnn.Xt, **rule)
    got = tb.extrapolation_score(cnn.Xt, **rule)
    rel = ((got - ref).abs() / ref.abs()).max().item()
    report(f"lanczos[{method}] LEES {rule}", m_dense=ref_tb.last_m, m_lanczos=tb.last_m, max_rel_err=rel)
    assert tb.last_m == ref_tb.last_m
    assert rel <= 1e-6


# --------------------------------------------------------------------------- 4. K-FAC / EK-FAC
@pytest.fixture(scope="module")
def kronecker_reference(cnn):
    """Independently computed: the exact GGN (brute force, our loss and flattening) and the
    Kronecker factors of the three Conv1d layers and the Linear (explicitly sliced patches,
    autograd output gradients; conftest.brute_force_kronecker_factors)."""
    t0 = time.perf_counter()
    ggn = brute_force_ggn(cnn.obj)
    factors = brute_force_kronecker_factors(cnn.obj)
    report("independent GGN and Kronecker factors", seconds=time.perf_counter() - t0)
    return ggn, factors


@pytest.fixture(scope="module")
def kfac_results(cnn, kronecker_reference):
    out = {}
    ref_norms = cnn.dense.inverse_norms(cnn.Gtrain, cnn.damping)
    ggn, factors = kronecker_reference
    Q, lam = cnn.dense.eigenvectors, cnn.dense.eigenvalues
    H = (Q * lam) @ Q.T
    report("exact GGN", rel_frob_ggn_vs_hessian=((ggn - H).norm() / H.norm()).item())
    for cls in (KFACCurvature, EKFACCurvature):
        op = HessianOperator(cnn.obj)
        t0 = time.perf_counter()
        kf = cls().fit(op)
        norms = kf.inverse_norms(cnn.Gtrain, cnn.damping)
        secs = time.perf_counter() - t0
        tb = Toolbox(cnn.obj, damping=cnn.damping, inverse=kf, eigen=cnn.dense)
        infl = tb.influence(cnn.Xt[cnn.picks], cnn.yt[cnn.picks])
        approx = kf.dense_matrix()
        definition = kronecker_matrix(cnn.obj, factors, corrected=cls is EKFACCurvature)
        eye = torch.eye(len(definition), dtype=F64)
        def_norms = torch.linalg.solve(definition + cnn.damping * eye, cnn.Gtrain.T).norm(dim=0)
        r = dict(
            backend=kf, approx=approx,
            def_err=((approx - definition).norm() / definition.norm()).item(),
            def_norm_err=((norms - def_norms).abs() / def_norms).max().item(),
            norm_spearman=float(spearmanr(norms.numpy(), ref_norms.numpy())[0]),
            norm_spearman_resolved=_spearman_rows(norms[None], ref_norms[None], resolved_only=True)[0],
            infl_spearman=_spearman_rows(infl, cnn.infl_exact),
            infl_spearman_resolved=_spearman_rows(infl, cnn.infl_exact, resolved_only=True),
            infl_spearman_top50=_spearman_rows(infl, cnn.infl_exact, top=50),
            frob_vs_ggn=((approx - ggn).norm() / ggn.norm()).item(),
            frob_vs_hessian=((approx - H).norm() / H.norm()).item(),
            seconds=secs, passes=kf.diagnostics["passes"])
        out[kf.name] = r
        report(kf.name, rel_err_vs_definition=r["def_err"], normaliser_rel_err_vs_definition=r["def_norm_err"],
               normaliser_spearman=r["norm_spearman"], normaliser_spearman_resolved=r["norm_spearman_resolved"],
               influence_spearman_resolved=[round(v, 4) for v in r["infl_spearman_resolved"]],
               influence_spearman=[round(v, 4) for v in r["infl_spearman"]],
               mean_influence_spearman=float(np.mean(r["infl_spearman"])),
               influence_spearman_top50=[round(v, 4) for v in r["infl_spearman_top50"]], rel_frob_vs_ggn=r["frob_vs_ggn"],
               rel_frob_vs_hessian=r["frob_vs_hessian"], passes=r["passes"], seconds=secs)
    return out


def test_kfac_ekfac_are_their_definitions(kfac_results):
    """On the paper's CNN (three Conv1d layers with padding, pooling, and a Linear), Ĥ of each
    backend equals its definition assembled from independently computed factors — K-FAC
    blockdiag(G ⊗ A) + wd·I, EK-FAC Q diag(S) Qᵀ + wd·I with Q from eigh of those factors — and
    the RelatIF normalisers ‖(Ĥ + δI)⁻¹ g_r‖ of all 200 training points equal those of the
    explicit matrix. Both are float64 round-off apart (measured 7e-15 and 1.2e-13 at most);
    the bound, relative 1e-10, is far below any difference of definition (against the exact
    GGN their relative Frobenius errors are 0.998 and 0.716)."""
    for name in ("kfac", "ekfac"):
        r = kfac_results[name]
        assert r["def_err"] <= 1e-10, name
        assert r["def_norm_err"] <= 1e-10, name


def test_ekfac_at_least_as_close_as_kfac_to_ggn(kfac_results):
    assert kfac_results["ekfac"]["frob_vs_ggn"] <= kfac_results["kfac"]["frob_vs_ggn"]


def test_ekfac_is_the_frobenius_closest_diagonal_in_the_kronecker_eigenbasis(kfac_results, kronecker_reference):
    """What EK-FAC guarantees (George et al. 2018): in each layer's Kronecker eigenbasis
    Q = Q_G ⊗ Q_A its eigenvalues are the diagonal of the exact GGN block, S = diag(Qᵀ F Q) − wd,
    the Frobenius-optimal diagonal in that basis; hence, block by block, it is at least as close
    to the GGN as K-FAC's λ_G λ_Aᵀ in the same basis. (It does not promise better-ranked RelatIF
    normalisers; see the strict xfail below.)"""
    ggn, _ = kronecker_reference
    kf, ek = kfac_results["kfac"]["backend"], kfac_results["ekfac"]["backend"]
    wd = kf.weight_decay
    for lk, le in zip(kf.layers, ek.layers):
        idx = le.flat_index()
        F = ggn[idx][:, idx] - wd * torch.eye(len(idx), dtype=F64)
        Q = torch.kron(le.QG, le.QA)
        diag = torch.diagonal(Q.T @ F @ Q)
        torch.testing.assert_close(le.S.reshape(-1), diag, rtol=0, atol=1e-9 * diag.abs().max().item())
        err_e = (F - (Q * le.S.reshape(1, -1)) @ Q.T).norm()
        err_k = (F - (Q * lk.S.reshape(1, -1)) @ Q.T).norm()
        report(f"layer {le.name}", rel_frob_ekfac=(err_e / F.norm()).item(), rel_frob_kfac=(err_k / F.norm()).item())
        assert err_e <= err_k * (1 + 1e-12), le.name


@pytest.mark.xfail(strict=True, reason=(
    "measured on the one-thread model (λ_max 1857): RelatIF-normaliser Spearman against the exact "
    "normalisers over the resolved training points is EK-FAC 0.804 < K-FAC 0.882 (over all 200 "
    "points, tie-decided: EK-FAC -0.010, K-FAC 0.839). The bound recorded in benchmarks/BACKENDS.md "
    "(EK-FAC ≥ K-FAC) held only on another trained model; EK-FAC's guarantee is the Frobenius one."))
def test_ekfac_normaliser_spearman_at_least_kfac(kfac_results):
    """The claim recorded with the backend benchmarks: EK-FAC's RelatIF normaliser ranks the
    resolved training points at least as well as K-FAC's. Not implied by EK-FAC's construction
    (only the Frobenius closeness is), and it does not hold on this model."""
    assert kfac_results["ekfac"]["norm_spearman_resolved"] >= kfac_results["kfac"]["norm_spearman_resolved"]
