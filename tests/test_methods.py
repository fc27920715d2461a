"""The methods against direct computations from the brute-force references of conftest:
Hessian, per-sample gradients and losses from the raw module (never the library's
Objective), explicit inverses, eigenvectors from torch.linalg.eigh and the explicit
multinomial covariance of the bootstrap weights."""

from __future__ import annotations

import pytest
import torch

from scalable_hbt import Toolbox
from scalable_hbt.methods import bootstrap_weights
from conftest import (DEVICES, Flat, brute_force_gradients, brute_force_hessian, brute_force_losses,
                      brute_force_outputs, make_problem, training_tensors)

DAMPING = 0.5


def _test_points(obj, T=4, seed=7):
    gen = torch.Generator().manual_seed(seed)
    X, y = training_tensors(obj)
    Xt = X[:T] + 0.3 * torch.randn(X[:T].shape, generator=gen, dtype=X.dtype)
    return Xt, y[:T]


def _inverse(obj, damping):
    """(H + δI)⁻¹ from the brute-force Hessian, and the brute-force training gradients (n, M)."""
    H = brute_force_hessian(obj)
    X, y = training_tensors(obj)
    eye = torch.eye(len(H), dtype=H.dtype, device=H.device)
    return torch.linalg.inv(H + damping * eye), brute_force_gradients(obj, X, y)


def _reference(obj, Xt, yt, damping):
    """Influence, similarity, RelatIF straight from the definitions with brute-force H and gradients."""
    Hd_inv, Gr = _inverse(obj, damping)
    Gt = brute_force_gradients(obj, Xt, yt)
    dots = Gt @ Hd_inv @ Gr.T
    norms = (Hd_inv @ Gr.T).norm(dim=0)
    return dots / obj.n, dots.square(), dots / obj.n / norms


def _shifts(obj, Hd_inv, Gr, weights):
    """Δθ_b = −(H + δ'I)⁻¹ (1/n) Σ_i (w_b,i − 1) g_i for the rows of ``weights``; (M, B)."""
    w = weights.to(Gr.dtype)
    return -(Hd_inv @ ((w - 1) @ Gr).T) / obj.n


def _bootstrap_rue(obj, Xt, yt, shifts):
    """Population variance over b of ℓ(z_t, θ̃ + Δθ_b), losses by a forward pass of the module."""
    theta = Flat(obj.model).theta
    losses = torch.stack([brute_force_losses(obj, Xt, yt, theta=theta + s) for s in shifts.T])
    return losses.var(dim=0, correction=0)


def _analytic_rue(obj, Xt, yt, rue_damping):
    """Var_w[g_tᵀ Δθ(w)] for w ~ Multinomial(n, 1/n), as the quadratic form aᵀ Σ a with the explicit
    covariance Σ = Cov(w) = I − 11ᵀ/n and a_r = (1/n) g_tᵀ H_δ'⁻¹ g_r (g_tᵀΔθ = −Σ_r (w_r − 1) a_r)."""
    Hd_inv, Gr = _inverse(obj, rue_damping)
    a = brute_force_gradients(obj, Xt, yt) @ Hd_inv @ Gr.T / obj.n                    # (T, n)
    n = obj.n
    Sigma = torch.eye(n, dtype=a.dtype) - torch.full((n, n), 1.0 / n, dtype=a.dtype)
    return torch.einsum("tr,rs,ts->t", a, Sigma, a), a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_influence_similarity_relatif_match_brute_force(kind, device):
    obj = make_problem(kind, device=device)
    Xt, yt = _test_points(obj)
    dmp = -torch.linalg.eigvalsh(brute_force_hessian(obj))[0].item() + 0.05
    tb = Toolbox(obj, damping=dmp, inverse="dense", eigen="dense")
    I_ref, S_ref, R_ref = _reference(obj, Xt, yt, dmp)
    I = tb.influence(Xt, yt)
    assert I.shape == (4, obj.n)
    torch.testing.assert_close(I, I_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tb.similarity(Xt, yt), S_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tb.relatif(Xt, yt), R_ref, rtol=1e-9, atol=1e-12)


def test_test_loss_choice_and_predicted_labels():
    obj = make_problem("mlp")
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=2.0, inverse="dense", eigen="dense")
    Hd_inv, Gr = _inverse(obj, 2.0)
    pred = brute_force_outputs(obj, Xt).argmax(1)
    pure = brute_force_gradients(obj, Xt, pred, objective_term=False)
    expected = pure @ Hd_inv @ Gr.T / obj.n
    torch.testing.assert_close(tb.influence(Xt, labels="predicted", test_loss="loss"), expected, rtol=1e-9, atol=1e-12)


def test_accepts_dataset_and_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    obj = make_problem("mlp")
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    ref = _reference(obj, Xt, yt, 1.0)[0]
    torch.testing.assert_close(tb.influence(Xt, yt), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tb.influence(TensorDataset(Xt, yt)), ref, rtol=1e-9, atol=1e-12)
    # shuffle=True: the loader's own order must not matter, the Dataset's order is the test-point order
    torch.testing.assert_close(tb.influence(DataLoader(TensorDataset(Xt, yt), batch_size=3, shuffle=True)), ref,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_rue_analytic_is_the_multinomial_variance_of_the_linearised_loss(device):
    """method="analytic" is Var_w[g_tᵀΔθ(w)] = aᵀ(I − 11ᵀ/n)a at δ' = δ + 1, from the explicit
    covariance of Multinomial(n, 1/n) and brute-force H and gradients."""
    obj = make_problem("mlp", device=device)
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=DAMPING, inverse="dense", eigen="dense")
    assert tb.rue_damping == DAMPING + 1.0
    ref, _ = _analytic_rue(obj, Xt, yt, DAMPING + 1.0)
    torch.testing.assert_close(tb.rue(Xt, yt, method="analytic"), ref, rtol=1e-9, atol=0)


def test_bootstrap_weights_are_multinomial():
    """Rows of non-negative integers summing to n whose mean over B = 20000 draws is 1 and whose
    covariance is the multinomial one, I − 11ᵀ/n, within its Monte-Carlo error; the variance
    of the linearised loss over the same draws is then the analytic value."""
    obj = make_problem("mlp")
    n, B = obj.n, 20000
    W = bootstrap_weights(n, B, seed=3)
    assert W.shape == (B, n)
    assert torch.equal(W, W.round()) and (W >= 0).all() and (W.sum(1) == n).all()
    Sigma = torch.eye(n, dtype=torch.float64) - 1.0 / n
    # one entry of the sample mean / covariance has standard error ≈ 1/√B = 0.007; 6σ over 1600 entries
    assert (W.mean(0) - 1).abs().max() <= 6 / B**0.5
    assert (torch.cov(W.T, correction=0) - Sigma).abs().max() <= 6 * 1.5 / B**0.5
    Xt, yt = _test_points(obj)
    analytic, a = _analytic_rue(obj, Xt, yt, DAMPING + 1.0)
    linear = ((W - 1) @ a.T).var(dim=0, correction=0)
    # Monte-Carlo error of a variance estimate with B = 20000 draws is ~ sqrt(2/B) ≈ 1 %.
    torch.testing.assert_close(linear, analytic, rtol=0.05, atol=0)


def test_rue_bootstrap_is_seeded_and_close_to_linearised_for_small_shifts():
    obj = make_problem("mlp", n=200, weight_decay=0.05)
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=DAMPING, inverse="dense", eigen="dense")
    a = tb.rue(Xt, yt, n_bootstrap=30, seed=1)
    torch.testing.assert_close(a, tb.rue(Xt, yt, n_bootstrap=30, seed=1), rtol=0, atol=0)
    assert not torch.equal(a, tb.rue(Xt, yt, n_bootstrap=30, seed=2))
    # exactly the definition for the seed's draws: explicit shifts, real forward passes of the module
    Hd_inv, Gr = _inverse(obj, DAMPING + 1.0)
    shifts = _shifts(obj, Hd_inv, Gr, bootstrap_weights(obj.n, 30, seed=1))
    torch.testing.assert_close(a, _bootstrap_rue(obj, Xt, yt, shifts), rtol=1e-9, atol=0)
    # With the real forward pass and n = 200 the shifts are small: the bootstrap variance agrees with
    # the linearised analytic value to within its Monte-Carlo error (B = 400 → ~7 %) plus curvature.
    big = tb.rue(Xt, yt, n_bootstrap=400, seed=0)
    torch.testing.assert_close(big, _analytic_rue(obj, Xt, yt, DAMPING + 1.0)[0], rtol=0.25, atol=0)


def _eigh_descending(obj):
    evals, evecs = torch.linalg.eigh(brute_force_hessian(obj))
    return evals.flip(0), evecs.flip(1)


def _scores_all_m(g, V):
    """E_m = ‖(I − V_m V_mᵀ) g‖ for m = 0..M, each by its own projection; (T, M + 1)."""
    return torch.stack([(g - (g @ V[:, :m]) @ V[:, :m].T).norm(dim=1) for m in range(V.shape[1] + 1)], dim=1)


def _predicted_gradients(obj, Xt):
    return brute_force_gradients(obj, Xt, brute_force_outputs(obj, Xt).argmax(1))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_extrapolation_score_properties(kind):
    obj = make_problem(kind)
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    M = obj.num_params
    g = _predicted_gradients(obj, Xt)
    torch.testing.assert_close(tb.extrapolation_score(Xt, m=0), g.norm(dim=1), rtol=1e-12, atol=0)
    scores = torch.stack([tb.extrapolation_score(Xt, m=m) for m in range(M + 1)], dim=1)
    assert (scores[:, 1:] <= scores[:, :-1] + 1e-12).all()
    assert scores[:, -1].abs().max() < 1e-6 * scores[:, 0].max()
    # the definition with brute-force eigenvectors, at every m where V_m is unique (λ_m > λ_{m+1})
    evals, V = _eigh_descending(obj)
    direct = _scores_all_m(g, V)
    unique = torch.cat([torch.tensor([True]), evals[:-1] - evals[1:] > 1e-8 * evals.abs().max(), torch.tensor([True])])
    assert unique.sum() > M // 2
    # compared in squares: E_m² = ‖g‖² − ‖V_mᵀg‖² is exact to round-off of ‖g‖², so E_m itself only to
    # √ε·‖g‖ ≈ 1.5e-8‖g‖ once it is tiny (m near M)
    err = (scores.square() - direct.square()).abs()[:, unique]
    assert (err <= 1e-12 * direct[:, :1].square()).all()


def test_extrapolation_threshold_rule_removes_the_right_count():
    obj = make_problem("mlp")
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    evals, V = _eigh_descending(obj)
    direct = _scores_all_m(_predicted_gradients(obj, Xt), V)
    for tau in (1e-3, 0.02, 0.1, 10.0):
        expected_m = max(2, int((evals > tau).sum()))
        scores = tb.extrapolation_score(Xt, threshold=tau)
        assert tb.last_m == expected_m, tau
        torch.testing.assert_close(scores, direct[:, expected_m], rtol=1e-8, atol=1e-12)


def test_extrapolation_auto_m_is_where_scores_converge():
    """m="auto": the smallest m ≥ 2 with E_m − E_{m+5} ≤ 1e-2·E_m at every test point (the
    documented rule, window 5, rtol 1e-2), from scores of brute-force eigenvectors. Here m = 23:
    the largest relative drop is 0.0059 at m = 23 and 0.0127 at m = 22, far from the 0.01 edge."""
    obj = make_problem("cnn")
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    scores = tb.extrapolation_score(Xt, m="auto")
    _, V = _eigh_descending(obj)
    direct = _scores_all_m(_predicted_gradients(obj, Xt), V)
    converged = [m for m in range(2, obj.num_params - 4)
                 if ((direct[:, m] - direct[:, m + 5]) <= 1e-2 * direct[:, m]).all()]
    assert tb.last_m == converged[0] == 23
    torch.testing.assert_close(scores, direct[:, 23], rtol=1e-8, atol=1e-12)


def test_rue_solves_its_bootstrap_systems_once_for_many_test_chunks():
    obj = make_problem("mlp")
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="cg")
    whole = tb.rue(Xt, yt, n_bootstrap=6, seed=4)
    hvps = tb.operator.num_hvps
    parts = torch.cat([tb.rue(Xt[:2], yt[:2], n_bootstrap=6, seed=4), tb.rue(Xt[2:], yt[2:], n_bootstrap=6, seed=4)])
    assert tb.operator.num_hvps == hvps  # the shifts were reused, not solved again
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=0)
    # the shifts are the definition's: −(H + δ'I)⁻¹ (1/n) Σ_i (w_b,i − 1) g_i with explicit H and g_i
    # (CG to rtol 1e-10 on a system with κ < 3: 1e-8)
    Hd_inv, Gr = _inverse(obj, tb.rue_damping)
    direct = _shifts(obj, Hd_inv, Gr, bootstrap_weights(obj.n, 6, seed=4))
    torch.testing.assert_close(tb.bootstrap_shifts(6, 4), direct, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(whole, _bootstrap_rue(obj, Xt, yt, direct), rtol=1e-7, atol=0)
    tb.rue(Xt, yt, n_bootstrap=6, seed=5)  # another seed: new systems
    assert tb.operator.num_hvps > hvps


def test_rue_with_predicted_labels_keeps_the_labels_of_the_trained_model():
    obj = make_problem("mlp")
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    pred = brute_force_outputs(obj, Xt).argmax(1)
    got = tb.rue(Xt, labels="predicted", n_bootstrap=8, seed=4)
    torch.testing.assert_close(got, tb.rue(Xt, pred, n_bootstrap=8, seed=4))
    # the labels are argmax f(x; θ̃) at every shifted model, not argmax f(x; θ̃ + Δθ_b)
    Hd_inv, Gr = _inverse(obj, tb.rue_damping)
    shifts = _shifts(obj, Hd_inv, Gr, bootstrap_weights(obj.n, 8, seed=4))
    torch.testing.assert_close(got, _bootstrap_rue(obj, Xt, pred, shifts), rtol=1e-9, atol=0)
