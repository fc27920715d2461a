"""One scaling measurement in a fresh process: time and peak memory of one operation.

    python benchmarks/scaling_worker.py --op hvp --M 100000 --n 256 --device cpu

prints one JSON object on its last line. The model is an MLP from the width family of
:func:`mlp_for` (input 64, two hidden layers of width w, 10 classes; M = w² + 76w + 10),
the data random (n × 64 inputs, random labels), float32, chunks of ``--batch-size``.

Operations (each timed once after the problem is built; the gradient is timed beside it):

* ``hvp``: one full-data HVP, ``HessianOperator.matvec``;
* ``lanczos``: top-20 eigenpairs, ``LanczosCurvature(m=20)`` (at most 60 HVPs);
* ``lissa``: ``LiSSACurvature`` fit (automatic scale) + one solve, depth 20, b = n/4, δ = 1;
* ``kfac``: ``KFACCurvature`` fit (one pass over the data);
* ``dense``: ``DenseCurvature`` fit (M HVPs + eigh; only for small M).

Peak memory: ``scalable_hbt.memory.PeakMemory`` around the operation — on CPU the resident
set size sampled during it (which sees torch's allocations, unlike ``tracemalloc``) above
its value just before; on CUDA the allocator's peak above the memory allocated before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from scalable_hbt import HessianOperator, Objective  # noqa: E402
from scalable_hbt.curvature import DenseCurvature, KFACCurvature, LanczosCurvature, LiSSACurvature  # noqa: E402
from scalable_hbt.memory import PeakMemory  # noqa: E402

IN_FEATURES, CLASSES = 64, 10
OPS = ("hvp", "lanczos", "lissa", "kfac", "dense")


def width_for(M: int) -> int:
    """The hidden width w whose MLP has about M parameters: M(w) = w² + (IN + CLASSES + 2)·w + CLASSES."""
    b = IN_FEATURES + CLASSES + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * max(M - CLASSES, 1))) / 2))


def mlp_for(M: int) -> nn.Sequential:
    """Linear(64→w) · ReLU · Linear(w→w) · ReLU · Linear(w→10) with w = ``width_for(M)``."""
    w = width_for(M)
    return nn.Sequential(nn.Linear(IN_FEATURES, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, CLASSES))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(op: str, M: int, n: int, batch_size: int, device: str) -> dict:
    """Build the problem, run ``op`` once and return its seconds, peak-memory growth and the
    seconds of one full-data gradient measured in the same process."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = mlp_for(M).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, IN_FEATURES, generator=gen).to(dev)
    y = torch.randint(0, CLASSES, (n,), generator=gen).to(dev)
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=5e-5, batch_size=min(batch_size, n), device=dev,
                    dtype=torch.float32, progress=False)
    op_h = HessianOperator(obj)
    v = torch.randn(obj.num_params, generator=gen).to(dev)
    obj.gradient()                                       # warm-up (allocator, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    obj.gradient()
    _sync(dev)
    grad_s = time.perf_counter() - t0
    actions = {
        "hvp": lambda: op_h.matvec(v),
        "lanczos": lambda: LanczosCurvature(m=20, max_iter=60, tol=1e-6).fit(op_h),
        "lissa": lambda: LiSSACurvature(depth=20, batch_size=max(1, n // 4), deflate=0, seed=0, progress=False,
                                        warn_residual=None, estimate_residual=False).fit(op_h).solve(v[:, None], 1.0),
        "kfac": lambda: KFACCurvature().fit(op_h),
        "dense": lambda: DenseCurvature().fit(op_h),
    }
    h0 = op_h.num_hvps
    with PeakMemory(dev) as memory:  # sampled RSS on CPU, the allocator's peak on CUDA
        _sync(dev)
        t0 = time.perf_counter()
        actions[op]()
        _sync(dev)
        seconds = time.perf_counter() - t0
    return {"op": op, "M": obj.num_params, "M_target": M, "width": width_for(M), "n": n, "batch_size": batch_size,
            "device": device, "seconds": seconds, "gradient_seconds": grad_s, "hvps": float(op_h.num_hvps - h0),
            "peak_bytes": max(memory.increase, 0), "param_bytes": obj.num_params * 4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=OPS, required=True)
    ap.add_argument("--M", type=int, required=True, help="target number of parameters")
    ap.add_argument("--n", type=int, required=True, help="training points")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(json.dumps(measure(args.op, args.M, args.n, args.batch_size, args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
