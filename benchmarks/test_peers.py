"""Peers side by side: same model, same data, same run.

On the trained physics problems (float64, ``physics_problems.py``), each question is
answered by our implementation and by a peer library, timed interleaved in one process
(``harness.Interleaved``), and both are scored against the dense oracle. The report gives
ratios ours / peer for time and for error, never absolute times alone.

* PyHessian: top-5 eigenvalues (power iteration with deflation, its defaults) against our
  Lanczos (``LanczosCurvature(m=5)``); the Hessian trace (Hutchinson, its defaults) against
  ``spectral.hutchinson_trace`` with 100 Rademacher vectors.
* curvlinops: a full-data HVP (``HessianLinearOperator``) against ``HessianOperator.matvec``;
  K-FAC (``KFACLinearOperator``, type-2 Fisher = the exact GGN's expectation) against
  ``KFACCurvature``, as relative Frobenius distance of Ĥ to the exact Hessian (Linear layers
  only: the MLP).
* kronfluence: EK-FAC pairwise influence (its ``Analyzer``, true Fisher with sampled labels)
  against ``EKFACCurvature`` + ``methods.influence`` (Linear layers only: the MLP).

The peers have no weight decay. Eigenvalues and traces: wd (resp. wd·M) is added to the
peer's number. Influence: both sides use pure-loss gradients and damping δ + wd on the
loss Hessian, which is the toolbox's H + δI exactly; the reference is
I_ref = (1/n) g_tᵀ (H + δI)⁻¹ g_r from the dense eigendecomposition, pure-loss gradients.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from ground_truth.peers import kronfluence_classification_task
from harness import Interleaved
from physics_problems import PhysicsProblem
from settings import MIN_ROUNDS, rounds
from torch import nn

from scalable_hbt import HessianOperator, Objective
from scalable_hbt.curvature import EKFACCurvature, KFACCurvature, LanczosCurvature
from scalable_hbt.methods import influence
from scalable_hbt.metrics import agreement, max_elementwise_relative_error, relative_error
from scalable_hbt.curvature.spectral import hutchinson_trace

ROUNDS = rounds(3)
TOP_N = 5


def _require(peer: str) -> None:
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} is not installed (pip install -e '.[bench]')")


def _linear_only(problem: PhysicsProblem, peer: str) -> None:
    if any(isinstance(m, (nn.Conv1d,)) for m in problem.objective.model.modules()):
        pytest.skip(f"{peer} supports Linear/Conv2d layers only; {problem.name} has Conv1d")


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """PyHessian draws its random vectors with the default dtype; our problems are float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _row(problem: PhysicsProblem, peer: str, quantity: str, it: Interleaved, ours_err: float, peer_err: float,
         note: str = "") -> dict:
    """ours / peer for time (median over rounds of the per-round quotient) and for error."""
    r = it.ratio("ours", "peer")
    if r["rounds"] < MIN_ROUNDS:
        raise ValueError(f"{problem.name} / {peer}: {quantity} measured over {r['rounds']} round(s) < {MIN_ROUNDS}.")
    return {"model": problem.name, "peer": peer, "quantity": quantity, "time_ratio": r["value"],
            "time_ratio_lo": r["lo"], "time_ratio_hi": r["hi"], "rounds": r["rounds"],
            "ours_seconds": it.median("ours"), "peer_seconds": it.median("peer"),
            "ours_error": ours_err, "peer_error": peer_err,
            "error_ratio": ours_err / peer_err if peer_err > 0 else None, "note": note}


def _publish(benchmark, problem: PhysicsProblem, row: dict) -> None:
    benchmark.extra_info.update(kind="peers", physics_problem=problem.info(), peers_rows=[row])


def _pyhessian(problem: PhysicsProblem):
    from pyhessian import hessian

    X, y = problem.objective.train.take(range(problem.objective.n))
    model = copy.deepcopy(problem.objective.model).eval()
    return hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=problem.objective.device.type == "cuda")


# ---------------------------------------------------------------------------- PyHessian
def test_pyhessian_top_eigenvalues(benchmark, physics_problem):
    _require("pyhessian")
    p = physics_problem
    wd = p.objective.weight_decay
    exact = p.exact.eigen.eigh(TOP_N)[0].double().cpu().numpy()

    def peer():
        with _default_dtype(torch.float64):
            return _pyhessian(p).eigenvalues(top_n=TOP_N)[0]

    def ours():
        return LanczosCurvature(m=TOP_N).fit(HessianOperator(p.objective)).eigh(TOP_N)[0]

    it = Interleaved({"ours": ours, "peer": peer}).run(benchmark, ROUNDS)
    err_ours = max_elementwise_relative_error(exact, it.outputs["ours"].double().cpu().numpy())
    peer_vals = np.sort(np.asarray(it.outputs["peer"], dtype=float))[::-1] + wd
    err_peer = max_elementwise_relative_error(exact, peer_vals)
    _publish(benchmark, p, _row(p, "pyhessian", f"top-{TOP_N} eigenvalues (max relative error)", it, err_ours,
                                err_peer, "ours: Lanczos tol 1e-10; PyHessian: power iteration, maxIter 100, tol 1e-3"))


def test_pyhessian_trace(benchmark, physics_problem):
    _require("pyhessian")
    p = physics_problem
    M, wd = p.objective.num_params, p.objective.weight_decay
    exact = float(p.exact.eigen.eigenvalues.sum())

    def peer():
        with _default_dtype(torch.float64):
            return float(np.mean(_pyhessian(p).trace())) + wd * M

    def ours():
        return hutchinson_trace(HessianOperator(p.objective), n_samples=100, seed=0)[0]

    it = Interleaved({"ours": ours, "peer": peer}).run(benchmark, ROUNDS)
    err = {k: max_elementwise_relative_error(exact, it.outputs[k]) for k in ("ours", "peer")}
    _publish(benchmark, p, _row(p, "pyhessian", "trace, Hutchinson (relative error)", it, err["ours"], err["peer"],
                                "ours: 100 Rademacher vectors in 16-vector blocks; PyHessian: ≤ 100 vectors, "
                                "stops at relative change 1e-3 (stochastic: one seed each)"))


# ---------------------------------------------------------------------------- curvlinops
def test_curvlinops_hvp(benchmark, physics_problem):
    _require("curvlinops")
    from curvlinops import HessianLinearOperator

    p = physics_problem
    obj = p.objective
    wd = obj.weight_decay
    X, y = obj.train.take(range(obj.n))
    model = copy.deepcopy(obj.model).eval()
    params = [q for q in model.parameters() if q.requires_grad]
    data = list(zip(X.split(obj.batch_size), y.split(obj.batch_size)))
    peer_op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False,
                                    num_data=obj.n)
    ours_op = HessianOperator(obj)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0), dtype=obj.dtype).to(obj.device)
    Q, lam = p.exact.eigen.eigenvectors, p.exact.eigen.eigenvalues
    ref = Q @ (lam * (Q.T @ v.double().cpu()))
    it = Interleaved({"ours": lambda: ours_op.matvec(v), "peer": lambda: peer_op @ v}).run(benchmark, rounds(9), 1)
    # the peer's product is the loss Hessian's: add wd·v for the objective's
    products = {"ours": it.outputs["ours"].detach().double().cpu(),
                "peer": it.outputs["peer"].detach().double().cpu() + wd * v.double().cpu()}
    err = {k: relative_error(ref.numpy(), hv.numpy()) for k, hv in products.items()}
    _publish(benchmark, p, _row(p, "curvlinops", "full-data HVP (relative error vs dense H·v)", it, err["ours"],
                                err["peer"], "same data chunks; error floor is float64 rounding"))


def test_curvlinops_kfac(benchmark, physics_problem):
    _require("curvlinops")
    _linear_only(physics_problem, "curvlinops KFAC")
    from curvlinops import KFACLinearOperator

    p = physics_problem
    obj = p.objective
    M, wd = obj.num_params, obj.weight_decay
    X, y = obj.train.take(range(obj.n))
    data = list(zip(X.split(obj.batch_size), y.split(obj.batch_size)))
    eye = torch.eye(M, dtype=obj.dtype, device=obj.device)

    def peer():
        model = copy.deepcopy(obj.model).eval()
        params = [q for q in model.parameters() if q.requires_grad]
        op = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False,
                                fisher_type="type-2", num_data=obj.n)
        return op @ eye                         # the first product computes the Kronecker factors

    def ours():
        return KFACCurvature().fit(HessianOperator(obj)).dense_matrix()

    it = Interleaved({"ours": ours, "peer": peer}).run(benchmark, ROUNDS)
    Q, lam = p.exact.eigen.eigenvectors, p.exact.eigen.eigenvalues
    H = (Q * lam) @ Q.T
    # the peer has no weight decay: add wd·I to its K-FAC matrix
    matrices = {"ours": it.outputs["ours"].detach().cpu(),
                "peer": it.outputs["peer"].detach().double().cpu() + wd * torch.eye(M, dtype=torch.float64)}
    err = {k: relative_error(H.numpy(), matrix.numpy()) for k, matrix in matrices.items()}
    _publish(benchmark, p, _row(p, "curvlinops", "K-FAC Ĥ (relative Frobenius distance to H)", it, err["ours"],
                                err["peer"], "time: our fit + dense_matrix vs curvlinops' factors + product with I"))


# ---------------------------------------------------------------------------- kronfluence
def _kronfluence_scores(problem: PhysicsProblem, damping: float, out_dir, name: str) -> torch.Tensor:
    """Pairwise EK-FAC scores g_tᵀ(Ĝ + damping·I)⁻¹ g_r / n, shape (5, n), in float64."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    obj = problem.objective
    X, y = obj.train.take(range(obj.n))
    task = kronfluence_classification_task()
    model = prepare_model(copy.deepcopy(obj.model), task)
    analyzer = Analyzer(name, model=model, task=task, cpu=obj.device.type == "cpu", disable_tqdm=True,
                        log_level=logging.WARNING, output_dir=str(out_dir))
    f64 = dict(activation_covariance_dtype=torch.float64, gradient_covariance_dtype=torch.float64,
               per_sample_gradient_dtype=torch.float64, lambda_dtype=torch.float64)
    analyzer.fit_all_factors("ekfac", dataset=torch.utils.data.TensorDataset(X, y), per_device_batch_size=obj.n,
                             factor_args=FactorArguments(strategy="ekfac", **f64), overwrite_output_dir=True)
    Xp, yp = problem.picks
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", query_dataset=torch.utils.data.TensorDataset(Xp, yp),
        train_dataset=torch.utils.data.TensorDataset(X, y), per_device_query_batch_size=len(Xp),
        per_device_train_batch_size=obj.n, overwrite_output_dir=True,
        score_args=ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=torch.float64,
                                  precondition_dtype=torch.float64, score_dtype=torch.float64))
    return analyzer.load_pairwise_scores("scores")["all_modules"].double().cpu() / obj.n


def test_kronfluence_ekfac_influence(benchmark, physics_problem, tmp_path):
    _require("kronfluence")
    _linear_only(physics_problem, "kronfluence")
    p = physics_problem
    obj = p.objective
    wd, delta = obj.weight_decay, p.damping
    loss_obj = Objective(obj.model, "cross_entropy", obj.train, weight_decay=0.0, batch_size=obj.batch_size,
                         device=obj.device, dtype=obj.dtype, progress=False)
    Xp, yp = p.picks
    Gt = loss_obj.gradients(Xp, yp)                                   # (5, M), pure loss
    Gr = loss_obj.gradients(loss_obj.train)                           # (n, M), pure loss
    ref = (p.exact.inverse.solve(Gt.T, delta).T @ Gr.T / obj.n).double().cpu().numpy()   # (5, n)
    calls = {"n": 0}

    def peer():
        calls["n"] += 1
        return _kronfluence_scores(p, delta + wd, tmp_path, f"run{calls['n']}")

    def ours():
        backend = EKFACCurvature().fit(HessianOperator(loss_obj))
        return influence(loss_obj, backend, delta + wd, Xp, yp)

    it = Interleaved({"ours": ours, "peer": peer}).run(benchmark, ROUNDS)
    a = {k: agreement(ref, it.outputs[k].double().cpu().numpy()) for k in ("ours", "peer")}
    row = _row(p, "kronfluence", "EK-FAC influence (max relative error vs exact)", it, a["ours"]["max_rel_error"],
               a["peer"]["max_rel_error"],
               f"Spearman over resolved points ours {a['ours']['spearman_resolved']:.3f} / kronfluence "
               f"{a['peer']['spearman_resolved']:.3f}; Pearson {a['ours']['pearson']:.3f} / {a['peer']['pearson']:.3f}; "
               "ours: exact-expectation Fisher, kronfluence: sampled labels")
    row.update(ours_spearman=a["ours"]["spearman_resolved"], peer_spearman=a["peer"]["spearman_resolved"])
    _publish(benchmark, p, row)
