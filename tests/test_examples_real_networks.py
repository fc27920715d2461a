"""The two real-network examples on measurement snapshots (examples/transformer_snapshots.py,
examples/lstm_snapshots.py) at tiny sizes: every phase runs, the numbers are finite, and the
exact matrix-free backends agree with the dense oracle to their tolerances. Also the K-FAC
output-Hessian factors of a causal language model: as many as the rank, and exact."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lstm_snapshots  # noqa: E402
import transformer_snapshots  # noqa: E402

pytest.importorskip("transformers")


def finite(value) -> bool:
    """Every number in a nested report is finite (NaN allowed only where a rank measure had < 3 points)."""
    if isinstance(value, dict):
        return all(finite(v) for k, v in value.items() if not k.startswith("spearman"))
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@pytest.fixture(scope="module")
def transformer_report(one_thread):
    return transformer_snapshots.run(replace(transformer_snapshots.PRESETS["tiny"], progress=False))


@pytest.fixture(scope="module")
def lstm_report(one_thread):
    return lstm_snapshots.run(replace(lstm_snapshots.PRESETS["tiny"], progress=False))


# ---------------------------------------------------------------------------------------------- transformer
def test_full_transformer_configuration_has_at_least_five_million_parameters():
    assert transformer_snapshots.count_parameters(transformer_snapshots.PRESETS["full"]) >= 5_000_000


def test_transformer_runs_every_phase(transformer_report):
    r = transformer_report
    assert set(r["phases"]) >= {"ED + Born sampling", "training", "ekfac fit (all blocks)", "ekfac influence (all blocks)",
                                "ekfac self-influence", "ekfac fit (block)", "lanczos top-m (block)", "lees (block)",
                                "rue bootstrap (ekfac, all blocks)", "dense influence (block, oracle)"}
    for row in r["phases"].values():
        assert row["seconds"] >= 0 and row["peak_above_baseline"] >= 0 and row["hvps"] >= 0
    assert r["phases"]["lanczos top-m (block)"]["hvps"] > 0
    assert r["phases"]["ekfac fit (all blocks)"]["hvps"] == 0  # K-FAC passes are no Hessian products
    cfg = transformer_snapshots.PRESETS["tiny"]
    n = cfg.per_v1 * len(cfg.train_v1)
    assert r["n_train"] == n and r["influence"]["shape"] == [cfg.heldout_per_v1 * len(cfg.train_v1), n]
    n_test = (cfg.heldout_per_v1 * len(cfg.train_v1) + cfg.test_per_v1 * (len(cfg.inside_v1) + len(cfg.outside_v1)))
    assert len(r["arrays"]["lees"]) == len(r["arrays"]["rue"]) == n_test
    assert len(r["arrays"]["self_influence"]) == n
    assert finite({k: v for k, v in r.items() if k != "config"})


def test_transformer_exact_backends_agree_with_the_dense_oracle(transformer_report):
    first = transformer_report["block_comparison"]["dampings"][0]
    check = first["dense_check"]
    assert check["cg_vs_dense_relative_error"] < 1e-8
    assert check["lees_lanczos_vs_dense_relative_error"] < 1e-8
    assert check["top_eigenvalues_relative_error"] < 1e-8
    assert first["cg"]["converged"]


def test_transformer_values_are_sane(transformer_report):
    r = transformer_report
    assert all(v >= 0 for v in r["arrays"]["self_influence"])  # g ᵀ (G + δI)⁻¹ g with G PSD
    assert all(v > 0 for v in r["arrays"]["lees"]) and all(v >= 0 for v in r["arrays"]["rue"])
    assert all(v > 0 for v in r["arrays"]["test_nll"])
    assert r["model"]["training"]["final_batch_nll"] < r["model"]["training"]["first_batch_nll"]
    bc = r["block_comparison"]
    assert bc["lambda_max"] > 0 and [d["damping"] for d in bc["dampings"]] == sorted(d["damping"] for d in bc["dampings"])
    for entry in bc["dampings"]:
        assert -1 <= entry["ekfac_vs_cg"]["spearman_median"] <= 1
    for key in ("lees", "rue", "nll_separation"):
        assert 0 <= r[key]["auroc_outside_vs_inside"] <= 1
    assert 0 <= r["influence"]["helpful_same_phase_token"] <= 1


def test_transformer_writes_json_and_figure(transformer_report, tmp_path):
    transformer_snapshots.write(transformer_report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["n_train"] == transformer_report["n_train"]
    assert (tmp_path / "transformer_snapshots.png").stat().st_size > 10_000
    assert "block" in transformer_snapshots.summary(transformer_report)


def test_damaged_snapshots_are_marked_and_changed():
    rng = np.random.default_rng(0)
    clean = transformer_snapshots.born_snapshots(8, (0.5, 3.0), 50, rng, False)
    bad = transformer_snapshots.damage(clean, 0.1, 0.1, rng)
    assert bad.corrupted.sum() == bad.mislabelled.sum() == 10 and not (bad.corrupted & bad.mislabelled).any()
    assert (bad.occupations[bad.corrupted].sum(1) != 4).all() and (clean.occupations.sum(1) == 4).all()
    assert (bad.token[bad.mislabelled] != clean.token[bad.mislabelled]).all()
    assert (bad.occupations[~bad.corrupted] == clean.occupations[~bad.corrupted]).all()
    batch = bad.batch()
    assert batch["input_ids"].shape == (100, 9) and (batch["labels"][:, 0] == -100).all()


def test_symmetry_classes_join_translations_and_reflections():
    occ = np.array([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 1, 0]])
    c = transformer_snapshots.symmetry_classes(occ)
    assert c[0] == c[1] == c[2] != c[3]


# ---------------------------------------------------------------------------------------------- LSTM
def test_lstm_runs_every_method_with_every_backend(lstm_report):
    r = lstm_report
    pairs = {(row["method"], row["backend"]) for row in r["comparison"]}
    assert pairs == {("influence", "dense"), ("influence", "cg"), ("influence", "lissa"), ("influence", "ekfac"),
                     ("relatif", "dense"), ("relatif", "cg"), ("relatif", "cg + ekfac normaliser"),
                     ("rue", "dense"), ("rue", "cg"), ("lees", "dense"), ("lees", "lanczos")}
    cfg = lstm_snapshots.PRESETS["tiny"]
    n, n_test = cfg.per_v1 * len(cfg.train_v1), cfg.test_per_v1 * (len(cfg.test_v1) + len(cfg.outside_v1))
    assert np.shape(r["arrays"]["influence/dense"]) == (cfg.influence_points, n)
    assert np.shape(r["arrays"]["rue/cg"]) == (n_test,) and np.shape(r["arrays"]["lees/lanczos"]) == (n_test,)
    assert r["ekfac_fallback"] and "lstm" in r["ekfac_fallback"][0]  # the LSTM weights have no Kronecker factors
    assert finite({k: v for k, v in r.items() if k != "config"})


def test_lstm_exact_backends_agree_with_the_dense_oracle(lstm_report):
    rows = {(row["method"], row["backend"]): row for row in lstm_report["comparison"]}
    for key in (("influence", "cg"), ("relatif", "cg"), ("rue", "cg"), ("lees", "lanczos")):
        assert rows[key]["max_rel_error"] < 1e-8, key
        assert rows[key]["pearson"] > 1 - 1e-10, key
    assert rows[("influence", "lissa")]["max_rel_error"] < 1e-3  # LiSSA's target 1e-4, a stochastic recursion
    assert lstm_report["backend_diagnostics"]["cg"]["converged"]


def test_lstm_values_are_sane(lstm_report):
    r = lstm_report
    assert r["damping"] > 0 and r["damping"] >= -r["min_eigenvalue"]
    assert all(v >= 0 for v in r["arrays"]["rue/dense"]) and all(v > 0 for v in r["arrays"]["lees/dense"])
    bayes = r["model"]["bayes_optimal_accuracy"]
    assert all(0 <= v <= 1 for v in bayes.values())
    assert set(r["physics"]["rue_by_v1"]) == {f"{v:g}" for v in np.unique(r["arrays"]["test_v1"])}


def test_lstm_writes_json_and_figure(lstm_report, tmp_path):
    lstm_snapshots.write(lstm_report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["damping"] == lstm_report["damping"]
    assert (tmp_path / "lstm_snapshots.png").stat().st_size > 10_000
    assert "lanczos" in lstm_snapshots.summary(lstm_report)


def test_bayes_accuracy_of_the_exact_snapshot_distributions():
    from snapshots_common import bayes_accuracy

    acc = bayes_accuracy(8, (0.2, 4.0), (0.2, 4.0, 8.0))
    assert 0.5 < acc["train"] <= 1 and acc["train"] == pytest.approx(0.5 * (acc["0.2"] + acc["4"]))
    assert acc["8"] >= acc["4"]  # deeper in CDW-I, more Néel snapshots


@pytest.mark.parametrize("module", [transformer_snapshots, lstm_snapshots])
def test_command_line_options(module, tmp_path):
    args = module.build_parser().parse_args(["--quick", "--out", str(tmp_path), "--seed", "3", "--no-progress"])
    cfg = module.config_from_args(args)
    assert cfg.name == "quick" and cfg.seed == 3 and not cfg.progress and args.out == tmp_path
    assert module.config_from_args(module.build_parser().parse_args([])).name == "full"


# ---------------------------------------------------------------------------------------------- the K-FAC fix
def test_output_hessian_factors_of_a_causal_lm_are_exact_and_as_many_as_the_rank():
    """Λ_n of the causal-LM loss over two occupation logits has rank L (one per predicted site) of
    K = 2(L + 1); the factors b must reproduce the per-sample Hessian of the loss with respect to
    the logits, written out here with torch.autograd."""
    from scalable_hbt import Objective
    from scalable_hbt.curvature.kfac import output_hessian_sqrt

    torch.manual_seed(0)
    cfg = replace(transformer_snapshots.PRESETS["tiny"], n_embd=8, n_layer=1)
    model = transformer_snapshots.build_model(cfg).double().eval()
    data = transformer_snapshots.born_snapshots(8, (0.5, 3.0), 3, np.random.default_rng(0), False).batch()
    obj = Objective(model, transformer_snapshots.snapshot_task(), data, dtype=torch.float64, progress=False)
    ids, labels = data["input_ids"], data["labels"]
    with torch.no_grad():
        out = model(input_ids=ids).logits[..., :2]
    b = output_hessian_sqrt(obj, out, labels)
    assert b.shape[0] == 8 and b.shape[1:] == out.shape
    for i in range(len(ids)):
        def loss(o):  # −Σ_t log softmax(o_t)[n_{t+1}], t = 0..L−1
            return -torch.log_softmax(o[:-1], dim=-1).gather(1, labels[i, 1:, None]).sum()

        H = torch.autograd.functional.hessian(loss, out[i]).reshape(out[i].numel(), -1)
        bi = b[:, i].reshape(b.shape[0], -1)
        assert torch.allclose(bi.T @ bi, H, atol=1e-12, rtol=1e-10)


def test_comparison_subset_prefers_configurations_not_yet_picked():
    occ = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]])
    v1 = np.array([2.0, 2.0, 3.0, 3.0, 4.0, 4.0])
    none = np.zeros(6, dtype=bool)
    held = transformer_snapshots.Snapshots(occ, v1, transformer_snapshots.phase_token(v1), none, none)
    assert transformer_snapshots.comparison_subset(held, 2, 3).tolist() == [0, 3, 4]  # V1 = 4 offers nothing new
    assert transformer_snapshots.comparison_subset(held, 2, 2).tolist() == [0, 3]
