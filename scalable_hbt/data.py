"""Uniform, ordered access to data given as tensors, arrays, dicts, a ``Dataset`` or a ``DataLoader``.

The toolbox indexes training points: row ``i`` of an influence matrix belongs to the ``i``-th
sample of the data as given. A :class:`DataSource` therefore always iterates in the data's own
order (a loader's shuffling sampler is ignored, its ``collate_fn`` kept) and supports random
access for the mini-batches of stochastic solvers.

Inputs may be one tensor per batch, a tuple of tensors (positional arguments of the model) or a
dict of tensors (keyword arguments, the Hugging Face convention); in a dict batch the targets
sit under a key (``"labels"``) and are split off. Every tensor has the batch as its first dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from .errors import InputError

DataLike = Union[Tensor, np.ndarray, tuple, list, dict, Dataset, DataLoader]
Inputs = Union[Tensor, tuple, dict]
"""A batch of model inputs: a tensor, a tuple of tensors or a dict of tensors, batch first."""
_ARRAYS = (Tensor, np.ndarray)


def leaves(x: Inputs) -> list[Tensor]:
    """The tensors of an input batch."""
    return [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]


def batch_size_of(x: Inputs) -> int:
    first = leaves(x)
    if not first:
        raise InputError(f"a batch of inputs must hold tensors; got {type(x).__name__}.")
    return first[0].shape[0]


def map_tensors(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) batch, the structure kept."""
    return tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, x)


def sample_shapes(x: Inputs) -> Any:
    """The shape of one sample of every tensor of a batch (the batch dimension dropped)."""
    return map_tensors(lambda t: tuple(t.shape[1:]), x)


@dataclass
class Batch:
    """A contiguous slice ``[start, start + len(x))`` of a data source.

    ``x`` holds the model inputs (a tensor ``(B, ...)``, a tuple or a dict of such tensors);
    ``y`` the targets, ``None`` for unlabelled data.
    """

    start: int
    x: Inputs
    y: Tensor | None

    def __len__(self) -> int:
        return batch_size_of(self.x)


def _as_tensor(a: Any) -> Any:
    return torch.as_tensor(a) if isinstance(a, np.ndarray) else a


class DataSource:
    """An ordered, randomly accessible view of inputs and optional targets.

    Parameters
    ----------
    data:
        ``X`` (a tensor or array of inputs), ``(X, y)``, a dict of tensors (model keyword
        arguments, targets under ``target_key``), a map-style ``Dataset`` whose items are ``x``,
        ``(x, y)`` or dicts, or a ``DataLoader`` over such a dataset.
    y:
        Targets, when ``data`` is a bare tensor of inputs.
    name:
        Used in error messages ("training data", "test data").
    target_key:
        Where dict items and dict batches keep their targets.
    """

    def __init__(self, data: DataLike, y: Tensor | None = None, *, name: str = "data",
                 target_key: str = "labels") -> None:
        self.name = name
        self.target_key = target_key
        self._X: Inputs | None = None
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
        elif isinstance(data, Mapping):
            tensors = {k: _as_tensor(v) for k, v in data.items()}
            if not all(isinstance(v, Tensor) for v in tensors.values()):
                raise InputError(f"{name}: a dict of data must map names to tensors or arrays; got "
                                 f"{ {k: type(v).__name__ for k, v in data.items()} }.")
            target = tensors.pop(target_key, None)
            if y is not None and target is not None:
                raise InputError(f"{name}: targets were given twice (under {target_key!r} and as y).")
            self._X, self._y = tensors, target if target is not None else _as_tensor(y)
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(a, _ARRAYS) for a in data):
            if y is not None:
                raise InputError(f"{name}: targets were given twice (inside the tuple and as y).")
            self._X, self._y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        elif isinstance(data, _ARRAYS):
            self._X, self._y = torch.as_tensor(data), (None if y is None else torch.as_tensor(y))
        else:
            inside = f" of ({', '.join(type(a).__name__ for a in data)})" if isinstance(data, (tuple, list)) else ""
            raise InputError(
                f"{name}: expected a tensor or array X, a pair (X, y) of tensors or arrays, a dict of tensors, "
                f"a Dataset or a DataLoader; got a {type(data).__name__}{inside}."
            )
        if self._X is not None:
            self._validate_tensors()
        elif len(self._dataset) == 0:  # type: ignore[arg-type]
            raise InputError(f"{name}: the dataset is empty.")

    def _validate_tensors(self) -> None:
        X, y = self._X, self._y
        assert X is not None
        sizes = {t.shape[0] if t.ndim else None for t in leaves(X)}
        if None in sizes or 0 in sizes or not sizes:
            raise InputError(f"{self.name}: inputs must have a leading batch dimension with ≥ 1 sample; got "
                             f"shapes {sample_shapes(X) if sizes else 'none'}.")
        if len(sizes) > 1:
            raise InputError(f"{self.name}: the input tensors disagree on the number of samples: "
                             f"{ {k: tuple(v.shape) for k, v in X.items()} if isinstance(X, dict) else sorted(sizes)}.")
        n = sizes.pop()
        if y is not None:
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y)
                self._y = y
            if y.ndim == 0 or y.shape[0] != n:
                raise InputError(
                    f"{self.name}: inputs have {n} samples but targets have shape {tuple(y.shape)}; "
                    "the first dimension of X and y must agree."
                )

    # ------------------------------------------------------------------ items of a dataset
    def _split_item(self, item: Any) -> tuple[Any, Any]:
        """A dataset item as (input, target-or-None)."""
        if isinstance(item, Mapping):
            x = {k: v for k, v in item.items() if k != self.target_key}
            return x, item.get(self.target_key)
        if isinstance(item, (tuple, list)):
            if len(item) == 1:
                return item[0], None
            if len(item) == 2:
                return item[0], item[1]
            raise InputError(
                f"dataset items must be x, (x, y) or a dict; got a {type(item).__name__} of length {len(item)}. "
                "Wrap your dataset so that __getitem__ returns (input, target) or a dict with the target under "
                f"{self.target_key!r}."
            )
        return item, None

    def __len__(self) -> int:
        if self._X is not None:
            return batch_size_of(self._X)
        return len(self._dataset)  # type: ignore[arg-type]

    @property
    def targets(self) -> Tensor | None:
        """All targets at once when the data are tensors (``None`` for datasets and unlabelled data)."""
        return self._y if self._X is not None else None

    @property
    def has_targets(self) -> bool:
        """Whether the data carries targets (checked on the first sample for datasets)."""
        if self._X is not None:
            return self._y is not None
        return self._split_item(self._dataset[0])[1] is not None  # type: ignore[index]

    def take(self, indices: Sequence[int] | Tensor) -> tuple[Inputs, Tensor | None]:
        """Inputs and targets of the given sample indices, in that order."""
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        if self._X is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x = map_tensors(lambda t: t[idx.to(t.device)], self._X)
            return x, (self._y[idx.to(self._y.device)] if self._y is not None else None)
        items = [self._split_item(self._dataset[i]) for i in indices]  # type: ignore[index]
        if items[0][1] is None:
            return self._collate([it[0] for it in items]), None
        if isinstance(items[0][0], Mapping):  # dict items: collate the inputs and the targets apart
            return self._collate([it[0] for it in items]), self._collate([it[1] for it in items])
        xs, ys = self._collate([(it[0], it[1]) for it in items])
        return xs, ys

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Consecutive batches ``[i, i + batch_size)`` of the samples ``start .. stop-1``."""
        stop = len(self) if stop is None else stop
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            if self._X is not None:
                yield Batch(i, map_tensors(lambda t: t[i:j], self._X), self._y[i:j] if self._y is not None else None)
            else:
                x, y = self.take(range(i, j))
                yield Batch(i, x, y)

    def num_batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> int:
        stop = len(self) if stop is None else stop
        return max(0, -(-(stop - start) // batch_size))

    def sample_shape(self) -> Any:
        """Shape of one input without the batch dimension (a structure of shapes for tuple or
        dict inputs)."""
        x, _ = self.take([0]) if self._X is None else (map_tensors(lambda t: t[:1], self._X), None)
        return sample_shapes(x)
