"""LiSSA (stochastic Neumann recursion, optionally deflated / variance-reduced) against the
dense oracle in float64, on the tiny MLP (M = 43) and CNN (M = 60) with n = 40."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from scalable_hbt import DenseCurvature, HessianOperator, Toolbox
from scalable_hbt.curvature.lissa import LiSSACurvature
from scalable_hbt.errors import IndefiniteDampingError, InputError, SolverDivergenceError
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
    """b = n: every step is the exact recursion (deterministic, Chebyshev by default); auto scale
    from Lanczos."""
    kind, obj, op, dense, damping, V, ref = fitted
    X_plain, d_plain = _run(op, V, damping, batch_size=N, deflate=0)
    X_defl, d_defl = _run(op, V, damping, batch_size=N, deflate=10)
    print(f"\n[{kind}] b=n  plain: err {_rel(X_plain, ref):.2e}, HVPs {d_plain['lissa_hvps']:.0f} + fit "
          f"{d_plain['fit_hvps']:.0f} | deflated: err {_rel(X_defl, ref):.2e}, HVPs {d_defl['lissa_hvps']:.0f} + fit "
          f"{d_defl['fit_hvps']:.0f}")
    assert _rel(X_plain, ref) <= 1e-2 and _rel(X_defl, ref) <= 1e-2
    assert d_defl["lissa_hvps"] < d_plain["lissa_hvps"]
    assert d_plain["acceleration"] == d_defl["acceleration"] == "chebyshev"
    # the plain recursion's full-batch scale: the middle of the spectrum (top with its 10 % margin), from the
    # oracle's λ_max, λ_min; Chebyshev's: the middle of [0.9·(λ_min + δ), 1.1·(λ_max + δ)]
    lam_max, lam_min = dense.eigh(1)[0].item(), dense.min_eigenvalue()
    _, d_richardson = _run(op, V, damping, batch_size=N, deflate=0, acceleration=None)
    assert d_richardson["scale"] == pytest.approx((1.1 * (lam_max + damping) + lam_min + damping) / 2, rel=1e-3)
    assert d_plain["scale"] == pytest.approx((1.1 * (lam_max + damping) + 0.9 * (lam_min + damping)) / 2, rel=1e-3)
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
    assert d["acceleration"] == "chebyshev"
    assert _rel(I, reference) <= tb.inverse.target  # the default target, 1e-3


# ---------------------------------------------------------------------------- Chebyshev acceleration
def _chebyshev_degree_brute(kappa: float, target: float) -> int:
    """The smallest m with 2σ^m/(1 + σ^{2m}) ≤ ε, σ = (√κ − 1)/(√κ + 1), by counting."""
    sigma = (kappa**0.5 - 1) / (kappa**0.5 + 1)
    m = 1
    while 2 * sigma**m / (1 + sigma ** (2 * m)) > target:
        m += 1
    return m


def _powers_above(rho: float, target: float) -> int:
    """The smallest J with ρ^J ≤ ε, by counting."""
    J = 1
    while rho**J > target:
        J += 1
    return J


def _richardson_count(kappa: float, target: float) -> int:
    """Steps of the fixed-step recursion on the same interval: ρ^J ≤ ε, ρ = (κ − 1)/(κ + 1)."""
    return _powers_above((kappa - 1) / (kappa + 1), target)


@pytest.mark.parametrize("deflate", [0, 10])
def test_chebyshev_full_batch_reaches_the_target_at_the_chebyshev_depth(fitted, deflate):
    """Full-batch Chebyshev LiSSA against the explicit solve with the brute-force H (indefinite,
    δ = −λ_min + 0.05): relative error ≤ target at 1e-3 and 1e-8, smaller at the tighter target;
    its interval and depth from the eigenvalues of the brute-force H, far below the Richardson count."""
    kind, obj, op, dense, damping, V, ref = fitted
    eigenvalues = torch.linalg.eigvalsh(brute_force_hessian(obj)).flip(0)  # descending
    assert eigenvalues[-1] < 0
    a = 0.9 * (eigenvalues[-1].item() + damping)
    b = 1.1 * (eigenvalues[deflate].item() + damping)                   # top of the complement: λ_{k+1}
    errors = []
    for target in (1e-3, 1e-8):
        X, d = _run(op, V, damping, batch_size=N, deflate=deflate, target=target)
        errors.append(_rel(X, ref))
        print(f"\n[{kind}] chebyshev k={deflate} ε={target:g}: err {errors[-1]:.2e}, depth {d['depth']}, interval "
              f"{d['interval']}, σ {d['contraction']:.4f}, Richardson count {_richardson_count(b / a, target)}")
        assert d["acceleration"] == "chebyshev"
        assert d["interval"] == pytest.approx([a, b], rel=1e-3)
        assert d["contraction"] == pytest.approx(((b / a) ** 0.5 - 1) / ((b / a) ** 0.5 + 1), rel=1e-3)
        # depth J products: the degree-(J + 1) Chebyshev iterate (h_0 = v is degree 1)
        assert abs(d["depth"] + 1 - _chebyshev_degree_brute(b / a, target)) <= 1
        assert d["depth"] <= 0.5 * _richardson_count(b / a, target)
        assert d["lissa_hvps"] == d["depth"] * V.shape[1]
        assert errors[-1] <= target
    assert errors[1] < 1e-3 * errors[0]


def test_chebyshev_iterate_is_the_chebyshev_polynomial(fitted):
    """x after J steps is A⁻¹(I − p(A))v with p(λ) = T_{J+1}((s − λ)/c)/T_{J+1}(s/c), s = (a + b)/2,
    c = (b − a)/2 — evaluated in the eigenbasis of the brute-force H + δI (no deflation, J = 12)."""
    kind, obj, op, dense, damping, V, ref = fitted
    X, d = _run(op, V, damping, batch_size=N, deflate=0, depth=12, estimate_residual=False)
    a, b = d["interval"]
    s, c = (a + b) / 2, (b - a) / 2
    H = brute_force_hessian(obj)
    lam, Q = torch.linalg.eigh(H + damping * torch.eye(len(H), dtype=H.dtype))

    def chebyshev_t(m: int, z: torch.Tensor) -> torch.Tensor:
        t_prev, t = torch.ones_like(z), z
        for _ in range(m - 1):
            t_prev, t = t, 2 * z * t - t_prev
        return t

    p = chebyshev_t(13, (s - lam) / c) / chebyshev_t(13, torch.tensor(s / c, dtype=lam.dtype))
    expected = Q @ (((1 - p) / lam).unsqueeze(1) * (Q.T @ V))
    assert _rel(X, expected) <= 1e-10
    assert _rel(X, ref) > 1e-6  # 12 steps: not yet converged, so the comparison is not with the exact solve


def test_plain_recursion_is_the_truncated_neumann_series(fitted):
    """acceleration=None: x = (1/s) Σ_{i=0}^{J} (I − A/s)^i v with A = H + δI from brute force, at the
    scale and depth of the fixed-step rule, s = (1.1·(λ_max + δ) + λ_min + δ)/2, ρ^J ≤ ε."""
    kind, obj, op, dense, damping, V, ref = fitted
    X, d = _run(op, V, damping, batch_size=N, deflate=0, acceleration=None, target=1e-3, estimate_residual=False)
    H = brute_force_hessian(obj)
    A = H + damping * torch.eye(len(H), dtype=H.dtype)
    lam = torch.linalg.eigvalsh(H)
    s_rule = (1.1 * (lam[-1].item() + damping) + lam[0].item() + damping) / 2
    rho = max(1 - (lam[0].item() + damping) / s_rule, (lam[-1].item() + damping) / s_rule - 1)
    assert d["acceleration"] is None and d["interval"] is None
    assert d["scale"] == pytest.approx(s_rule, rel=1e-3)
    assert abs(d["depth"] - _powers_above(rho, 1e-3)) <= 1
    s, term, total = d["scale"], V.clone(), V.clone()
    for _ in range(d["depth"]):
        term = term - A @ term / s
        total = total + term
    assert _rel(X, total / s) <= 1e-10


def test_chebyshev_refused_with_minibatches_and_fixed_scale():
    obj = make_problem("mlp", n=N)
    op = HessianOperator(obj)
    with pytest.raises(InputError, match=r"acceleration='chebyshev' needs full-batch steps.*batch_size = 10 < n = 40"):
        LiSSACurvature(batch_size=N // 4, acceleration="chebyshev", progress=False).fit(op)
    with pytest.raises(InputError, match=r"chebyshev.*fixed scale"):
        LiSSACurvature(scale=2.0, acceleration="chebyshev")
    with pytest.raises(InputError, match=r"chebyshev.*check_curvature=False"):
        LiSSACurvature(check_curvature=False, acceleration="chebyshev")
    with pytest.raises(InputError, match=r"acceleration"):
        LiSSACurvature(acceleration="krylov")
    # "auto" with mini-batches: the stochastic recursion
    V = torch.randn(obj.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, d = _run(op, V, 0.3, batch_size=N // 4, depth=20, deflate=0, warn_residual=None)
    assert d["acceleration"] is None


def test_chebyshev_growth_from_a_wrong_top_estimate_is_caught():
    """A top estimate far below the true λ_max (an eigenvalue beyond a + b = 2s): the iterate
    grows past 10·(j + 1)²·‖v‖ and the divergence names the scale."""
    obj = make_problem("mlp", n=N)
    op = HessianOperator(obj)
    lissa = LiSSACurvature(batch_size=N, deflate=0, depth=400, progress=False).fit(op)
    state = lissa.state_dict()
    state["lambda_top"] = 0.2 * state["lambda_top"]
    lissa.load_state_dict(state, op)
    damping = -lissa.lambda_min + 0.05
    V = torch.randn(obj.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with pytest.raises(SolverDivergenceError, match=r"diverged at step .*scale is too small"):
        lissa.solve(V, damping)
