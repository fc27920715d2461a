"""Does a warm-started retrain respond to a removed point through its gradient? A check of the
retraining protocol behind the leave-one-out and warm-bootstrap ground truths.

For the m highest-loss training points z_r of the studied model θ̃: the change of every test loss
when z_r is left out of a warm-started retrain from θ̃, minus the same retrain on all points,
against g_tᵀ g_r (gradients of the test and training losses at θ̃, by ``torch.func`` on the
module). Any gradient method's first-order response to removing z_r is a positive-semidefinite
map of g_r, and on a workload whose curvature has one dominant direction influence is nearly
proportional to g_tᵀ g_r; a protocol whose changes anti-correlate with it measures its
optimiser, not the data. Reported per second phase: Pearson over test points for each removed
point, pooled over (test, removed) pairs, and the spread of the changes.

Command (Ising ResNet, the variants of its second phase; cost: (m + 1) warm retrains per variant):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m benchmarks.ground_truth.protocol --size quick \\
        --removed 8 --variants sgd:0.008 sgd:0.03 momentum:0.008 adam:0.003
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from . import ising, truths
from .retrain_cache import RetrainCache


def gradients(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point gradients of the cross-entropy at the model's parameters (eval mode), ``(N, M)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, x, target):
        out = functional_call(model, (p, buffers), (x[None],))
        return torch.nn.functional.cross_entropy(out, target[None])

    per_point = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g.flatten(1) for g in per_point.values()], dim=1)


def check(size: str, removed: int, variants: list[tuple[str, float]], retrain_cache: str | Path | None = None,
          data_cache: str | Path | None = None) -> list[dict]:
    """The table's rows (see ``render``) for the Ising workload at ``size``: one per (optimizer, rate)
    of ``variants``, over the ``removed`` highest-loss training points."""
    workload = ising.workload(size, data_cache)
    cache = RetrainCache(retrain_cache, workload)
    model = truths.retrain(workload, cache, "trained", np.arange(len(workload.train_y)), workload.seed)
    rows, dots = [], None
    for optimizer, lr in variants:
        variant = replace(workload, warm_train=replace(workload.warm_train, frozen_optimizer=optimizer, frozen_lr=lr))
        loo = truths.leave_one_out_truth(variant, RetrainCache(None, variant), model, removed, progress=False)
        points, change = loo.removed, loo.change
        if dots is None:
            dots = (gradients(model, workload.test_X, workload.test_y)
                    @ gradients(model, workload.train_X[points], workload.train_y[points]).T).double().numpy()
        per_point = [float(np.corrcoef(dots[:, j], change[:, j])[0, 1]) for j in range(len(points))]
        rows.append({"optimizer": optimizer, "lr": lr, "per_point": per_point,
                     "pooled": float(np.corrcoef(dots.ravel(), change.ravel())[0, 1]),
                     "positive": sum(c > 0 for c in per_point), "change_std": float(change.std())})
        print(render(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| second phase | rate | Pearson per removed point | positive | pooled Pearson | std of the changes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {', '.join(f'{c:.2f}' for c in r['per_point'])} | "
                     f"{r['positive']}/{len(r['per_point'])} | {r['pooled']:.2f} | {r['change_std']:.2g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="quick", choices=sorted(ising.SIZES))
    parser.add_argument("--removed", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=["sgd:0.008", "sgd:0.03", "momentum:0.008", "adam:0.003"],
                        help="second phases as optimizer:rate, optimizer one of " + ", ".join(ising.FROZEN_OPTIMIZERS))
    parser.add_argument("--cache", default=None, help="retrain cache folder, to share θ̃ with a ground-truth run")
    args = parser.parse_args(argv)
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants]
    torch.set_num_threads(1)
    print(render(check(args.size, args.removed, variants, args.cache)))


if __name__ == "__main__":
    main()
