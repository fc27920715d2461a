"""LiSSA (stochastic Neumann recursion, optionally deflated / variance-reduced) against the
dense oracle in float64, on the tiny MLP (M = 43) and CNN (M = 60) with n = 40."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from scalable_hbt import DenseCurvature, HessianOperator, Toolbox
from scalable_hbt.curvature.lissa import LiSSACurvature
from scalable_hbt.errors import IndefiniteDampingError, SolverDivergenceError
from conftest import brute_force_gradients, brute_force_hessian, make_problem, training_tensors

N = 40


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def fitted(request):
    obj = make_problem(request.param, n=N)
    op = HessianOperator(obj)
    dense = DenseCurvature().fit(op)
    H = brute_force_hessian(obj)
    damping = -torch.linalg.eigvalsh(H)[0].item() + 0.05
    V = torch.randn(obj.num_params, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), V)  # explicit, brute-force H
    return request.param, obj, op, dense, damping, V, ref


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _run(op, V, damping, **options):
    lissa = LiSSACurvature(progress=False, **options).fit(op)
    X = lissa.solve(V, damping)
    return X, lissa.diagnostics


def test_stochastic_minibatches_plain_and_deflated_match_dense(fitted):
    """Genuinely stochastic mini-batches (b = n/4, drawn with replacement) with the control
    variate: plain and deflated (k = 10) both reach ≤ 1e-2; deflation needs fewer HVPs."""
    kind, obj, op, dense, damping, V, ref = fitted
    common = dict(batch_size=N // 4, variance_reduction=True, target=1e-4, seed=0)
    X_plain, d_plain = _run(op, V, damping, deflate=0, **common)
    X_defl, d_defl = _run(op, V, damping, deflate=10, **common)
    e_plain, e_defl = _rel(X_plain, ref), _rel(X_defl, ref)
    print(f"\n[{kind}] b=n/4 VR  plain: err {e_plain:.2e}, depth {d_plain['depth']}, s {d_plain['scale']:.3f}, "
          f"lissa HVPs {d_plain['lissa_hvps']:.0f} + fit {d_plain['fit_hvps']:.0f} | "
          f"deflated k=10: err {e_defl:.2e}, depth {d_defl['depth']}, s {d_defl['scale']:.3f}, "
          f"lissa HVPs {d_defl['lissa_hvps']:.0f} + fit {d_defl['fit_hvps']:.0f}")
    assert e_plain <= 1e-2 and e_defl <= 1e-2
    assert d_defl["lissa_hvps"] < d_plain["lissa_hvps"]
    assert d_defl["depth"] < d_plain["depth"] and d_defl["scale"] < d_plain["scale"]
    for d in (d_plain, d_defl):  # the one-product residual estimate agrees with the true error's order
        assert d["relative_residual_max"] <= 1e-2
        assert d["hvps"] == pytest.approx(d["lissa_hvps"] + V.shape[1])  # + one full matmat for the residual
    assert d_defl["deflated"] == 10 and d_defl["lambda_top_complement"] < d_plain["lambda_top_complement"]


def test_full_batch_recursion_plain_and_deflated_match_dense(fitted):
    """b = n: every step is the exact recursion (deterministic); auto scale from Lanczos."""
    kind, obj, op, dense, damping, V, ref = fitted
    X_plain, d_plain = _run(op, V, damping, batch_size=N, deflate=0)
    X_defl, d_defl = _run(op, V, damping, batch_size=N, deflate=10)
    print(f"\n[{kind}] b=n  plain: err {_rel(X_plain, ref):.2e}, HVPs {d_plain['lissa_hvps']:.0f} + fit "
          f"{d_plain['fit_hvps']:.0f} | deflated: err {_rel(X_defl, ref):.2e}, HVPs {d_defl['lissa_hvps']:.0f} + fit "
          f"{d_defl['fit_hvps']:.0f}")
    assert _rel(X_plain, ref) <= 1e-2 and _rel(X_defl, ref) <= 1e-2
    assert d_defl["lissa_hvps"] < d_plain["lissa_hvps"]
    # full-batch scale: the middle of the spectrum (top with its 10 % margin), from the oracle's λ_max, λ_min
    lam_max, lam_min = dense.eigh(1)[0].item(), dense.min_eigenvalue()
    assert d_plain["scale"] == pytest.approx((1.1 * (lam_max + damping) + lam_min + damping) / 2, rel=1e-3)
    # the automatic depth reaches the target: ε = 1e-8 gives a solve accurate to ~1e-8
    for deflate in (0, 10):
        X_tight, d_tight = _run(op, V, damping, batch_size=N, deflate=deflate, target=1e-8)
        assert _rel(X_tight, ref) <= 1e-6, (deflate, _rel(X_tight, ref), d_tight["depth"])
    # the early stop on the update norm ‖h_j − h_{j−1}‖ ≤ rtol·‖v‖ ends the run well before max depth
    X_stop, d_stop = _run(op, V, damping, batch_size=N, deflate=10, depth=5000, rtol=1e-5)
    assert d_stop["stopped_early"] == 1 and d_stop["steps_run"][0] < 5000
    assert _rel(X_stop, ref) <= 1e-2
    # a right-hand side inside the deflated span is solved exactly
    _, top = dense.eigh(3)
    defl = LiSSACurvature(batch_size=N, deflate=10, depth=1, progress=False).fit(op)
    assert _rel(defl.solve(top, damping), dense.solve(top, damping)) <= 1e-5


def test_classic_stochastic_lissa_is_unbiased_and_repeats_average_noise():
    """Without the control variate the b = n/4 result is noisy; independent repeats average it."""
    obj = make_problem("mlp", n=N)
    op = HessianOperator(obj)
    dense = DenseCurvature().fit(op)
    damping = -dense.min_eigenvalue() + 0.05
    V = torch.randn(obj.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = dense.solve(V, damping)
    with pytest.warns(RuntimeWarning, match="estimated relative residual"):  # the noise is reported, not silent
        one, _ = _run(op, V, damping, batch_size=N // 4, depth=100, deflate=0)
    many, d = _run(op, V, damping, batch_size=N // 4, depth=100, deflate=0, repeats=8, warn_residual=None)
    assert d["repeats"] == 8 and len(d["steps_run"]) == 8
    print(f"\n[mlp] classic LiSSA b=n/4: 1 run err {_rel(one, ref):.2e}, 8 runs err {_rel(many, ref):.2e}")
    assert _rel(many, ref) < 0.6 * _rel(one, ref)


def test_same_seed_same_result_different_seed_different():
    obj = make_problem("mlp", n=N)
    op = HessianOperator(obj)
    V = torch.randn(obj.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opts = dict(batch_size=N // 4, depth=60, deflate=5, variance_reduction=True, progress=False)
    a = LiSSACurvature(seed=3, **opts).fit(op).solve(V, 0.3)
    b = LiSSACurvature(seed=3, **opts).fit(op).solve(V, 0.3)
    c = LiSSACurvature(seed=4, **opts).fit(op).solve(V, 0.3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, rtol=0, atol=1e-12)


def test_column_blocks_of_max_vectors_give_the_same_result():
    """Solving the columns one at a time (``max_vectors=1``: the memory-lean setting) gives the
    all-at-once result: every block sees the same mini-batch sequence."""
    obj = make_problem("mlp", n=N)
    V = torch.randn(obj.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opts = dict(batch_size=N // 4, depth=60, deflate=5, variance_reduction=True, progress=False, seed=3)
    together = LiSSACurvature(**opts).fit(HessianOperator(obj)).solve(V, 0.3)
    lissa = LiSSACurvature(**opts).fit(HessianOperator(obj, max_vectors=1))
    torch.testing.assert_close(lissa.solve(V, 0.3), together, rtol=1e-12, atol=1e-14)
    assert lissa.diagnostics["column_blocks"] == 3


def test_too_small_scale_raises_naming_a_scale():
    obj = make_problem("mlp", n=N)
    op = HessianOperator(obj)
    dense = DenseCurvature().fit(op)
    damping = -dense.min_eigenvalue() + 0.05
    lam_max = dense.eigh(1)[0].item()
    lissa = LiSSACurvature(scale=0.1 * lam_max, batch_size=N, depth=500, deflate=0, progress=False).fit(op)
    V = torch.randn(obj.num_params, 2, dtype=torch.float64)
    with pytest.raises(SolverDivergenceError, match=r"scale s = .*Use scale ≥ \d"):
        lissa.solve(V, damping)


def test_negative_curvature_raises_with_a_damping_suggestion():
    obj = make_problem("cnn", n=N)
    op = HessianOperator(obj)
    lam_min = DenseCurvature().fit(op).min_eigenvalue()
    assert lam_min < 0
    V = torch.randn(obj.num_params, 2, dtype=torch.float64)
    # refused up front from the Ritz estimate of λ_min made in fit
    with pytest.raises(IndefiniteDampingError, match=r"lissa \(negative curvature.*Use damping ≥ "):
        LiSSACurvature(batch_size=N, progress=False).fit(op).solve(V, 0.0)
    # and, without that estimate, caught by the growth check during the recursion
    blind = LiSSACurvature(batch_size=N, depth=2000, check_curvature=False, progress=False).fit(op)
    with pytest.raises(IndefiniteDampingError, match=r"diverged at step .*negative curvature.*Use damping ≥ ") as info:
        blind.solve(V, 0.0)
    suggested = info.value.suggested_damping
    assert suggested >= -lam_min - 1e-3


def test_influence_rankings_match_dense():
    obj = make_problem("mlp", n=N)
    Xt, yt = (t[:5] for t in training_tensors(obj))
    exact = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
    damping = exact.damping
    lissa = LiSSACurvature(batch_size=N // 4, deflate=10, variance_reduction=True, target=1e-4, seed=0, progress=False)
    approx = Toolbox(obj, damping=damping, inverse=lissa)
    I_exact, I_lissa = exact.influence(Xt, yt), approx.influence(Xt, yt)
    for t in range(I_exact.shape[0]):
        rho = spearmanr(I_exact[t].numpy(), I_lissa[t].numpy()).statistic
        assert rho >= 0.95, (t, rho)
    assert approx.diagnostics["inverse"]["name"] == "lissa"


def test_deflation_from_a_given_eigen_backend(fitted):
    """With ``eigen=`` the deflation basis comes from that backend: no Lanczos run of its own."""
    _, obj, op, dense, damping, V, ref = fitted
    own_X, own = _run(op, V, damping, deflate=10, batch_size=N, target=1e-8)
    given_X, given = _run(op, V, damping, deflate=10, batch_size=N, target=1e-8, eigen=dense)
    assert _rel(given_X, ref) <= 1e-6 and _rel(own_X, ref) <= 1e-6
    assert given["lanczos_iterations"] is None and own["lanczos_iterations"] > 0
    assert given["fit_hvps"] < own["fit_hvps"]
    torch.testing.assert_close(torch.tensor(given["lambda_deflated"], dtype=torch.float64), dense.eigh(10)[0],
                               rtol=1e-12, atol=0)


def test_toolbox_lissa_defaults_deflate_with_the_toolbox_eigenpairs():
    """inverse="lissa" with defaults: ten deflated eigenpairs taken from the Toolbox's eigen backend
    (no Lanczos run of LiSSA's own), full-batch steps, the automatic scale and depth."""
    obj = make_problem("mlp", n=N)
    Xt, yt = obj.train.take(range(4))
    H, G = brute_force_hessian(obj), brute_force_gradients(obj, *training_tensors(obj))
    damping = abs(min(torch.linalg.eigvalsh(H)[0].item(), 0.0)) + 0.1
    Gt = brute_force_gradients(obj, Xt, yt)
    reference = Gt @ torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), G.T) / N
    tb = Toolbox(obj, damping=damping, inverse="lissa", eigen="lanczos")
    I = tb.influence(Xt, yt)
    assert tb.inverse.eigen is tb.eigen
    d = tb.inverse.diagnostics
    assert d["deflated"] == 10 and d["batch_size"] == N and d["lanczos_iterations"] is None
    assert _rel(I, reference) <= 1e-4
