"""Data parallelism over ``torch.distributed`` (launched with ``torchrun`` or ``mp.spawn``).

When a process group is initialised, every pass over the *training* data visits only this
rank's contiguous shard ``[n·r/W, n·(r+1)/W)``; the sums (HVPs, gradients, K-FAC factors)
and the per-training-point arrays (influence columns, RelatIF norms) are then combined
with an all-reduce, so every rank ends with the same result as one process would. Test
data and everything in parameter space (solves, Lanczos, eigendecompositions) are
replicated: each rank computes them identically. Works with gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

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


def split_indices(indices: Tensor) -> Tensor:
    """This rank's share of a mini-batch's sample indices (every W-th, starting at the rank)."""
    return indices[rank()::world_size()] if active() else indices


def is_writer() -> bool:
    """Only rank 0 writes shared files."""
    return rank() == 0


__all__ = ["active", "rank", "world_size", "shard", "all_reduce_sum", "split_indices", "is_writer"]
