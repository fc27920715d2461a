"""Peer libraries' influence on a trained workload, as ``Attribution``s in this project's convention.

Each adapter ``peer(workload, model, damping) -> Attribution`` answers for the trained ``model``
(any dtype; a deep copy in eval mode is used, as the library's curvature is the eval-mode one)
the (T, n) matrix of the contract (``workload.py``):

    I(z_i, z_t) = (1/n) g_tᵀ (C + δ I)⁻¹ g_i,   > 0 when z_i helps z_t,

C the curvature of the objective L(θ) = (1/n) Σ ℓ + (wd/2)‖θ‖². The peers know no weight
decay: they are given the loss alone, and damping δ + wd on its curvature, which is C + δI
exactly. Their gradients, training and test, are the loss's: the objective's add wd·θ̃ to
each, which shifts every score of a test row by terms linear in g_i — compare them with our
influence on the loss (``Objective(weight_decay=0)``, damping δ + wd, ``test_loss="loss"``)
where the exact agreement matters, as the tests do.
Each docstring states what the peer computes, and how its sign and scale were brought to the
contract's; the sign of each was checked against the dense oracle on a logistic regression
(``tests/test_ground_truth_peers.py``).

A peer that cannot be imported is listed in ``PEERS_UNAVAILABLE`` with the exact error;
``PEERS`` holds the adapters of the importable ones. An adapter raises ``PeerUnsupported``
(with the reason) for a workload its peer cannot handle.

The parameters studied are the workload's selection (``Workload.params``), exactly the set
``Objective(params=...)`` studies (``scalable_hbt.objective.select_parameters`` picks both); the
others are frozen (``requires_grad_(False)``) on the adapter's private copy of the model, and
each peer is restricted to the selection by its own mechanism: dattri differentiates the
parameters that require gradients, TRAK takes their names (``grad_wrt``), captum and kronfluence
take whole modules (``layers``, tracked modules) and refuse a selection that is not the
parameters of whole modules. M below is the number of studied parameters.

Every peer runs with attention on PyTorch's math kernel (as ``Objective`` does): the fused
CPU kernels have no second derivative, which captum's and dattri's HVPs need.

Costs come from ``measure.measured`` around the whole computation (fit and scores): seconds,
seconds in units of one full-data gradient of the workload's objective (``gradient_seconds``,
measured in the same process unless the caller passes ``unit_seconds``), and peak memory.
"""

from __future__ import annotations

import copy
import importlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalable_hbt.objective import select_parameters

from . import measure
from .ours import build_objective
from .workload import Attribution, Workload

Adapter = Callable[..., Attribution]


class PeerUnsupported(RuntimeError):
    """The peer cannot compute an attribution for this workload (the message says why)."""


def _probe(modules: dict[str, str]) -> dict[str, str]:
    """Peer name → the error its import raised, for every peer that does not import."""
    failures = {}
    for peer, module in modules.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure makes the peer unavailable
            failures[peer] = f"import {module}: {type(err).__name__}: {err}"
    return failures


PEER_MODULES = {"kronfluence_ekfac": "kronfluence.analyzer",
                "captum_arnoldi": "captum.influence._core.arnoldi_influence_function",
                "trak": "trak", "dattri_cg": "dattri.algorithm.influence_function"}
PEERS_UNAVAILABLE: dict[str, str] = _probe(PEER_MODULES)
"""Peers that cannot run here, with the error; empty when all of them import."""


# ---------------------------------------------------------------------------- shared pieces
@dataclass(frozen=True)
class Setup:
    """What every adapter starts from: a private eval-mode copy of the model whose parameters
    outside the studied ones are frozen, the studied parameters' names (``named_parameters()``
    order and names), their number M, whether they are all of the model's parameters, and the
    data (floating-point inputs in the model's dtype)."""

    model: nn.Module
    names: list[str]
    M: int
    every: bool
    X: Tensor
    y: Tensor
    Xt: Tensor
    yt: Tensor


def _setup(workload: Workload, model: nn.Module) -> Setup:
    """The ``Setup`` of a workload: the studied parameters are ``select_parameters(model,
    workload.params)``, the set ``Objective(params=workload.params)`` studies."""
    if workload.loss != "cross_entropy":
        raise PeerUnsupported(f"the peer adapters implement cross-entropy only; workload {workload.name!r} has "
                              f"loss {workload.loss!r}.")
    model = copy.deepcopy(model).eval()
    studied = {id(p) for _, p in select_parameters(model, workload.params)}
    named = list(model.named_parameters())
    for _, p in named:
        p.requires_grad_(id(p) in studied)
    names = [k for k, p in named if id(p) in studied]
    dtype = named[0][1].dtype

    def inputs(X: Tensor) -> Tensor:
        return X.to(dtype) if X.is_floating_point() else X      # token ids stay integers

    return Setup(model, names, sum(p.numel() for _, p in named if id(p) in studied), len(names) == len(named),
                 inputs(workload.train_X), workload.train_y, inputs(workload.test_X), workload.test_y)


def _whole_modules(setup: Setup, peer: str) -> list[str]:
    """The modules that own the studied parameters, for a peer that can only be restricted to
    whole modules; raises ``PeerUnsupported`` when their parameters (with their submodules')
    are not exactly the studied ones."""
    owners = list(dict.fromkeys(name.rpartition(".")[0] for name in setup.names))
    modules = dict(setup.model.named_modules())
    covered = [id(p) for owner in owners for p in modules[owner].parameters()]
    studied = {id(p) for k, p in setup.model.named_parameters() if k in setup.names}
    if len(covered) != len(set(covered)) or set(covered) != studied:
        extra = [k for k, p in setup.model.named_parameters() if id(p) in set(covered) - studied]
        why = f"also hold {extra}" if extra else "are nested"
        raise PeerUnsupported(f"{peer} can be restricted to whole modules only, and the studied parameters are not "
                              f"those of whole modules: their modules {owners} {why}.")
    return owners


def _batch(n: int, num_params: int, numbers: int = 2**24) -> int:
    """Rows per batch such that a batch of per-sample gradients holds ≤ ``numbers`` numbers."""
    return int(max(1, min(n, numbers // max(num_params, 1))))


def gradient_seconds(workload: Workload, model: nn.Module) -> float:
    """One full-data gradient of the workload's objective at ``model``, in seconds (the median
    of three after a warm-up): the benchmark's unit of time."""
    return measure.gradient_seconds(build_objective(workload, model.eval()))


def _attribution(method: str, workload: Workload, model: nn.Module, compute: Callable[[], Tensor],
                 unit_seconds: float | None, notes: str) -> Attribution:
    unit = unit_seconds if unit_seconds is not None else gradient_seconds(workload, model)
    if unit <= 0:
        raise ValueError(f"unit_seconds must be > 0 (one full-data gradient's time); got {unit}.")
    with sdpa_kernel([SDPBackend.MATH]):
        result, seconds, peak_mib = measure.measured(compute)
    scores = result.detach().double().cpu().numpy()
    expected = (len(workload.test_y), len(workload.train_y))
    if scores.shape != expected:
        raise RuntimeError(f"{method} returned scores of shape {scores.shape}, expected (T, n) = {expected}.")
    return Attribution(method, scores, seconds, seconds / unit, peak_mib, notes=notes)


# ---------------------------------------------------------------------------- kronfluence
def kronfluence_classification_task(tracked: list[str] | None = None):
    """kronfluence's ``Task`` for a classifier of (x, t) batches: the summed cross-entropy as training
    loss (with ``sample=True`` the labels are drawn from the model's predictive distribution, i.e. the
    true Fisher) and as the measurement; ``tracked``: the names of the modules influence is computed
    for (``None``: every Linear and Conv2d)."""
    from kronfluence.task import Task

    class Classification(Task):
        def get_influence_tracked_modules(self):
            return tracked

        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return nn.functional.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch, model):
            x, t = batch
            return nn.functional.cross_entropy(model(x), t, reduction="sum")

    return Classification()


def kronfluence_ekfac(workload: Workload, model: nn.Module, damping: float, *,
                      unit_seconds: float | None = None) -> Attribution:
    """kronfluence's EK-FAC pairwise influence (its ``Analyzer``, strategy "ekfac").

    kronfluence fits Kronecker factors of the true Fisher (labels sampled from the model) of
    the summed cross-entropy, normalised per data point, with an eigenvalue correction, on its
    Linear and Conv2d modules only (normalisation layers' parameters are left out, as kronfluence
    always does; a model with Conv1d (torch's, or Hugging Face's Conv1D) or other convolutions
    is refused rather than answered without them; Conv2d with zero padding only, since it
    unfolds every convolution's input that way), or on the modules that own the studied parameters when they are not all of the model's
    (refused unless those are exactly the parameters of whole Linear/Conv2d modules: Hugging
    Face's ``Conv1D``, GPT-2's projections, is not a kronfluence module), and scores
    s(t, i) = g_tᵀ (F̂ + λ I)⁻¹ g_i with λ = δ + wd given explicitly. Its sign is the contract's
    (s > 0: z_i helps z_t); the contract's scale is s / n, which this adapter returns. Float64
    factors and scores when the model is float64, else float32.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    setup = _setup(workload, model)
    model, X, y, Xt, yt = setup.model, setup.X, setup.y, setup.Xt, setup.yt
    if setup.every:
        tracked, considered = None, list(model.modules())
        if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in considered):
            raise PeerUnsupported("kronfluence supports Linear and Conv2d modules only; the model has none.")
        other_convs = sorted({type(m).__name__ for m in considered
                              if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d))
                              or type(m).__name__ == "Conv1D"})
        if other_convs:
            raise PeerUnsupported(f"kronfluence has no {', '.join(other_convs)} support: it would silently leave "
                                  f"those layers out of the influence.")
    else:
        tracked = _whole_modules(setup, "kronfluence")
        modules = dict(model.named_modules())
        considered = [modules[name] for name in tracked]
        unsupported = [f"{name} ({type(m).__name__})" for name, m in zip(tracked, considered)
                       if type(m) not in (nn.Linear, nn.Conv2d)]
        if unsupported:
            raise PeerUnsupported(f"kronfluence computes influence on Linear and Conv2d modules only; the studied "
                                  f"parameters belong to {', '.join(unsupported)}.")
    if any(isinstance(m, nn.Conv2d) and m.padding_mode != "zeros" for m in considered):
        raise PeerUnsupported("kronfluence unfolds Conv2d inputs with zero padding whatever the layer's "
                              "padding_mode; this model pads otherwise, so its gradients would be wrong.")
    dtype = next(model.parameters()).dtype
    n = len(y)
    batch = _batch(n, setup.M)

    def compute() -> Tensor:
        task = kronfluence_classification_task(tracked)
        prepared = prepare_model(copy.deepcopy(model), task)
        with tempfile.TemporaryDirectory() as out:
            analyzer = Analyzer("peer", model=prepared, task=task, cpu=True, disable_tqdm=True,
                                log_level=logging.WARNING, output_dir=out)
            precision = dict(activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                             per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
            analyzer.fit_all_factors("ekfac", dataset=torch.utils.data.TensorDataset(X, y),
                                     per_device_batch_size=batch,
                                     factor_args=FactorArguments(strategy="ekfac", **precision),
                                     overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(
                "scores", "ekfac", query_dataset=torch.utils.data.TensorDataset(Xt, yt),
                train_dataset=torch.utils.data.TensorDataset(X, y), per_device_query_batch_size=len(yt),
                per_device_train_batch_size=batch, overwrite_output_dir=True,
                score_args=ScoreArguments(damping_factor=damping + workload.weight_decay,
                                          per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                          score_dtype=dtype))
            return analyzer.load_pairwise_scores("scores")["all_modules"] / n

    return _attribution("kronfluence: ekfac", workload, model, compute, unit_seconds,
                        f"true Fisher (sampled labels), Linear/Conv2d only, M = {setup.M}, λ = δ + wd = "
                        f"{damping + workload.weight_decay:.3g}")


# ---------------------------------------------------------------------------- captum
def captum_arnoldi(workload: Workload, model: nn.Module, damping: float, *, rank: int = 50,
                   arnoldi_dim: int = 200, seed: int = 0, max_seconds: float | None = 600.0,
                   unit_seconds: float | None = None) -> Attribution:
    """captum's ``ArnoldiInfluenceFunction`` (Schioppa et al. 2022).

    captum runs ``arnoldi_dim`` Arnoldi steps with exact HVPs of the summed loss Hessian
    H_Σ = n·H over the training set, keeps the top ``rank`` eigenpairs (λ_k, v_k) of the
    Krylov restriction after adding ``hessian_reg`` to it, and scores
    s(t, i) = Σ_k (g_tᵀ v_k)(v_kᵀ g_i) / (λ_k + hessian_reg) — the inverse restricted to the
    top-``rank`` subspace, nothing outside it. With hessian_reg = n(δ + wd) this is the
    contract's (1/n) g_tᵀ V (Λ + δ + wd)⁻¹ Vᵀ g_i, sign and scale as they are (checked: the
    full-rank case equals the dense influence). ``rank`` and ``arnoldi_dim`` are capped at M.
    Studied parameters that are not all of the model's are passed as captum's ``layers`` (the
    modules that own them; refused unless those hold exactly the studied parameters).

    Cost: ``arnoldi_dim`` HVPs of the whole training set (then per-sample gradients). One HVP
    as captum computes it (``torch.autograd.functional.hvp`` of the summed loss, batch by
    batch) is timed first; when ``arnoldi_dim`` of them exceed ``max_seconds`` (``None``: no
    limit) the adapter raises ``PeerUnsupported`` with the prediction instead of running. The
    prediction is a lower bound (it leaves out the per-sample gradients and the Arnoldi
    bookkeeping).
    """
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    setup = _setup(workload, model)
    model, X, y, Xt, yt = setup.model, setup.X, setup.y, setup.Xt, setup.yt
    layers = None if setup.every else _whole_modules(setup, "captum")
    n, M = len(y), setup.M
    dim = min(arnoldi_dim, M)
    k = min(rank, dim)
    batch = _batch(n, M)
    if max_seconds is not None:
        names = setup.names
        named = dict(model.named_parameters())
        params = tuple(named[name] for name in names)

        def summed_loss(*values: Tensor, x: Tensor, t: Tensor) -> Tensor:
            out = torch.func.functional_call(model, dict(zip(names, values)), (x,))
            return nn.functional.cross_entropy(out, t, reduction="sum")

        v = tuple(torch.ones_like(p) for p in params)
        start = time.perf_counter()
        with sdpa_kernel([SDPBackend.MATH]):
            for begin in range(0, n, batch):
                x, t = X[begin:begin + batch], y[begin:begin + batch]
                torch.autograd.functional.hvp(lambda *w: summed_loss(*w, x=x, t=t), params, v)
        predicted = dim * (time.perf_counter() - start)
        if predicted > max_seconds:
            raise PeerUnsupported(f"captum's Arnoldi would take ≈ {predicted:.0f} s here ({dim} HVPs of all n = {n} "
                                  f"points, one measured), over the max_seconds = {max_seconds:.0f} s budget.")

    def compute() -> Tensor:
        with tempfile.TemporaryDirectory() as out:
            checkpoint = str(Path(out) / "model.pt")
            torch.save(model.state_dict(), checkpoint)
            influence = ArnoldiInfluenceFunction(
                model, torch.utils.data.TensorDataset(X, y), checkpoint,
                layers=layers, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=batch, projection_dim=k,
                arnoldi_dim=dim, seed=seed, hessian_reg=n * (damping + workload.weight_decay))
            return influence.influence((Xt, yt))

    return _attribution("captum: arnoldi", workload, model, compute, unit_seconds,
                        f"top-{k} of a {dim}-step Arnoldi basis, M = {M}, exact loss HVPs, reg n(δ + wd)")


# ---------------------------------------------------------------------------- TRAK
def trak(workload: Workload, model: nn.Module, damping: float, *, proj_dim: int = 2048, seed: int = 0,
         unit_seconds: float | None = None) -> Attribution:
    """TRAK (Park et al. 2023, ``traker``) with one checkpoint, on the CPU.

    TRAK replaces the loss by the correct-class margin f = log p_y − log(1 − p_y), projects its
    per-sample gradients with a Gaussian matrix P (M × k, k = ``proj_dim``, entries N(0, 1)):
    φ_i = Pᵀ∇f_i / √M, and scores τ(t, i) = φ_tᵀ (ΦᵀΦ + λ I)⁻¹ φ_i · (1 − p_i): a Gauss–Newton
    matrix of the margin, ΦᵀΦ = Pᵀ(n G_f)P / M, in place of the loss Hessian. With B = P/√M,
    BᵀB ≈ I_k when k ≪ M, so λ = n(δ + wd) damps like δ + wd on the mean curvature; when
    k ≥ M, B(BᵀAB + λ)⁻¹Bᵀ = (A + λ(BBᵀ)⁻¹)⁻¹ with BBᵀ ≈ (k/M) I, so λ is scaled by k/M.
    Hence λ = n(δ + wd)·max(1, k/M). Its sign is the contract's (τ > 0: z_i raises the margin of
    z_t, i.e. lowers its loss); its scale is TRAK's own, kept (the benchmark's scores are rank
    correlations). No checkpoint ensemble: the benchmark studies one trained model. The studied
    parameters are TRAK's ``grad_wrt``.
    ``proj_dim`` must exceed 100: traker 0.3.2's CPU projector frees its only block of the
    projection after featurizing and then scores with it (AttributeError).
    """
    from trak import TRAKer

    setup = _setup(workload, model)
    model, X, y, Xt, yt = setup.model, setup.X, setup.y, setup.Xt, setup.yt
    n, M = len(y), setup.M
    if proj_dim <= 100:
        raise ValueError(f"proj_dim must be > 100 (traker's CPU projector fails with a single block of "
                         f"≤ 100 columns); got {proj_dim}.")
    k = proj_dim
    batch = _batch(n, M, 2**26)     # traker's CPU projector redraws P block by block for every batch
    reg = n * (damping + workload.weight_decay) * max(1.0, k / M)

    def compute() -> Tensor:
        with tempfile.TemporaryDirectory() as out:
            traker = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=out,
                            load_from_save_dir=True, device="cpu", proj_dim=k, use_half_precision=False,
                            projector_seed=seed, lambda_reg=reg, grad_wrt=setup.names,
                            logging_level=logging.WARNING)
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for start in range(0, n, batch):
                traker.featurize(batch=(X[start:start + batch], y[start:start + batch]),
                                 num_samples=len(y[start:start + batch]))
            traker.finalize_features()
            traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=len(yt))
            traker.score(batch=(Xt, yt), num_samples=len(yt))
            scores = traker.finalize_scores("targets")             # (n, T)
            return torch.as_tensor(np.array(scores)).T

    return _attribution("trak", workload, model, compute, unit_seconds,
                        f"1 checkpoint, Gaussian projection k = {k}, M = {M}, λ = n(δ + wd)·max(1, k/M)")


# ---------------------------------------------------------------------------- dattri
def dattri_cg(workload: Workload, model: nn.Module, damping: float, *, max_iter: int = 50,
              max_seconds: float | None = 600.0, unit_seconds: float | None = None) -> Attribution:
    """dattri's ``IFAttributorCG``: conjugate gradients on the mean-loss Hessian + λ I.

    dattri solves (H + λ I) x = g_t by exactly ``max_iter`` CG iterations (its tolerance is
    not used, its source says so) with exact reverse-over-reverse HVPs of the mean loss over
    each batch of the caching data loader, and sums the solutions over batches; so the whole
    training set is handed over as one batch (otherwise the sum of per-batch inverses is not
    the inverse of the mean), and the test points one at a time (dattri vmaps CG over a test
    batch, holding that many HVP graphs of the whole training set at once). Scores
    s(i, t) = g_iᵀ (H + λ I)⁻¹ g_t with λ = δ + wd, shape (n, T); its sign is the contract's
    (s > 0: z_i helps z_t); the contract's scale is s / n, transposed, which this adapter
    returns. Memory: one HVP graph of all n training points. dattri differentiates the parameters
    that require gradients, i.e. the studied ones.

    Cost: T·(max_iter + 1) HVPs of the whole training set. One such HVP (dattri's own
    ``hvp_at_x``) is timed first; when the predicted time exceeds ``max_seconds`` (``None``:
    no limit) the adapter raises ``PeerUnsupported`` with the prediction instead of running. The
    prediction is a lower bound: dattri's vmapped CG runs slower than the bare HVPs.
    """
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.func.hessian import hvp_at_x
    from dattri.func.utils import flatten_func, flatten_params
    from dattri.task import AttributionTask

    setup = _setup(workload, model)
    model, X, y, Xt, yt = setup.model, setup.X, setup.y, setup.Xt, setup.yt
    n, T = len(y), len(yt)
    reg = damping + workload.weight_decay

    def loss(params, data):
        x, t = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), t)

    if max_seconds is not None:
        flat = flatten_func(model)(loss)
        named = dict(model.named_parameters())
        theta = flatten_params({k: named[k].detach() for k in setup.names})
        with sdpa_kernel([SDPBackend.MATH]):        # hvp_at_x runs the forward pass here
            hvp = hvp_at_x(lambda q: flat(q, (X, y)), x=(theta,), mode="rev-rev", regularization=reg)
        with torch.no_grad():
            hvp(torch.ones_like(theta))                                     # warm-up
            start = time.perf_counter()
            hvp(torch.ones_like(theta))
            predicted = T * (max_iter + 1) * (time.perf_counter() - start)
        if predicted > max_seconds:
            raise PeerUnsupported(f"dattri CG would take ≈ {predicted:.0f} s here (T = {T} test points × "
                                  f"{max_iter + 1} HVPs of all n = {n} points, one measured), over the "
                                  f"max_seconds = {max_seconds:.0f} s budget.")

    def compute() -> Tensor:
        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        attributor = IFAttributorCG(task=task, device="cpu", max_iter=max_iter, regularization=reg)
        train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=n)
        attributor.cache(train)
        test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xt, yt), batch_size=1)
        with torch.no_grad():      # dattri's results otherwise keep every HVP graph alive (torch.func inside)
            scores = attributor.attribute(train, test)
        return scores.T / n

    return _attribution("dattri: cg", workload, model, compute, unit_seconds,
                        f"CG, {max_iter} iterations, M = {setup.M}, exact loss HVPs, λ = δ + wd")


ADAPTERS: dict[str, Adapter] = {"kronfluence_ekfac": kronfluence_ekfac, "captum_arnoldi": captum_arnoldi,
                                "trak": trak, "dattri_cg": dattri_cg}
PEERS: dict[str, Adapter] = {name: fn for name, fn in ADAPTERS.items() if name not in PEERS_UNAVAILABLE}
"""The adapters of the peers that import here, in the benchmark's order."""
