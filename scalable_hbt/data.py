"""Uniform, ordered access to data given as tensors, a ``Dataset`` or a ``DataLoader``.

The toolbox indexes training points: row ``i`` of an influence matrix belongs to the
``i``-th sample of the data as given. A :class:`DataSource` therefore always iterates in
the data's own order (a loader's shuffling sampler is ignored, its ``collate_fn`` kept)
and supports random access for the mini-batches of stochastic solvers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from .errors import InputError

DataLike = Union[Tensor, np.ndarray, tuple, list, Dataset, DataLoader]
_ARRAYS = (Tensor, np.ndarray)


@dataclass
class Batch:
    """A contiguous slice ``[start, start + len(x))`` of a data source.

    ``x`` has shape ``(B, *input_shape)``; ``y`` is ``None`` for unlabelled data.
    """

    start: int
    x: Tensor
    y: Tensor | None

    def __len__(self) -> int:
        return self.x.shape[0]


def _split_item(item: Any) -> tuple[Any, Any]:
    """Split a dataset item into (input, target-or-None)."""
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return item[0], None
        if len(item) == 2:
            return item[0], item[1]
        raise InputError(
            f"dataset items must be x or (x, y); got a {type(item).__name__} of length {len(item)}. "
            "Wrap your dataset so that __getitem__ returns (input, target)."
        )
    return item, None


class DataSource:
    """An ordered, randomly accessible view of inputs and optional targets.

    Parameters
    ----------
    data:
        ``X`` (a tensor of inputs), ``(X, y)``, a map-style ``Dataset`` whose items are
        ``x`` or ``(x, y)``, or a ``DataLoader`` over such a dataset.
    y:
        Targets, when ``data`` is a bare tensor of inputs.
    name:
        Used in error messages ("training data", "test data").
    """

    def __init__(self, data: DataLike, y: Tensor | None = None, *, name: str = "data") -> None:
        self.name = name
        self._X: Tensor | None = None
        self._y: Tensor | None = None
        self._dataset: Dataset | None = None
        self._collate = default_collate
        self.loader_batch_size: int | None = None
        if isinstance(data, DataLoader):
            if y is not None:
                raise InputError(f"{name}: pass targets inside the DataLoader, not as a separate y.")
            self._dataset = data.dataset
            self._collate = data.collate_fn or default_collate
            self.loader_batch_size = data.batch_size
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            if y is not None:
                raise InputError(f"{name}: pass targets inside the Dataset, not as a separate y.")
            self._dataset = data
        elif isinstance(data, IterableDataset):
            raise InputError(
                f"{name}: an IterableDataset has no fixed order or length, so training points "
                "cannot be indexed. Materialise it into tensors or a map-style Dataset."
            )
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(a, _ARRAYS) for a in data):
            if y is not None:
                raise InputError(f"{name}: targets were given twice (inside the tuple and as y).")
            self._X, self._y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        elif isinstance(data, _ARRAYS):
            self._X, self._y = torch.as_tensor(data), (None if y is None else torch.as_tensor(y))
        else:
            inside = f" of ({', '.join(type(a).__name__ for a in data)})" if isinstance(data, (tuple, list)) else ""
            raise InputError(
                f"{name}: expected a tensor or array X, a pair (X, y) of tensors or arrays, a Dataset or a "
                f"DataLoader; got a {type(data).__name__}{inside}."
            )
        if self._X is not None:
            self._validate_tensors()
        elif len(self._dataset) == 0:  # type: ignore[arg-type]
            raise InputError(f"{name}: the dataset is empty.")

    def _validate_tensors(self) -> None:
        X, y = self._X, self._y
        assert X is not None
        if X.ndim == 0 or X.shape[0] == 0:
            raise InputError(f"{self.name}: inputs must have a leading batch dimension with ≥ 1 sample; got shape {tuple(X.shape)}.")
        if y is not None:
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y)
                self._y = y
            if y.ndim == 0 or y.shape[0] != X.shape[0]:
                raise InputError(
                    f"{self.name}: inputs have {X.shape[0]} samples but targets have shape {tuple(y.shape)}; "
                    "the first dimension of X and y must agree."
                )

    @property
    def targets(self) -> Tensor | None:
        """All targets at once when the data are tensors (``None`` for datasets and unlabelled data)."""
        return self._y if self._X is not None else None

    def __len__(self) -> int:
        if self._X is not None:
            return self._X.shape[0]
        return len(self._dataset)  # type: ignore[arg-type]

    @property
    def has_targets(self) -> bool:
        """Whether the data carries targets (checked on the first sample for datasets)."""
        if self._X is not None:
            return self._y is not None
        return _split_item(self._dataset[0])[1] is not None  # type: ignore[index]

    def take(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor | None]:
        """Inputs and targets of the given sample indices, in that order."""
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        if self._X is not None:
            idx = torch.as_tensor(indices, dtype=torch.long, device=self._X.device)
            return self._X[idx], (self._y[idx.to(self._y.device)] if self._y is not None else None)
        items = [_split_item(self._dataset[i]) for i in indices]  # type: ignore[index]
        if items[0][1] is None:
            return self._collate([it[0] for it in items]), None
        xs, ys = self._collate([(it[0], it[1]) for it in items])
        return xs, ys

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Consecutive batches ``[i, i + batch_size)`` of the samples ``start .. stop-1``."""
        stop = len(self) if stop is None else stop
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            if self._X is not None:
                yield Batch(i, self._X[i:j], self._y[i:j] if self._y is not None else None)
            else:
                x, y = self.take(range(i, j))
                yield Batch(i, x, y)

    def num_batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> int:
        stop = len(self) if stop is None else stop
        return max(0, -(-(stop - start) // batch_size))

    def sample_shape(self) -> torch.Size:
        """Shape of one input, without the batch dimension."""
        if self._X is not None:
            return self._X.shape[1:]
        x, _ = self.take([0])
        return x.shape[1:]
