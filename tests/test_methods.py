"""The four methods against direct computations from the brute-force Hessian."""

from __future__ import annotations

import pytest
import torch

from scalable_hbt import Toolbox
from scalable_hbt.methods import bootstrap_shifts, bootstrap_weights, m_converged, scores_for_all_m
from conftest import DEVICES, brute_force_gradients, brute_force_hessian, make_problem

DAMPING = 0.5


def _test_points(obj, T=4, seed=7):
    gen = torch.Generator().manual_seed(seed)
    X, y = obj.train.take(range(obj.n))
    Xt = X[:T] + 0.3 * torch.randn(X[:T].shape, generator=gen, dtype=X.dtype)
    return Xt, y[:T]


def _reference(obj, Xt, yt, damping):
    """Influence, similarity, RelatIF straight from the definitions with brute-force H and gradients."""
    H = brute_force_hessian(obj)
    Hd_inv = torch.linalg.inv(H + damping * torch.eye(len(H), dtype=H.dtype, device=H.device))
    X, y = obj.train.take(range(obj.n))
    Gr = brute_force_gradients(obj, X, y)
    Gt = brute_force_gradients(obj, Xt, yt)
    dots = Gt @ Hd_inv @ Gr.T
    norms = (Hd_inv @ Gr.T).norm(dim=0)
    return dots / obj.n, dots.square(), dots / obj.n / norms


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
    H = brute_force_hessian(obj)
    Hd_inv = torch.linalg.inv(H + 2.0 * torch.eye(len(H), dtype=H.dtype))
    X, y = obj.train.take(range(obj.n))
    Gr = brute_force_gradients(obj, X, y)
    pred = obj.forward(obj.theta, Xt).argmax(1)
    pure = brute_force_gradients(obj, Xt, pred, objective_term=False)
    expected = pure @ Hd_inv @ Gr.T / obj.n
    torch.testing.assert_close(tb.influence(Xt, labels="predicted", test_loss="loss"), expected, rtol=1e-9, atol=1e-12)


def test_accepts_dataset_and_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    obj = make_problem("mlp")
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    ref = tb.influence(Xt, yt)
    torch.testing.assert_close(tb.influence(TensorDataset(Xt, yt)), ref)
    torch.testing.assert_close(tb.influence(DataLoader(TensorDataset(Xt, yt), batch_size=3, shuffle=True)), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_rue_bootstrap_mean_approaches_analytic_value_of_linearised_loss(device):
    obj = make_problem("mlp", device=device)
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=0.5, inverse="dense", eigen="dense")
    analytic = tb.rue(Xt, yt, method="analytic")
    # The linearised loss ℓ + g_tᵀΔθ_b over many multinomial draws: its variance is the analytic value.
    Gt = obj.gradients(Xt, yt)
    weights = bootstrap_weights(obj.n, 20000, seed=3)
    shifts = bootstrap_shifts(obj, tb.inverse, tb.rue_damping, weights)
    linear = (Gt @ shifts).var(dim=1, correction=0)
    # Monte-Carlo error of a variance estimate with B = 20000 draws is ~ sqrt(2/B) ≈ 1 %.
    torch.testing.assert_close(linear, analytic, rtol=0.05, atol=0)
    # and the closed form is ||I||² − (Σ I)²/n with I at δ' = δ + 1
    I = Toolbox(obj, damping=1.5, inverse="dense", eigen="dense").influence(Xt, yt)
    torch.testing.assert_close(analytic, I.square().sum(1) - I.sum(1).square() / obj.n)


def test_rue_bootstrap_is_seeded_and_close_to_linearised_for_small_shifts():
    obj = make_problem("mlp", n=200, weight_decay=0.05)
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=0.5, inverse="dense", eigen="dense")
    a = tb.rue(Xt, yt, n_bootstrap=30, seed=1)
    torch.testing.assert_close(a, tb.rue(Xt, yt, n_bootstrap=30, seed=1), rtol=0, atol=0)
    assert not torch.equal(a, tb.rue(Xt, yt, n_bootstrap=30, seed=2))
    # With the real forward pass and n = 200 the shifts are small: the bootstrap variance agrees with
    # the linearised analytic value to within its Monte-Carlo error (B = 400 → ~7 %) plus curvature.
    big = tb.rue(Xt, yt, n_bootstrap=400, seed=0)
    torch.testing.assert_close(big, tb.rue(Xt, yt, method="analytic"), rtol=0.25, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_extrapolation_score_properties(kind):
    obj = make_problem(kind)
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    M = obj.num_params
    g = obj.gradients(Xt, labels="predicted")
    torch.testing.assert_close(tb.extrapolation_score(Xt, m=0), g.norm(dim=1))
    scores = torch.stack([tb.extrapolation_score(Xt, m=m) for m in range(M + 1)], dim=1)
    assert (scores[:, 1:] <= scores[:, :-1] + 1e-12).all()
    assert scores[:, -1].abs().max() < 1e-6 * scores[:, 0].max()
    # direct definition with brute-force eigenvectors
    evals, evecs = torch.linalg.eigh(brute_force_hessian(obj))
    V = evecs[:, -5:]
    direct = (g - (g @ V) @ V.T).norm(dim=1)
    torch.testing.assert_close(scores[:, 5], direct, rtol=1e-8, atol=1e-10)


def test_extrapolation_threshold_rule_removes_the_right_count():
    obj = make_problem("mlp")
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    evals = torch.linalg.eigvalsh(brute_force_hessian(obj))
    for tau in (1e-3, 0.02, 0.1, 10.0):
        expected_m = max(2, int((evals > tau).sum()))
        scores = tb.extrapolation_score(Xt, threshold=tau)
        assert tb.last_m == expected_m, tau
        torch.testing.assert_close(scores, tb.extrapolation_score(Xt, m=expected_m))


def test_extrapolation_auto_m_is_where_scores_converge():
    obj = make_problem("cnn")
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    scores = tb.extrapolation_score(Xt, m="auto")
    m = tb.last_m
    _, V = tb.eigen.eigh(obj.num_params)
    all_m = scores_for_all_m(obj.gradients(Xt, labels="predicted"), V)
    torch.testing.assert_close(scores, all_m[:, m])
    assert ((all_m[:, m] - all_m[:, m + 5]) <= 1e-2 * all_m[:, m]).all()
    if m > 2:  # one step earlier has not converged for some test point
        assert not ((all_m[:, m - 1] - all_m[:, m + 4]) <= 1e-2 * all_m[:, m - 1]).all()
    assert m == m_converged(all_m)


def test_rue_solves_its_bootstrap_systems_once_for_many_test_chunks():
    obj = make_problem("mlp")
    Xt, yt = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="cg")
    whole = tb.rue(Xt, yt, n_bootstrap=6, seed=4)
    hvps = tb.operator.num_hvps
    parts = torch.cat([tb.rue(Xt[:2], yt[:2], n_bootstrap=6, seed=4), tb.rue(Xt[2:], yt[2:], n_bootstrap=6, seed=4)])
    assert tb.operator.num_hvps == hvps  # the shifts were reused, not solved again
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=0)
    # the shifts are those of the function-level definition
    direct = bootstrap_shifts(obj, tb.inverse, tb.rue_damping, bootstrap_weights(obj.n, 6, seed=4))
    torch.testing.assert_close(tb.bootstrap_shifts(6, 4), direct, rtol=1e-8, atol=1e-12)
    tb.rue(Xt, yt, n_bootstrap=6, seed=5)  # another seed: new systems
    assert tb.operator.num_hvps > hvps


def test_rue_with_predicted_labels_keeps_the_labels_of_the_trained_model():
    obj = make_problem("mlp")
    Xt, _ = _test_points(obj)
    tb = Toolbox(obj, damping=1.0, inverse="dense", eigen="dense")
    pred = obj.forward(obj.theta, Xt).argmax(1)
    torch.testing.assert_close(tb.rue(Xt, labels="predicted", n_bootstrap=8, seed=4),
                               tb.rue(Xt, pred, n_bootstrap=8, seed=4))
