"""Tests of scalable_hbt.physics: exact diagonalisation, data sets, CNNs and training.

Everything fast runs at L = 8 or L = 10; the L = 12 data set is behind the `slow` marker.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scalable_hbt.physics import datasets as ds
from scalable_hbt.physics import hubbard
from scalable_hbt.physics import (
    MinMaxScaler,
    PaperCNN,
    SizeInvariantCNN,
    cdw_order_parameter,
    count_parameters,
    fock_basis,
    ground_states,
    hamiltonian,
    paper_weight_decay,
    TrainingRecipe,
    site_occupations,
    train_model,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never write to the user's cache: point the default cache dir into tmp_path."""
    monkeypatch.setenv("SCALABLE_HBT_CACHE", str(tmp_path / "default-cache"))


def _states(L, v1, **kwargs):
    return ground_states(L, v1, cache_dir=False, progress=False, **kwargs)


def _translated_indices(L: int, shift: int = 1) -> np.ndarray:
    """Index of the basis state with occupations n'_j = n_{(j + shift) mod L}."""
    occ = site_occupations(L)
    moved = np.roll(occ, -shift, axis=1)
    weights = 1 << (L - 1 - np.arange(L))
    return np.searchsorted(fock_basis(L), moved.astype(np.int64) @ weights)


# ----------------------------------------------------------------------------- basis


def test_fock_basis_order_and_size():
    assert fock_basis(4).tolist() == [3, 5, 6, 9, 10, 12]
    assert fock_basis(2).tolist() == [1, 2]
    assert len(fock_basis(12)) == math.comb(12, 6) == 924
    assert len(fock_basis(14)) == math.comb(14, 7) == 3432
    assert np.all(np.diff(fock_basis(10)) > 0)


def test_site_j_is_bit_L_minus_1_minus_j():
    occ = site_occupations(4)
    # 12 = 0b1100: sites 0 and 1 occupied; 3 = 0b0011: sites 2 and 3.
    assert occ[list(fock_basis(4)).index(12)].tolist() == [1, 1, 0, 0]
    assert occ[list(fock_basis(4)).index(3)].tolist() == [0, 0, 1, 1]
    assert np.all(occ.sum(axis=1) == 2)


@pytest.mark.parametrize("L", [3, 7, 0, 1, -2])
def test_bad_length_rejected(L):
    with pytest.raises(ValueError, match="L"):
        fock_basis(L)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_v1_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        _states(8, [0.5, bad])
    with pytest.raises(ValueError, match="finite"):
        hamiltonian(8, bad)


def test_odd_length_error_names_the_problem():
    with pytest.raises(ValueError, match="even"):
        ground_states(9, [1.0], cache_dir=False)


# ----------------------------------------------------------------------- Hamiltonian


def test_hamiltonian_symmetric_and_only_nearest_neighbour_hops():
    L = 8
    H = hamiltonian(L, 1.3)
    assert isinstance(H, sp.csr_matrix)
    assert abs(H - H.T).max() == 0.0
    basis = fock_basis(L)
    off = sp.triu(H, k=1).tocoo()
    assert off.nnz > 0
    np.testing.assert_array_equal(off.data, -0.5)
    adjacent_pairs = {(1 << (L - 1 - j)) | (1 << (L - 1 - (j + 1) % L)) for j in range(L)}
    for r, c in zip(off.row, off.col):
        diff = int(basis[r] ^ basis[c])
        assert diff in adjacent_pairs  # one particle moved by one site (ring), same popcount
        assert bin(int(basis[r])).count("1") == bin(int(basis[c])).count("1") == L // 2


def test_boundary_hop_has_no_fermionic_sign():
    basis = list(fock_basis(4))
    H = hamiltonian(4, 0.0).toarray()
    # 0b0011 (sites 2, 3) -> 0b1010 (sites 0, 2): the particle hops across the bond 3 <-> 0.
    assert H[basis.index(0b0011), basis.index(0b1010)] == -0.5


def test_diagonal_is_interaction_plus_staggered_field():
    L, v1, h = 6, 2.5, 1e-3
    diag = hamiltonian(L, v1, h).diagonal()
    occ = site_occupations(L).astype(float)
    expected = v1 * (occ * np.roll(occ, -1, axis=1)).sum(1) - h * (occ * (-1.0) ** np.arange(L)).sum(1)
    np.testing.assert_allclose(diag, expected, rtol=0, atol=1e-15)


# ------------------------------------------------------------------- ground states


@pytest.mark.parametrize("L", [4, 6, 8, 10])
def test_ground_states_match_dense_diagonalisation(L):
    v1 = np.array([0.0, 0.5, 1.0, 3.0, 40.0])
    states, energies = _states(L, v1, return_energies=True)
    assert states.shape == (len(v1), math.comb(L, L // 2))
    assert states.dtype == np.float64
    for i, value in enumerate(v1):
        w, V = np.linalg.eigh(hamiltonian(L, value).toarray())
        assert energies[i] == pytest.approx(w[0], abs=1e-10)
        if w[1] - w[0] > 1e-4:
            assert abs(V[:, 0] @ states[i]) == pytest.approx(1.0, abs=1e-10)
        else:
            # Near-degenerate CDW-I pair: the state lies in the lowest pair and, since the
            # field h still resolves them, is the lower one.
            assert np.linalg.norm(V[:, :2].T @ states[i]) == pytest.approx(1.0, abs=1e-10)
            assert abs(V[:, 0] @ states[i]) == pytest.approx(1.0, abs=1e-6)


def test_sign_convention_and_normalisation():
    states = _states(10, [0.0, 0.7, 1.0, 2.0, 10.0, 40.0])
    assert states.min() >= -1e-12
    assert np.all(states.sum(axis=1) > 0)
    np.testing.assert_allclose(np.linalg.norm(states, axis=1), 1.0, atol=1e-12)


def test_luttinger_liquid_ground_state_is_translation_invariant():
    L = 10
    states = _states(L, [0.0, 0.5, 0.9])
    for shift in (1, 2, 3):
        np.testing.assert_allclose(states[:, _translated_indices(L, shift)], states, atol=1e-6)


def test_deep_cdw_state_is_the_even_site_pattern():
    L = 10
    state = _states(L, [100.0])[0]
    even_sites = sum(1 << (L - 1 - j) for j in range(0, L, 2))  # 1010101010
    assert fock_basis(L)[state.argmax()] == even_sites
    assert state.max() > 0.99


def test_scalar_v1_and_empty_input():
    assert _states(8, 0.3).shape == (1, 70)
    assert _states(8, []).shape == (0, 70)


# ------------------------------------------------------------------ order parameter


def test_cdw_order_parameter_on_simple_states():
    L = 8
    basis = list(fock_basis(L))
    perfect = np.zeros(len(basis))
    perfect[basis.index(0b10101010)] = -3.0  # sign and norm do not matter
    other = np.zeros(len(basis))
    other[basis.index(0b01010101)] = 1.0
    uniform = np.ones(len(basis))
    values = cdw_order_parameter(L, np.stack([perfect, other, perfect / 3 + other, uniform]))
    # either CDW pattern and their symmetric superposition: 1; all Fock states equally: 1/(L-1)
    np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 1 / (L - 1)], atol=1e-14)
    assert cdw_order_parameter(L, perfect) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        cdw_order_parameter(L, np.ones((2, 71)))


@pytest.mark.parametrize("L", [8, 10])
def test_cdw_order_parameter_free_fermions_is_2_over_L(L):
    """At V1 = 0 the chain is free fermions: S(pi) = 1/2 exactly, so O = 4 S(pi) / L = 2/L,
    which vanishes as L grows (the Luttinger liquid has no long-range CDW order)."""
    assert cdw_order_parameter(L, _states(L, 0.0)) == pytest.approx(2 / L, abs=1e-9)


def test_cdw_order_parameter_rises_across_the_transition():
    """Small in the LL, rises around V1 ~ 1-3, -> 1 deep in CDW-I, without relying on the
    staggered field to break the symmetry of the two CDW-I patterns."""
    L = 10
    v1 = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 6.0, 100.0])
    order = cdw_order_parameter(L, _states(L, v1))
    assert np.all(np.diff(order) > 0)
    assert order[0] < 0.25 and order[2] < 0.4  # LL side
    assert order[3] > 0.55 and order[4] > 0.75  # rises by V1 = 2-3
    assert order[-1] > 0.999
    # independent of the symmetry-breaking field: h = 0 (symmetric superposition) agrees
    np.testing.assert_allclose(cdw_order_parameter(L, _states(L, v1, h=0.0)), order, atol=1e-6)


# -------------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path, monkeypatch):
    v1 = np.linspace(0.0, 2.0, 4)
    first, e_first = ground_states(8, v1, cache_dir=tmp_path, progress=False,
                                   return_energies=True)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_eigsh(*args, **kwargs):
        raise AssertionError("eigsh called although the result is cached")

    monkeypatch.setattr(hubbard.spla, "eigsh", no_eigsh)
    second, e_second = ground_states(8, v1, cache_dir=tmp_path, progress=False,
                                     return_energies=True)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(e_first, e_second)
    # A different grid (or field) is a different key and is recomputed.
    with pytest.raises(AssertionError, match="cached"):
        ground_states(8, v1 + 1e-12, cache_dir=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="cached"):
        ground_states(8, v1, h=2e-7, cache_dir=tmp_path, progress=False)


def test_default_cache_dir_env_and_disabling(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALABLE_HBT_CACHE", str(tmp_path / "env"))
    assert hubbard.default_cache_dir() == tmp_path / "env"
    ground_states(8, [0.5], progress=False)
    assert len(list((tmp_path / "env").glob("*.npz"))) == 1
    monkeypatch.setenv("SCALABLE_HBT_CACHE", str(tmp_path / "off"))
    ground_states(8, [0.5], cache_dir=False, progress=False)
    assert not (tmp_path / "off").exists()


def test_corrupt_cache_file_is_recomputed(tmp_path):
    v1 = [0.25, 4.0]
    good = ground_states(8, v1, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a zip file")
    np.testing.assert_array_equal(ground_states(8, v1, cache_dir=tmp_path, progress=False), good)


def test_unwritable_cache_warns_and_still_returns(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.warns(RuntimeWarning, match="cache"):
        states = ground_states(8, [0.5], cache_dir=not_a_directory, progress=False)
    np.testing.assert_array_equal(states, _states(8, [0.5]))


# ------------------------------------------------------------------------- QuSpin


def test_matches_quspin():
    pytest.importorskip("quspin")
    from quspin.basis import boson_basis_1d
    from quspin.operators import hamiltonian as quspin_hamiltonian

    L, h = 8, hubbard.DEFAULT_FIELD
    basis = boson_basis_1d(L, Nb=L // 2, sps=2)
    bonds = [[-0.5, j, (j + 1) % L] for j in range(L)]
    for v1 in (0.5, 3.0):
        static = [
            ["+-", bonds],
            ["-+", bonds],
            ["nn", [[v1, j, (j + 1) % L] for j in range(L)]],
            ["n", [[-h * (-1) ** j, j] for j in range(L)]],
        ]
        H = quspin_hamiltonian(static, [], basis=basis, dtype=np.float64, check_symm=False,
                               check_herm=False, check_pcon=False)
        energies, vectors = H.eigh()
        ours, our_energy = _states(L, [v1], return_energies=True)
        assert our_energy[0] == pytest.approx(energies[0], abs=1e-10)
        order = np.searchsorted(fock_basis(L), np.asarray(basis.states))
        reference = np.zeros_like(ours[0])
        reference[order] = vectors[:, 0]
        assert abs(reference @ ours[0]) == pytest.approx(1.0, abs=1e-8)


# ------------------------------------------------------------------------ data sets


def test_grids_and_labels():
    train = ds.training_grid()
    assert train.shape == (1000,)
    np.testing.assert_array_equal(train[:500], np.linspace(0, 1, 500))
    np.testing.assert_array_equal(train[500:], np.linspace(1.01, 40, 500))
    quick = ds.training_grid(100)
    assert quick.shape == (200,)
    assert (quick[0], quick[99], quick[100], quick[-1]) == (0.0, 1.0, 1.01, 40.0)
    test = ds.evaluation_grid()
    np.testing.assert_array_equal(test[:20], np.linspace(0.01, 0.999, 20, endpoint=False))
    np.testing.assert_array_equal(test[20:], np.geomspace(1.02, 39, 30))
    np.testing.assert_array_equal(ds.phase_labels([0.0, 1.0, 1.0000001, 40.0]), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="n_per_phase"):
        ds.training_grid(0)


def test_training_set_contents_and_tensors():
    train = ds.training_set(8, 10, cache_dir=False, progress=False)
    assert len(train) == 20 and train.dim == 70 and train.L == 8
    np.testing.assert_array_equal(train.labels, [0] * 10 + [1] * 10)
    assert not train.sign_flipped.any() and not train.ood.any()
    np.testing.assert_array_equal(train.amplitudes, _states(8, ds.training_grid(10)))

    scaler = MinMaxScaler.fit(train.amplitudes)
    assert (scaler.min, scaler.max) == (train.amplitudes.min(), train.amplitudes.max())
    X, y = train.tensors(scaler)
    assert X.shape == (20, 1, 70) and X.dtype == torch.float32
    assert y.dtype == torch.long and y.tolist() == train.labels.tolist()
    assert X.min().item() == 0.0 and X.max().item() == pytest.approx(1.0)


def test_evaluation_set_uses_training_min_max():
    train = ds.training_set(8, 10, cache_dir=False, progress=False)
    test = ds.evaluation_set(8, 4, 6, cache_dir=False, progress=False)
    assert len(test) == 10
    scaler = MinMaxScaler.fit(train.amplitudes)
    X, _ = test.tensors(scaler, dtype=torch.float64)
    expected = (test.amplitudes - train.amplitudes.min()) / np.ptp(train.amplitudes)
    np.testing.assert_allclose(X[:, 0].numpy(), expected, rtol=0, atol=1e-15)
    # Not the test set's own min-max.
    assert not np.allclose(X[:, 0].numpy(), MinMaxScaler.fit(test.amplitudes).transform(test.amplitudes))
    with pytest.raises(ValueError, match="min < max"):
        MinMaxScaler.fit(np.ones((3, 4)))


def test_sign_variants_flip_the_right_points():
    base = ds.training_set(8, 10, cache_dir=False, progress=False)
    imbalanced = ds.training_set(8, 10, sign="imbalanced", n_flipped=3, seed=5,
                                 cache_dir=False, progress=False)
    flipped = imbalanced.sign_flipped
    assert flipped.sum() == 3
    np.testing.assert_array_equal(imbalanced.amplitudes[flipped], -base.amplitudes[flipped])
    np.testing.assert_array_equal(imbalanced.amplitudes[~flipped], base.amplitudes[~flipped])
    np.testing.assert_array_equal(imbalanced.labels, base.labels)
    again = ds.training_set(8, 10, sign="imbalanced", n_flipped=3, seed=5, cache_dir=False,
                            progress=False)
    np.testing.assert_array_equal(again.sign_flipped, flipped)

    default = ds.training_set(8, 10, sign="imbalanced", cache_dir=False, progress=False)
    assert default.sign_flipped.sum() == ds.PAPER_N_SIGN_FLIPPED
    balanced = ds.training_set(8, 10, sign="balanced", cache_dir=False, progress=False)
    assert balanced.sign_flipped.sum() == 10
    assert np.all((balanced.amplitudes.sum(axis=1) < 0) == balanced.sign_flipped)

    negative = ds.evaluation_set(8, 3, 3, sign="negative", cache_dir=False, progress=False)
    assert negative.sign_flipped.all() and np.all(negative.amplitudes <= 1e-12)

    with pytest.raises(ValueError, match="n_flipped"):
        ds.training_set(8, 10, sign="balanced", n_flipped=2, cache_dir=False)
    with pytest.raises(ValueError, match="sign"):
        ds.training_set(8, 10, sign="negative", cache_dir=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        ds.flip_signs(base, 21)


def test_ood_points_are_permutations_of_their_state():
    regular = ds.evaluation_set(8, 5, 5, cache_dir=False, progress=False)
    mixed = ds.evaluation_set(8, 5, 5, ood_fraction=0.3, seed=2, cache_dir=False, progress=False)
    assert mixed.ood.sum() == 3
    for i in range(len(regular)):
        if mixed.ood[i]:
            np.testing.assert_array_equal(np.sort(mixed.amplitudes[i]), np.sort(regular.amplitudes[i]))
            assert not np.array_equal(mixed.amplitudes[i], regular.amplitudes[i])
        else:
            np.testing.assert_array_equal(mixed.amplitudes[i], regular.amplitudes[i])
    np.testing.assert_array_equal(mixed.labels, regular.labels)
    default = ds.permute_components(regular)
    assert default.ood.sum() == round(ds.PAPER_OOD_FRACTION * len(regular))
    with pytest.raises(ValueError, match="fraction"):
        ds.permute_components(regular, 1.5)


def test_no_physics_function_is_collected_by_pytest():
    """A test module imports the data set functions by name: none may look like a test."""
    import scalable_hbt.physics as physics

    assert [name for name in (*physics.__all__, *ds.__all__) if name.lower().startswith("test")] == []


# -------------------------------------------------------------------------- models


def test_paper_cnn_has_740_parameters_and_flattens_to_140():
    model = PaperCNN()
    assert count_parameters(model) == 740
    x = torch.randn(3, 1, 924)
    assert model.features(x).shape == (3, 10, 14)
    assert model(x).shape == (3, 2)
    with pytest.raises(ValueError, match="924"):
        model(torch.randn(1, 1, 3432))


def test_size_invariant_cnn_has_1675_parameters_and_takes_both_sizes():
    model = SizeInvariantCNN().eval()
    assert count_parameters(model) == 1675
    for length in (924, 3432, 252):
        x = torch.randn(2, 1, length)
        assert model.features(x).shape == (2, 25, 1)
        assert model(x).shape == (2, 2)
    with pytest.raises(ValueError, match="length"):
        model(torch.randn(2, 1, 59))


def test_paper_weight_decay():
    assert paper_weight_decay(1000) == pytest.approx(5e-5)
    assert paper_weight_decay(10, lam=1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="n"):
        paper_weight_decay(0)


@pytest.fixture
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a busy shared machine
    two OpenMP threads can stall each other for whole scheduler slices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_problem(dtype=torch.float64):
    train = ds.training_set(10, 15, cache_dir=False, progress=False)
    return train.tensors(MinMaxScaler.fit(train.amplitudes), dtype=dtype)


def _train(X, y, *, seed, dtype=torch.float64, lbfgs_iterations=40):
    torch.manual_seed(0)
    model = SizeInvariantCNN().to(dtype)
    initial = [p.detach().clone() for p in model.parameters()]
    rng_before = torch.get_rng_state()
    result = train_model(model, X, y, weight_decay=paper_weight_decay(len(y)), epochs=20,
                         lr=1e-2, seed=seed, batch_size=8, lbfgs_iterations=lbfgs_iterations,
                         progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG left untouched
    return result, initial


def test_train_model_is_seeded_and_reduces_the_objective(one_thread):
    X, y = _tiny_problem()
    first, initial = _train(X, y, seed=3)
    second, _ = _train(X, y, seed=3)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert first.objective == second.objective and first.grad_norm == second.grad_norm
    assert not first.model.training
    assert math.isfinite(first.grad_norm) and first.lbfgs_iterations > 0

    start = SizeInvariantCNN().double().eval()
    with torch.no_grad():
        for p, q in zip(start.parameters(), initial):
            p.copy_(q)
        wd = paper_weight_decay(len(y))
        initial_objective = (torch.nn.functional.cross_entropy(start(X), y)
                             + 0.5 * wd * sum((q * q).sum() for q in initial)).item()
    assert first.objective < 0.5 * initial_objective

    other, _ = _train(X, y, seed=4)
    assert other.objective != first.objective


def test_train_model_float32_and_bad_input(one_thread):
    X, y = _tiny_problem(torch.float32)
    result, _ = _train(X, y, seed=0, dtype=torch.float32, lbfgs_iterations=5)
    assert next(result.model.parameters()).dtype == torch.float32
    assert math.isfinite(result.objective)
    with pytest.raises(ValueError, match="one row per label"):
        train_model(SizeInvariantCNN(), X[:3], y, weight_decay=0.0, epochs=1, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="weight_decay"):
        train_model(SizeInvariantCNN(), X, y, weight_decay=-1.0, epochs=1, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="integer"):
        train_model(SizeInvariantCNN(), X, y.float(), weight_decay=0.0, epochs=1, lr=1e-3, seed=0)


@pytest.mark.parametrize("schedule, factors", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("step", [1.0, 1.0, 0.1, 0.01]),  # lr/10 from epoch E/2, lr/100 from 3E/4
    ("cosine", [(1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
])
def test_sgd_mode_is_plain_gradient_descent_with_the_schedule(one_thread, schedule, factors):
    """Full batch, momentum 0, no dropout, no polish: theta_{e+1} = theta_e - lr_e grad L(theta_e)."""
    X, y = _tiny_problem()
    wd, lr = paper_weight_decay(len(y)), 0.05
    torch.manual_seed(0)
    model = SizeInvariantCNN(dropout=0.0).double()
    reference = SizeInvariantCNN(dropout=0.0).double()
    reference.load_state_dict(model.state_dict())
    result = train_model(model, X, y, weight_decay=wd, epochs=4, lr=lr, seed=0, optimizer="sgd",
                         momentum=0.0, schedule=schedule, lbfgs_iterations=0, progress=False)
    assert result.lbfgs_iterations == 0 and not result.model.training
    params = list(reference.parameters())
    for factor in factors:
        value = (torch.nn.functional.cross_entropy(reference(X), y)
                 + 0.5 * wd * sum((p * p).sum() for p in params))
        grads = torch.autograd.grad(value, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * factor * g
    for got, want in zip(result.model.parameters(), params):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_sgd_mode_is_seeded(one_thread):
    """Mini-batch SGD with momentum and dropout on: same seed, same parameters; one objective
    value per epoch and no L-BFGS iteration. (That it learns is checked at L = 12 by the slow
    tests in test_paper_findings.py; this tiny set barely moves SGD off ln 2.)"""
    X, y = _tiny_problem()
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = SizeInvariantCNN().double()
        runs.append(train_model(model, X, y, weight_decay=paper_weight_decay(len(y)), epochs=30, lr=0.05,
                                seed=seed, batch_size=10, optimizer="sgd", schedule="step",
                                lbfgs_iterations=0, progress=False))
    first, again, other = runs
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert other.objective != first.objective
    assert first.lbfgs_iterations == 0 and len(first.history) == 30 and not first.model.training


def test_training_recipe_is_a_front_of_train_model(one_thread):
    """A recipe's defaults are train_model's, and training with it is train_model with the
    recipe's settings and its epochs for the data size."""
    import inspect

    defaults = inspect.signature(train_model).parameters
    recipe = TrainingRecipe(optimizer="adam", lr=1e-2, steps=6)
    for name in ("batch_size", "momentum", "schedule", "lbfgs_iterations"):
        assert getattr(recipe, name) == defaults[name].default, name
    assert recipe.epochs(30) == 6  # full batch: one step per epoch
    X, y = _tiny_problem()
    recipe = TrainingRecipe(optimizer="sgd", lr=0.05, steps=6, batch_size=8, schedule="step", lbfgs_iterations=3)
    runs = []
    for train in (lambda m: recipe.train(m, X, y, weight_decay=1e-3, seed=2, progress=False),
                  lambda m: train_model(m, X, y, weight_decay=1e-3, seed=2, epochs=recipe.epochs(len(y)), lr=0.05,
                                        batch_size=8, optimizer="sgd", schedule="step", lbfgs_iterations=3,
                                        progress=False)):
        torch.manual_seed(0)
        runs.append(train(SizeInvariantCNN().double()))
    assert recipe.epochs(len(y)) == 2 and runs[0].objective == runs[1].objective
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)


def test_train_model_rejects_bad_optimizer_settings():
    X, y = _tiny_problem()
    common = dict(weight_decay=0.0, epochs=1, lr=1e-3, seed=0, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train_model(SizeInvariantCNN(), X, y, optimizer="rmsprop", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        train_model(SizeInvariantCNN(), X, y, optimizer="sgd", momentum=1.0, **common)
    with pytest.raises(ValueError, match="schedule"):
        train_model(SizeInvariantCNN(), X, y, schedule="linear", **common)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- L = 12


@pytest.mark.slow
def test_paper_training_set_L12(tmp_path):
    train = ds.training_set(12, cache_dir=tmp_path, progress=False)
    assert train.amplitudes.shape == (1000, 924)
    assert train.labels.sum() == 500
    assert train.amplitudes.min() >= -1e-12
    order = cdw_order_parameter(12, train.amplitudes)
    assert order[0] == pytest.approx(2 / 12, abs=1e-9) and np.all(order[:500] < 0.34)
    assert order[-1] > 0.99 and np.all(np.diff(order) > 0)
    X, y = train.tensors(MinMaxScaler.fit(train.amplitudes))
    with torch.no_grad():
        assert PaperCNN().eval()(X[:10]).shape == (10, 2)
    again = ds.training_set(12, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.amplitudes, train.amplitudes)
    assert os.listdir(tmp_path)
