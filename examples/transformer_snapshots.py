"""A GPT-2-style generative model of measurement snapshots of the Fermi–Hubbard chain, and the
Hessian toolbox on it.

Data. Exact-diagonalisation ground states of the half-filled spinless Fermi–Hubbard ring
(``scalable_hbt.physics.ground_states``, L = 12) at several V1 on both sides of the transition
V1 = 1 (Luttinger liquid below, CDW-I above). A *snapshot* is one projective measurement of
every site's occupation: a Fock state n = (n_0, …, n_{L−1}) drawn with the Born probability
|ψ(n)|². A few training snapshots are deliberately damaged: some have one site flipped
("corrupted": L/2 ± 1 particles, which no ground state has) and some carry the other phase's
token ("mislabelled").

Model. A generative model, not a classifier: ``transformers.GPT2LMHeadModel`` built from a
``GPT2Config`` reads ``[phase token, n_0, …, n_{L−1}]`` and is trained with the causal language
modelling loss on the occupations, i.e. the negative log-likelihood −log p(n | phase) =
−Σ_j log p(n_j | phase, n_<j) (the phase token, LL or CDW-I by V1 ≤ 1 or > 1, is never a
target). Why generative: a snapshot is a sample of the Born distribution, so the natural model
of snapshots is a model of that distribution (as in transformer quantum-state tomography);
every site is a target (12 bits per snapshot, where a phase classifier would learn from one),
and "how unusual is this snapshot" — what LEES and RUE should see for V1 outside the training
range — is a question about the snapshot distribution. The output is restricted to the two
occupation logits (a ``Task`` whose output is ``logits[..., :2]``), so the per-position output
Hessian has rank 1 and EK-FAC needs L backward passes per chunk.

Toolbox. On the trained model, for held-out snapshots (their NLL is the measurement):

* influence of every training snapshot with EK-FAC on the GGN of all attention and MLP
  projection weights of all blocks (embeddings and LayerNorms are not studied, as in
  kronfluence's supported-module rule);
* on one selected block (``Objective(params=["transformer.h.<k>.attn.*", "transformer.h.<k>.mlp.*"])``)
  exact influence by conjugate gradients on the block's GGN against EK-FAC on the same block, at
  two dampings, for a subset of held-out snapshots: Spearman, top-k overlap and relative error
  (``scalable_hbt.metrics``), with the curvature-free g_tᵀg_r as a baseline;
* LEES from Lanczos eigenpairs of the block's GGN, and RUE (bootstrap, EK-FAC shifts), for
  snapshots at V1 inside the training range and outside it (V1 = −2, phase-separated; −0.6,
  attractive Luttinger liquid; 8, deep CDW-I), with AUROC of outside against inside;
* self-influence (EK-FAC, no solve) to flag the corrupted and mislabelled training snapshots,
  against the training loss as the baseline detector.

Damping: δ = 10⁻³ × the largest EK-FAC eigenvalue of the studied parameters (the block uses its
own), so that the damped GGN has a condition number CG can handle. kronfluence's 0.1 × the mean
eigenvalue is 4·10⁻⁵ on the quick model's last block, whose GGN has rank ≤ L·n (6144 of 197,760):
CG had not converged after 300 iterations there. CG runs unpreconditioned: EK-FAC as its
preconditioner doubled the iterations on that block. Every phase reports time, HVPs and peak
memory; ``report.json`` and ``transformer_snapshots.png`` go to ``--out``; examples/README.md
states the measured numbers.

    python examples/transformer_snapshots.py --quick   # 0.8 M parameters, 512 snapshots (minutes)
    python examples/transformer_snapshots.py           # 5.5 M parameters, 2048 snapshots (an hour or more)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalable_hbt import Objective, Toolbox
from scalable_hbt.curvature import CGCurvature, EKFACCurvature, LanczosCurvature
from scalable_hbt.memory import format_bytes
from scalable_hbt.metrics import agreement, auroc, relative_error, top_k_overlap
from scalable_hbt.physics import V1_TRANSITION, born_samples, ground_states
from scalable_hbt.task import IGNORE_INDEX, Task, causal_lm_cross_entropy
from snapshots_common import Phases, bayes_accuracy, to_numpy

LL_TOKEN, CDW_TOKEN = 2, 3
"""Vocabulary: 0 and 1 are occupations, 2 and 3 the phase tokens (LL: V1 ≤ 1, CDW-I: V1 > 1)."""


@dataclass(frozen=True)
class Config:
    """Everything that determines a run (the presets below; tests pass smaller ones)."""

    L: int = 12
    train_v1: tuple[float, ...] = (0.0, 0.3, 0.6, 0.9, 1.3, 2.0, 3.0, 4.5)
    inside_v1: tuple[float, ...] = (0.15, 0.45, 0.75, 1.1, 1.6, 2.5, 3.7)
    outside_v1: tuple[float, ...] = (-2.0, -0.6, 8.0)
    per_v1: int = 256              # training snapshots per training V1
    heldout_per_v1: int = 4        # held-out snapshots per training V1 (influence)
    test_per_v1: int = 8           # snapshots per inside / outside V1 (LEES, RUE)
    corrupt_fraction: float = 0.02
    mislabel_fraction: float = 0.02
    n_embd: int = 256
    n_layer: int = 7
    n_head: int = 8
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    block: int | None = None       # the block of the exact comparison; None: the last
    n_compare: int = 8             # test snapshots of the EK-FAC-versus-CG comparison
    cg_rtol: float = 1e-6
    lees_m: int = 16
    rue_bootstrap: int = 50
    damping_fraction: float = 1e-3  # δ = fraction × the largest EK-FAC eigenvalue
    comparison_dampings: tuple[float, ...] = (1.0, 10.0)  # the block comparison at these multiples of δ
    cg_max_iter: int = 1000
    dense_check: bool = False      # also the dense oracle on the block (tiny sizes only)
    dtype: str = "float32"
    top_k: int = 10
    hessian_batch: int = 64        # chunk size of the curvature passes
    seed: int = 0
    progress: bool = True
    name: str = "full"


PRESETS: dict[str, Config] = {
    "full": Config(),
    "quick": Config(per_v1=64, n_embd=128, n_layer=4, n_head=4, steps=1200, name="quick"),
    "tiny": Config(L=8, train_v1=(0.2, 0.8, 2.0, 4.0), inside_v1=(0.5, 3.0), outside_v1=(-2.0, 8.0), per_v1=12,
                   heldout_per_v1=1, test_per_v1=2, corrupt_fraction=0.05, mislabel_fraction=0.05, n_embd=8,
                   n_layer=2, n_head=2, steps=60, n_compare=3, cg_rtol=1e-10, lees_m=4, rue_bootstrap=8,
                   top_k=3, hessian_batch=16, dense_check=True, dtype="float64", name="tiny"),
}


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Snapshots:
    """Snapshots as model inputs and what is known about each."""

    occupations: np.ndarray   # (N, L) int8
    v1: np.ndarray            # (N,)
    token: np.ndarray         # (N,) the phase token fed to the model
    corrupted: np.ndarray     # (N,) bool: one site flipped
    mislabelled: np.ndarray   # (N,) bool: the other phase's token

    def __len__(self) -> int:
        return len(self.v1)

    def batch(self) -> dict[str, torch.Tensor]:
        """``{"input_ids": (N, L + 1), "labels": (N, L + 1)}``; the phase token is no target."""
        ids = torch.as_tensor(np.concatenate([self.token[:, None], self.occupations], axis=1), dtype=torch.long)
        labels = ids.clone()
        labels[:, 0] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def subset(self, index: np.ndarray) -> Snapshots:
        return Snapshots(self.occupations[index], self.v1[index], self.token[index], self.corrupted[index],
                         self.mislabelled[index])


def phase_token(v1: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(v1) > V1_TRANSITION, CDW_TOKEN, LL_TOKEN)


def born_snapshots(L: int, v1_values: tuple[float, ...], per_v1: int, rng: np.random.Generator,
                   progress: bool) -> Snapshots:
    """``per_v1`` Born-rule samples |ψ(n)|² of the ED ground state at each V1, with their phase token."""
    occupations, v1 = born_samples(L, v1_values, per_v1, rng, progress)
    none = np.zeros(len(v1), dtype=bool)
    return Snapshots(occupations, v1, phase_token(v1), none, none.copy())


def damage(data: Snapshots, corrupt_fraction: float, mislabel_fraction: float,
           rng: np.random.Generator) -> Snapshots:
    """Flip one random site of a ``corrupt_fraction`` of the snapshots (L/2 ± 1 particles) and give
    another ``mislabel_fraction`` the other phase's token; disjoint, seeded."""
    n = len(data)
    n_corrupt, n_mislabel = round(corrupt_fraction * n), round(mislabel_fraction * n)
    chosen = rng.choice(n, size=n_corrupt + n_mislabel, replace=False)
    corrupt, mislabel = chosen[:n_corrupt], chosen[n_corrupt:]
    occ, token = data.occupations.copy(), data.token.copy()
    sites = rng.integers(0, occ.shape[1], size=n_corrupt)
    occ[corrupt, sites] = 1 - occ[corrupt, sites]
    token[mislabel] = np.where(token[mislabel] == LL_TOKEN, CDW_TOKEN, LL_TOKEN)
    corrupted, mislabelled = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    corrupted[corrupt], mislabelled[mislabel] = True, True
    return Snapshots(occ, data.v1.copy(), token, corrupted, mislabelled)


def exact_entropy(L: int, v1_values: tuple[float, ...]) -> dict[str, float]:
    """The cross-entropy floor of a perfect model p(n | phase): the entropy (nats) of the equal
    mixture of the Born distributions over the training V1 of each phase."""
    psi = ground_states(L, list(v1_values), progress=False)
    out = {}
    for name, side in (("LL", np.asarray(v1_values) <= V1_TRANSITION), ("CDW-I", np.asarray(v1_values) > V1_TRANSITION)):
        if side.any():
            p = (psi[side] ** 2).mean(axis=0)
            p = p[p > 0]
            out[name] = float(-(p * np.log(p)).sum())
    return out


# ---------------------------------------------------------------------------------------------- model
def snapshot_task() -> Task:
    """−log p(n | phase): the causal-LM loss on the two occupation logits only (the phase tokens
    are inputs, never predicted), summed over the L sites."""
    return Task(causal_lm_cross_entropy, "token", "snapshot_nll", output=lambda raw: raw["logits"][..., :2],
                ignore_index=IGNORE_INDEX)


def build_model(cfg: Config) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=4, n_positions=cfg.L + 1, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(config)


def count_parameters(cfg: Config) -> int:
    """Parameters of the model a configuration builds (the tied embedding counted once)."""
    return sum(p.numel() for p in build_model(cfg).parameters())


def projection_patterns(blocks: range | list[int]) -> list[str]:
    return [f"transformer.h.{k}.{part}.*" for k in blocks for part in ("attn", "mlp")]


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], cfg: Config) -> dict[str, Any]:
    """Adam with a linearly decaying learning rate on the mean snapshot NLL + (wd/2)‖θ‖² (the
    Objective's regulariser), mini-batches drawn with a seeded generator."""
    task = snapshot_task()
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
    n = data["input_ids"].shape[0]
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        out = task.outputs(model(input_ids=data["input_ids"][idx]))
        nll = task.loss(out, data["labels"][idx]).mean()
        loss = nll + 0.5 * cfg.weight_decay * sum(p.pow(2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(nll.item())
    model.eval()
    tail = max(1, cfg.steps // 10)
    return {"steps": cfg.steps, "final_batch_nll": float(np.mean(losses[-tail:])), "first_batch_nll": losses[0]}


def mean_nll(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> np.ndarray:
    task = snapshot_task()
    with torch.no_grad():
        return task.loss(task.outputs(model(input_ids=data["input_ids"])), data["labels"]).numpy()


def phase_accuracy(model: torch.nn.Module, data: Snapshots) -> float:
    """Accuracy of the Bayes classifier the generative model defines: argmax over the two phase
    tokens of p(n | phase) (equal priors)."""
    nll = []
    for token in (LL_TOKEN, CDW_TOKEN):
        nll.append(mean_nll(model, replace(data, token=np.full(len(data), token)).batch()))
    predicted = np.where(nll[1] < nll[0], CDW_TOKEN, LL_TOKEN)
    return float((predicted == phase_token(data.v1)).mean())


def comparison_subset(heldout: Snapshots, per_v1: int, count: int) -> np.ndarray:
    """One held-out snapshot per training V1 (the first ``count`` V1), each a (token, configuration)
    not picked before where the V1 offers one: deep in CDW-I most snapshots are the same Néel
    state, and identical inputs would give identical rows."""
    seen: set[tuple[int, ...]] = set()
    pick = []
    for start in range(0, len(heldout), per_v1)[:count]:
        rows = range(start, min(start + per_v1, len(heldout)))
        keys = {i: (int(heldout.token[i]), *heldout.occupations[i].tolist()) for i in rows}
        i = next((i for i in rows if keys[i] not in seen), start)
        seen.add(keys[i])
        pick.append(i)
    return np.array(pick)


def symmetry_classes(occupations: np.ndarray) -> np.ndarray:
    """A label per configuration shared by its translations and reflections on the ring (the
    ground state gives them equal Born probabilities)."""
    L = occupations.shape[1]
    weights = 1 << np.arange(L)[::-1]
    variants = [np.roll(o, s, axis=1) for o in (occupations, occupations[:, ::-1]) for s in range(L)]
    return np.min(np.stack([v.astype(np.int64) @ weights for v in variants]), axis=0)


def who_helps(infl: np.ndarray, test: Snapshots, train: Snapshots, k: int) -> dict[str, float]:
    """How the k most helpful (and harmful) training snapshots of each test snapshot relate to it,
    against the base rate over all training snapshots (means over the test snapshots)."""
    train_class, test_class = symmetry_classes(train.occupations), symmetry_classes(test.occupations)
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for t in range(len(test)):
        order = np.argsort(-infl[t])
        helpful, harmful = order[:k], order[::-1][:k]
        same = (train.occupations == test.occupations[t]).all(axis=1)
        equivalent = train_class == test_class[t]
        token = train.token == test.token[t]
        dv1 = np.abs(train.v1 - test.v1[t])
        for name, mask in (("same_configuration", same), ("symmetry_equivalent", equivalent),
                           ("same_phase_token", token)):
            add(f"helpful_{name}", float(mask[helpful].mean()))
            add(f"harmful_{name}", float(mask[harmful].mean()))
            add(f"base_rate_{name}", float(mask.mean()))
        add("helpful_mean_abs_dv1", float(dv1[helpful].mean()))
        add("harmful_mean_abs_dv1", float(dv1[harmful].mean()))
        add("base_mean_abs_dv1", float(dv1.mean()))
    return {"k": k, **{key: float(np.mean(v)) for key, v in rows.items()}}


# ---------------------------------------------------------------------------------------------- phases
def largest_eigenvalue(ekfac: EKFACCurvature) -> float:
    """The largest eigenvalue of the EK-FAC approximation of the GGN (wd included): the scale of
    the damping rule."""
    top = max(float(layer.S.max()) for layer in ekfac.layers)
    return top + ekfac.weight_decay


def group_summary(values: np.ndarray, v1: np.ndarray) -> list[dict[str, float]]:
    return [{"v1": float(v), "mean": float(values[v1 == v].mean()), "median": float(np.median(values[v1 == v]))}
            for v in np.unique(v1)]


# ---------------------------------------------------------------------------------------------- the run
def run(cfg: Config) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    phases = Phases(cfg.progress)
    report: dict[str, Any] = {"config": asdict(cfg)}

    def sample():
        clean = born_snapshots(cfg.L, cfg.train_v1, cfg.per_v1, rng, cfg.progress)
        train_set = damage(clean, cfg.corrupt_fraction, cfg.mislabel_fraction, rng)
        heldout = born_snapshots(cfg.L, cfg.train_v1, cfg.heldout_per_v1, rng, False)
        inside = born_snapshots(cfg.L, cfg.inside_v1, cfg.test_per_v1, rng, False)
        outside = born_snapshots(cfg.L, cfg.outside_v1, cfg.test_per_v1, rng, False)
        return train_set, heldout, inside, outside

    train_set, heldout, inside, outside = phases("ED + Born sampling", sample)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    model = build_model(cfg).to(dtype)
    M_total = sum(p.numel() for p in model.parameters())
    data = train_set.batch()
    history = phases("training", lambda: train(model, data, cfg))
    test_all = Snapshots(*(np.concatenate([getattr(s, f) for s in (heldout, inside, outside)])
                           for f in ("occupations", "v1", "token", "corrupted", "mislabelled")))
    is_outside = np.isin(test_all.v1, cfg.outside_v1)
    nll_test = mean_nll(model, test_all.batch())
    train_nll = mean_nll(model, data)
    clean = ~(train_set.corrupted | train_set.mislabelled)
    report["model"] = {
        "num_params": M_total, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "training": history,
        "train_nll_clean": float(train_nll[clean].mean()),
        "heldout_nll": float(nll_test[: len(heldout)].mean()),
        "exact_entropy_floor": exact_entropy(cfg.L, cfg.train_v1),
        "nll_by_v1": group_summary(nll_test, test_all.v1),
        "phase_accuracy_heldout_and_inside": phase_accuracy(model, test_all.subset(np.flatnonzero(~is_outside))),
    }
    bayes = bayes_accuracy(cfg.L, cfg.train_v1, tuple(np.unique(test_all.v1[~is_outside])))
    report["model"]["bayes_optimal_phase_accuracy_heldout_and_inside"] = float(
        np.mean([bayes[f"{v:g}"] for v in test_all.v1[~is_outside]]))
    task = snapshot_task()
    n = len(train_set)
    k_block = cfg.n_layer - 1 if cfg.block is None else cfg.block

    # ---- EK-FAC on every projection layer of every block
    full = Objective(model, task, data, weight_decay=cfg.weight_decay, batch_size=cfg.hessian_batch,
                     params=projection_patterns(range(cfg.n_layer)), dtype=dtype, progress=cfg.progress)
    ekfac = EKFACCurvature()
    operator_full = Toolbox(full, damping=1.0, inverse=ekfac, eigen=None, curvature="ggn").operator
    phases.operators.append(operator_full)
    phases("ekfac fit (all blocks)", lambda: ekfac.fit(operator_full))
    delta = cfg.damping_fraction * largest_eigenvalue(ekfac)
    tb_full = Toolbox(full, damping=delta, inverse=ekfac, eigen=None, curvature="ggn", operator=operator_full)
    held = heldout.batch()
    infl_full = phases("ekfac influence (all blocks)", lambda: to_numpy(tb_full.influence(held)))
    self_infl = phases("ekfac self-influence", lambda: to_numpy(tb_full.self_influence()))

    # ---- the selected block: EK-FAC against exact CG on its GGN, at two dampings, on the same
    # subset of test snapshots
    block = Objective(model, task, data, weight_decay=cfg.weight_decay, batch_size=cfg.hessian_batch,
                      params=projection_patterns([k_block]), dtype=dtype, progress=cfg.progress)
    ekfac_b = EKFACCurvature()
    lanczos = LanczosCurvature(m=cfg.lees_m, tol=1e-6, seed=cfg.seed)
    operator_b = Toolbox(block, damping=1.0, inverse=ekfac_b, eigen=None, curvature="ggn",
                         cache_graphs=True).operator
    phases.operators.append(operator_b)
    phases("ekfac fit (block)", lambda: ekfac_b.fit(operator_b))
    phases("lanczos top-m (block)", lambda: lanczos.fit(operator_b))
    delta_b = cfg.damping_fraction * largest_eigenvalue(ekfac_b)
    pick = comparison_subset(heldout, cfg.heldout_per_v1, cfg.n_compare)
    compare = heldout.subset(pick).batch()

    def compare_rows(exact: np.ndarray, approx: np.ndarray) -> dict[str, Any]:
        rows = [agreement(e, a) for e, a in zip(exact, approx)]
        spearman = [r["spearman_resolved"] for r in rows]
        return {"spearman_per_test_point": spearman, "spearman_min": float(np.nanmin(spearman)),
                "spearman_median": float(np.nanmedian(spearman)),
                "pearson_median": float(np.nanmedian([r["pearson"] for r in rows])),
                "relative_error_median": float(np.median([r["max_rel_error"] for r in rows])),
                "relative_error_max": float(max(r["max_rel_error"] for r in rows)),
                f"top{cfg.top_k}_overlap": top_k_overlap(exact, approx, k=cfg.top_k)}

    # the curvature-free baseline g_tᵀg_r (influence as δ → ∞, up to the factor 1/(nδ))
    g_compare = block.gradients(compare)
    dots = to_numpy(block.training_rows(lambda G: G @ g_compare.T, g_compare.shape[0]).T)
    comparisons, arrays_compare = [], {}
    for factor in cfg.comparison_dampings:
        d = factor * delta_b
        tb_bk = Toolbox(block, damping=d, inverse=ekfac_b, eigen=None, curvature="ggn", cache_graphs=True,
                        operator=operator_b)
        cg = CGCurvature(rtol=cfg.cg_rtol, max_iter=cfg.cg_max_iter)
        tb_bc = Toolbox(block, damping=d, inverse=cg, eigen=lanczos, curvature="ggn", cache_graphs=True,
                        operator=operator_b)
        label = f"δ = {d:.3g}"
        infl_bk = phases(f"ekfac influence (block, {label})", lambda: to_numpy(tb_bk.influence(compare)))
        infl_bc = phases(f"cg influence (block, {label})", lambda: to_numpy(tb_bc.influence(compare)))
        entry = {"damping": d, "damping_over_lambda_max": d / float(lanczos.values[0]),
                 "cg": {k: v for k, v in cg.diagnostics.items() if k != "seconds"},
                 "ekfac_vs_cg": compare_rows(infl_bc, infl_bk),
                 "gradient_dot_vs_cg": compare_rows(infl_bc, dots)}
        if factor == cfg.comparison_dampings[0]:
            entry["all_blocks_ekfac_vs_block_cg"] = compare_rows(infl_bc, infl_full[pick])
            arrays_compare = {"compare_cg": infl_bc.tolist(), "compare_ekfac": infl_bk.tolist()}
            if cfg.dense_check:  # the oracle, where M² fits: the exact backends must agree with it
                dense = Toolbox(block, damping=d, inverse="dense", eigen="dense", curvature="ggn",
                                operator=operator_b)
                infl_dense = phases("dense influence (block, oracle)", lambda: to_numpy(dense.influence(compare)))
                tests_all = test_all.batch()
                entry["dense_check"] = {
                    "cg_vs_dense_relative_error": relative_error(infl_dense, infl_bc),
                    "lees_lanczos_vs_dense_relative_error": relative_error(
                        to_numpy(dense.extrapolation_score(tests_all, labels="true", m=cfg.lees_m)),
                        to_numpy(tb_bc.extrapolation_score(tests_all, labels="true", m=cfg.lees_m))),
                    "top_eigenvalues_relative_error": relative_error(
                        to_numpy(dense.eigen.eigh(cfg.lees_m)[0]), to_numpy(lanczos.values[: cfg.lees_m])),
                }
        comparisons.append(entry)

    report["block_comparison"] = {
        "block": k_block, "num_params": block.num_params, "test_points": int(len(pick)),
        "test_v1": heldout.v1[pick].tolist(), "lambda_max": float(lanczos.values[0]),
        "ekfac_lambda_max": largest_eigenvalue(ekfac_b), "dampings": comparisons,
    }

    # ---- influence on held-out snapshots: who helps?
    report["influence"] = {"curvature": "GGN, EK-FAC, projection layers of all blocks", "num_params": full.num_params,
                           "damping": delta, "shape": list(infl_full.shape),
                           **who_helps(infl_full, heldout, train_set, cfg.top_k)}

    # ---- self-influence: the damaged training snapshots
    def detection(score: np.ndarray) -> dict[str, float]:
        out = {}
        for name, mask in (("corrupted", train_set.corrupted), ("mislabelled", train_set.mislabelled)):
            if mask.any():
                k = int(mask.sum())
                out[f"auroc_{name}"] = auroc(score[clean | mask], mask[clean | mask])
                out[f"{name}_in_top_{k}"] = int(mask[np.argsort(-score)[:k]].sum())
        return out

    report["self_influence"] = {
        "n_corrupted": int(train_set.corrupted.sum()), "n_mislabelled": int(train_set.mislabelled.sum()),
        "self_influence": detection(self_infl), "training_loss_baseline": detection(train_nll),
    }

    # ---- LEES (Lanczos on the block's GGN) and RUE (EK-FAC bootstrap) inside vs outside
    tests = test_all.batch()
    tb_lees = Toolbox(block, damping=delta_b, inverse=ekfac_b, eigen=lanczos, curvature="ggn", operator=operator_b)
    lees = phases("lees (block)", lambda: to_numpy(tb_lees.extrapolation_score(tests, labels="true", m=cfg.lees_m)))
    rue = phases("rue bootstrap (ekfac, all blocks)",
                 lambda: to_numpy(tb_full.rue(tests, n_bootstrap=cfg.rue_bootstrap, seed=cfg.seed)))

    def separation(score: np.ndarray) -> dict[str, Any]:
        inside_mask = ~is_outside
        out = {"auroc_outside_vs_inside": auroc(score, is_outside), "by_v1": group_summary(score, test_all.v1)}
        for v in cfg.outside_v1:
            mask = test_all.v1 == v
            out[f"auroc_v1={v:g}_vs_inside"] = auroc(score[mask | inside_mask], mask[mask | inside_mask])
        return out

    report["lees"] = {"m": cfg.lees_m, "top_eigenvalues": to_numpy(lanczos.values[: cfg.lees_m]).tolist(),
                      "lanczos": {k: v for k, v in lanczos.diagnostics.items() if k != "seconds"},
                      **separation(lees)}
    report["rue"] = {"n_bootstrap": cfg.rue_bootstrap, "damping": tb_full.rue_damping, **separation(rue)}
    report["nll_separation"] = separation(nll_test)
    report["n_train"] = n
    report["phases"] = phases.rows
    report["peak_above_baseline"] = phases.peak()
    report["baseline_rss"] = phases.baseline
    report["arrays"] = {
        "test_v1": test_all.v1.tolist(), "test_outside": is_outside.tolist(), "lees": lees.tolist(),
        "rue": rue.tolist(), "test_nll": nll_test.tolist(), "self_influence": self_infl.tolist(),
        "train_nll": train_nll.tolist(), "train_corrupted": train_set.corrupted.tolist(),
        "train_mislabelled": train_set.mislabelled.tolist(), "train_v1": train_set.v1.tolist(),
        **arrays_compare,
    }
    return report


# ---------------------------------------------------------------------------------------------- output
def figure(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    a = {k: np.asarray(v) for k, v in report["arrays"].items()}
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    ax = fig.subplots(2, 2)
    # (a) EK-FAC against CG on the block
    c = ax[0, 0]
    for i, (e, k) in enumerate(zip(a["compare_cg"], a["compare_ekfac"])):  # each test point scaled by its max |I|
        c.scatter(e / np.abs(e).max(), k / np.abs(k).max(), s=6, alpha=0.6,
                  label=f"V1 = {report['block_comparison']['test_v1'][i]:g}")
    c.plot([-1, 1], [-1, 1], "k:", lw=0.8)
    bc = report["block_comparison"]
    first = bc["dampings"][0]
    c.set(xlabel="influence / max |influence|, exact (CG on the block's GGN)",
          ylabel="influence / max |influence|, EK-FAC (same block)",
          title=f"(a) block {bc['block']} ({bc['num_params']:,} parameters), δ = {first['damping']:.2g}: "
                f"Spearman median {first['ekfac_vs_cg']['spearman_median']:.3f}")
    c.legend(fontsize=7, markerscale=2)
    # (b) LEES and (c) RUE by V1
    for c, key, title in ((ax[0, 1], "lees", "(b) LEES (Lanczos, block GGN)"),
                          (ax[1, 0], "rue", "(c) RUE (bootstrap, EK-FAC)")):
        v1s = np.unique(a["test_v1"])
        pos = np.arange(len(v1s))
        for p, v in zip(pos, v1s):
            vals = a[key][a["test_v1"] == v]
            out = bool(a["test_outside"][a["test_v1"] == v][0])
            c.scatter(np.full(len(vals), p) + np.linspace(-0.2, 0.2, len(vals)), vals, s=12,
                      color="tab:red" if out else ("tab:blue" if v <= V1_TRANSITION else "tab:purple"))
        c.set_xticks(pos, [f"{v:g}" for v in v1s], rotation=60, fontsize=8)
        c.set_yscale("log")
        c.set(xlabel="V1 of the test snapshots (red: outside the training range)", ylabel=key.upper(),
              title=f"{title}: AUROC outside vs inside {report[key]['auroc_outside_vs_inside']:.2f}")
    # (d) self-influence against the training loss
    c = ax[1, 1]
    clean = ~(a["train_corrupted"] | a["train_mislabelled"])
    c.scatter(a["train_nll"][clean], a["self_influence"][clean], s=5, color="0.6", label="clean")
    c.scatter(a["train_nll"][a["train_corrupted"]], a["self_influence"][a["train_corrupted"]], s=18,
              color="tab:red", label="corrupted (one site flipped)")
    c.scatter(a["train_nll"][a["train_mislabelled"]], a["self_influence"][a["train_mislabelled"]], s=18,
              color="tab:orange", marker="s", label="mislabelled (other phase token)")
    si = report["self_influence"]["self_influence"]
    c.set(xscale="log", yscale="log", xlabel="training NLL", ylabel="self-influence (EK-FAC)",
          title=f"(d) AUROC corrupted {si.get('auroc_corrupted', float('nan')):.2f}, "
                f"mislabelled {si.get('auroc_mislabelled', float('nan')):.2f}")
    c.legend(fontsize=8)
    fig.suptitle(f"GPT-2 ({report['model']['num_params']:,} parameters) on L = {report['config']['L']} "
                 "Fermi–Hubbard snapshots")
    fig.savefig(path, dpi=110)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    figure(report, out / "transformer_snapshots.png")


def summary(report: dict[str, Any]) -> str:
    m, bc, inf, si = report["model"], report["block_comparison"], report["influence"], report["self_influence"]
    k = report["config"]["top_k"]
    floor = m["exact_entropy_floor"]
    lines = [
        f"GPT-2: {m['num_params']:,} parameters; {report['n_train']} training snapshots; held-out NLL "
        f"{m['heldout_nll']:.3f} nats (exact floor LL {floor.get('LL', float('nan')):.3f}, CDW-I "
        f"{floor.get('CDW-I', float('nan')):.3f}); Bayes phase accuracy {m['phase_accuracy_heldout_and_inside']:.2f} "
        f"(exact Bayes-optimal {m['bayes_optimal_phase_accuracy_heldout_and_inside']:.2f})",
        f"block {bc['block']} ({bc['num_params']:,} parameters, GGN λ_max {bc['lambda_max']:.3g}):",
    ]
    for entry in bc["dampings"]:
        e, g = entry["ekfac_vs_cg"], entry["gradient_dot_vs_cg"]
        lines.append(
            f"  δ = {entry['damping']:.3g} ({entry['damping_over_lambda_max']:.1e} λ_max): EK-FAC vs exact CG Spearman "
            f"median {e['spearman_median']:.3f} (min {e['spearman_min']:.3f}), top-{k} overlap "
            f"{e[f'top{k}_overlap']['helpful']:.2f}/{e[f'top{k}_overlap']['harmful']:.2f}, rel. error median "
            f"{e['relative_error_median']:.3f}; gradient dot Spearman {g['spearman_median']:.3f}; CG "
            f"{entry['cg']['iterations']} iterations, {entry['cg']['hvps']:.0f} HVPs")
        if "all_blocks_ekfac_vs_block_cg" in entry:
            lines.append(f"  all-block EK-FAC vs block CG: Spearman median "
                         f"{entry['all_blocks_ekfac_vs_block_cg']['spearman_median']:.3f}")
        if "dense_check" in entry:
            lines.append(f"  dense oracle: {entry['dense_check']}")
    lines += [
        f"influence (all blocks, δ = {inf['damping']:.3g}): top-{k} helpful / harmful / base rate: same configuration "
        f"{inf['helpful_same_configuration']:.2f} / {inf['harmful_same_configuration']:.2f} / "
        f"{inf['base_rate_same_configuration']:.2f}; symmetry-equivalent {inf['helpful_symmetry_equivalent']:.2f} / "
        f"{inf['harmful_symmetry_equivalent']:.2f} / {inf['base_rate_symmetry_equivalent']:.2f}; same phase token "
        f"{inf['helpful_same_phase_token']:.2f} / {inf['harmful_same_phase_token']:.2f} / "
        f"{inf['base_rate_same_phase_token']:.2f}; mean |ΔV1| {inf['helpful_mean_abs_dv1']:.2f} / "
        f"{inf['harmful_mean_abs_dv1']:.2f} / {inf['base_mean_abs_dv1']:.2f}",
        f"self-influence: {si['self_influence']}; training-loss baseline: {si['training_loss_baseline']}",
        f"AUROC outside vs inside: LEES {report['lees']['auroc_outside_vs_inside']:.3f}, RUE "
        f"{report['rue']['auroc_outside_vs_inside']:.3f}, NLL {report['nll_separation']['auroc_outside_vs_inside']:.3f}",
        f"peak memory above the baseline {format_bytes(report['peak_above_baseline'])}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 0.8 M-parameter model on 512 snapshots (minutes)")
    parser.add_argument("--out", type=Path, default=Path("transformer_snapshots_output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=None, help="block of the exact comparison (default: the last)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars and no per-phase lines")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return replace(PRESETS["quick" if args.quick else "full"], seed=args.seed, block=args.block,
                   progress=not args.no_progress)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    report = run(cfg)
    report["wall_seconds"] = time.perf_counter() - t0
    write(report, args.out)
    print(summary(report))
    print(f"wall time {report['wall_seconds']:.0f} s; report and figure in {args.out}")
    return report


if __name__ == "__main__":
    main()
