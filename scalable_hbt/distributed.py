"""Data parallelism over ``torch.distributed`` (launched with ``torchrun`` or ``mp.spawn``).

When a process group is initialised, every pass over the *training* data visits only this
rank's contiguous shard ``[n·r/W, n·(r+1)/W)``; the sums (HVPs, gradients, K-FAC factors)
and the per-training-point arrays (influence columns, RelatIF norms) are then combined
with an all-reduce, so every rank ends with the same result as one process would. Test
data and everything in parameter space (solves, Lanczos, eigendecompositions) are
replicated: each rank computes them identically. Works with gloo on CPU and NCCL on GPU.
Batch jobs also deal out the test chunks of methods that, once fitted, need only the test
points (LEES, bootstrap RUE) across the ranks (:mod:`scalable_hbt.apps.jobs.runner`).

``hbt run`` initialises the group itself when ``torchrun`` launched it
(:func:`process_group_from_environment`); library users call
``torch.distributed.init_process_group`` as usual.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def shard(n: int) -> tuple[int, int]:
    """This rank's contiguous range ``[start, stop)`` of n training points."""
    r, w = rank(), world_size()
    return n * r // w, n * (r + 1) // w


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op without a process group); returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: Tensor, dim: int = 0) -> Tensor:
    """The ranks' tensors (equal shapes) concatenated along ``dim``, in rank order, on every rank
    (``tensor`` itself without a process group)."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def split_indices(indices: Tensor) -> Tensor:
    """This rank's share of a mini-batch's sample indices (every W-th, starting at the rank)."""
    return indices[rank()::world_size()] if active() else indices


def is_writer() -> bool:
    """Only rank 0 writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if active():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects; identity without a process group).

    Used wherever the ranks must agree on a decision that reads shared files (which chunks
    are finished, whether an output folder may be used) so that no rank races a writer."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launched_by_torchrun() -> bool:
    """Whether the environment of ``torchrun`` (``WORLD_SIZE`` > 1) describes this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on: a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under
    ``torchrun`` (one GPU per process); anything else is returned unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def process_group_from_environment(device: str | torch.device = "cpu") -> Iterator[None]:
    """Initialise the default process group from ``torchrun``'s environment, and destroy it on
    exit: NCCL for a CUDA ``device``, gloo otherwise. Does nothing outside ``torchrun`` or
    when the caller has already initialised a group."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise RuntimeError("torchrun launched this process, but this torch build has no torch.distributed; "
                           "run without torchrun or install a torch build with distributed support.")
    target = local_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


__all__ = ["active", "rank", "world_size", "shard", "all_reduce_sum", "all_gather_cat", "split_indices", "is_writer", "barrier",
           "broadcast_object", "launched_by_torchrun", "local_device", "process_group_from_environment"]
