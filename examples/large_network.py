"""The matrix-free toolbox on a network with ≥ 10 million parameters, on a CPU.

A VGG-style CNN on 3×32×32 inputs (11.5 M parameters at ``--width 1``; synthetic
CIFAR-shaped data, so nothing is downloaded), run through:

* Lanczos top-m eigenpairs of the exact Hessian (m = 20),
* LiSSA influence for a handful of test points, scale chosen automatically, deflated by
  the Lanczos eigenpairs (shared, not recomputed),
* the EK-FAC RelatIF normaliser ‖H_δ⁻¹ g_r‖ for every training point,
* the LEES extrapolation score from the Lanczos eigenvectors,

reporting time and peak memory of every phase (the resident set size sampled during the
phase, above the process's resident size when the run starts, torch imported). Memory stays
O(m·M) plus one batch of activations: no M × M and no n × M array is ever formed. The ratio printed at the end compares the largest peak over the baseline to
(m + 4)·M·4 bytes plus one batch of activations.

    python examples/large_network.py                 # the ≥ 10 M-parameter run (minutes)
    python examples/large_network.py --width 0.125   # a small variant (seconds; run in CI)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from scalable_hbt import Objective, Toolbox
from scalable_hbt.curvature import EKFACCurvature, LanczosCurvature, LiSSACurvature
from scalable_hbt.memory import PeakMemory, format_bytes, resident_bytes


def vgg_like(width: float = 1.0, classes: int = 10) -> nn.Sequential:
    """Conv3×3 stacks (64, 128, 256², 512⁴ channels × width), max-pooling to 2×2, global
    average pooling and a linear classifier; 11.5 M parameters at width 1."""
    c = [max(4, int(k * width)) for k in (64, 128, 256, 512)]
    plan = [c[0], "M", c[1], "M", c[2], c[2], "M", c[3], c[3], "M", c[3], c[3], c[3]]
    layers: list[nn.Module] = []
    channels = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
            channels = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all intermediate outputs of one forward pass on the batch ``x``."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def run(width: float, n: int, n_test: int, m: int, batch_size: int, lissa_depth: int, seed: int,
        progress: bool, lanczos_tol: float = 1e-3, lanczos_hvps: int = 150) -> dict:
    torch.manual_seed(seed)
    baseline = resident_bytes()
    model = vgg_like(width).eval()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    Xt, yt = torch.randn(n_test, 3, 32, 32, generator=g), torch.randint(0, 10, (n_test,), generator=g)
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=5e-4, batch_size=batch_size, progress=progress)
    M = obj.num_params
    vector = M * 4  # bytes of one float32 parameter-sized vector
    report: dict = {"num_params": M, "n_train": n, "n_test": n_test, "m": m, "batch_size": batch_size,
                    "baseline_rss": baseline, "phases": {}}

    def phase(name: str, fn):
        t0, hvps0 = time.perf_counter(), tb.operator.num_hvps
        with PeakMemory() as mem:
            out = fn()
        row = {"seconds": time.perf_counter() - t0, "hvps": tb.operator.num_hvps - hvps0,
               "held_before": mem.start - baseline, "peak": mem.peak - baseline, "phase_increase": mem.increase}
        report["phases"][name] = row
        print(f"{name:<22} {row['seconds']:8.1f} s  {row['hvps']:7.1f} HVPs  held before {format_bytes(row['held_before'])}"
              f"  peak {format_bytes(row['peak'])} ({row['peak'] / vector:.1f} M-vectors) above the baseline", flush=True)
        return out

    lanczos = LanczosCurvature(m=m, tol=lanczos_tol, max_iter=lanczos_hvps)
    lissa = LiSSACurvature(deflate=min(10, m), depth=lissa_depth, batch_size=max(1, n // 4), eigen=lanczos,
                           check_curvature=False, warn_residual=None, progress=progress)
    # max_vectors=1: LiSSA solves one test column at a time, so its work arrays are a few M-vectors
    tb = Toolbox(obj, damping=1.0, inverse=lissa, eigen=lanczos, max_vectors=1)
    phase("lanczos top-m", lambda: lanczos.fit(tb.operator))
    phase("lissa fit (scale)", lambda: lissa.fit(tb.operator))
    influence = phase("lissa influence", lambda: tb.influence(Xt, yt))
    ekfac = EKFACCurvature(unsupported="diagonal")
    phase("ekfac fit", lambda: ekfac.fit(tb.operator))
    from scalable_hbt.methods import inverse_gradient_norms
    norms = phase("ekfac normaliser", lambda: inverse_gradient_norms(obj, ekfac, tb.damping))
    lees = phase("lees", lambda: tb.extrapolation_score(Xt, m=m))

    acts = activation_bytes(obj.model, X[:batch_size])
    bound = (m + 4) * vector + acts
    peak = max(p["peak"] for p in report["phases"].values())
    report.update({
        "top_eigenvalues": lanczos.values[:5].tolist(),
        "lanczos": {k: v for k, v in lanczos.diagnostics.items() if k != "seconds"},
        "lissa_residual": lissa.diagnostics.get("relative_residual_max"),
        "influence_shape": list(influence.shape), "normaliser_range": [norms.min().item(), norms.max().item()],
        "lees": lees.tolist(), "activation_bytes": acts, "memory_bound_bytes": bound,
        "peak_increase": peak, "peak_increase_over_bound": peak / bound,
    })
    print(f"M = {M:,} parameters; peak {format_bytes(peak)} above the baseline ({format_bytes(baseline)}: torch, data, "
          f"model); (m + 4)·M·4 B + one batch of activations ({format_bytes(acts)}) = {format_bytes(bound)}; ratio "
          f"{report['peak_increase_over_bound']:.2f}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1: 11.5 M parameters)")
    parser.add_argument("--n", type=int, default=128, help="training points")
    parser.add_argument("--n-test", type=int, default=4, help="test points")
    parser.add_argument("--m", type=int, default=20, help="Lanczos eigenpairs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lissa-depth", type=int, default=20)
    parser.add_argument("--lanczos-tol", type=float, default=1e-3, help="relative Ritz residual to stop at")
    parser.add_argument("--lanczos-hvps", type=int, default=150, help="HVP budget of the Lanczos run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.width, args.n, args.n_test, args.m, args.batch_size, args.lissa_depth, args.seed,
                 not args.no_progress, args.lanczos_tol, args.lanczos_hvps)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
