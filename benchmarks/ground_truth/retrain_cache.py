"""Resumable on-disk cache of retrained models: one file per retrain, written atomically.

Layout: ``<root>/<workload name>/<fingerprint>/<key>.pt`` holding the retrained model's
``state_dict``. The fingerprint (12 hex digits of a sha256) covers what a retrain depends on —
the workload's name and description, its training data and labels, and its training routine's
settings (``repr`` of the trainer, e.g. a ``Recipe``) — so a changed workload never reuses stale
models, and a run killed part-way continues with the retrains it had finished: a file exists
whole or not at all (``scalable_hbt.files.atomic_write``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from scalable_hbt.files import atomic_write

from .workload import Workload

State = dict[str, Tensor]


def workload_fingerprint(workload: Workload) -> str:
    """12 hex digits identifying the retrains of ``workload`` (see the module docstring)."""
    h = hashlib.sha256()
    for part in (workload.name, workload.description, repr(workload.train), repr(workload.warm_train),
                 str(workload.weight_decay)):
        h.update(part.encode("utf-8") + b"\0")
    for tensor in (workload.train_X, workload.train_y):
        h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class RetrainCache:
    """``cache.state(key, compute)``: the cached state of retrain ``key``, or ``compute()`` saved.

    ``trained`` and ``loaded`` list the keys computed and read by this instance (for reports
    and tests). ``root=None`` keeps nothing on disk.
    """

    def __init__(self, root: str | Path | None, workload: Workload) -> None:
        self.folder = None if root is None else Path(root) / workload.name / workload_fingerprint(workload)
        self.trained: list[str] = []
        self.loaded: list[str] = []

    def path(self, key: str) -> Path | None:
        if self.folder is None:
            return None
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"a retrain key must be a plain file stem; got {key!r}.")
        return self.folder / f"{key}.pt"

    def state(self, key: str, compute: Callable[[], State]) -> State:
        path = self.path(key)
        if path is not None and path.exists():
            self.loaded.append(key)
            return torch.load(path, map_location="cpu", weights_only=True)
        state = {name: value.detach().cpu().clone() for name, value in compute().items()}
        self.trained.append(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
        return state
