"""Strong scaling of one full-data HVP: 1 process versus 2 gloo processes on this machine.

Each process uses one thread; the 2-process run shards the training data and all-reduces
(the library's torch.distributed path). Reported: the median HVP time of each setting
over several rounds and their ratio (the speed-up), as measured inside one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed_scaling.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalable_hbt import HessianOperator, Objective
from scalable_hbt.physics import PaperCNN

N, ROUNDS = 1000, 7


def _problem() -> HessianOperator:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(N, 1, 924, generator=g), torch.randint(0, 2, (N,), generator=g)
    obj = Objective(PaperCNN().eval(), "cross_entropy", (X, y), weight_decay=5e-5, batch_size=250, progress=False)
    return HessianOperator(obj)


def _time_hvps(op: HessianOperator) -> list[float]:
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    op.matvec(v)  # warm-up
    times = []
    for _ in range(ROUNDS):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        times = _time_hvps(_problem())
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def main() -> dict:
    torch.set_num_threads(1)
    single = statistics.median(_time_hvps(_problem()))
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.spawn(_worker, args=(str(Path(tmp) / "init"), out), nprocs=2, join=True)
        double = statistics.median(torch.load(out))
    result = {"hvp_seconds_1_process": single, "hvp_seconds_2_processes": double, "speedup": single / double}
    print(f"full-data HVP, paper CNN, n = {N}: 1 process {single:.3f} s, 2 gloo processes {double:.3f} s, "
          f"speed-up {single / double:.2f}×")
    return result


if __name__ == "__main__":
    main()
