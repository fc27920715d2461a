"""Progress bars that can be silenced (tqdm)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
                 enabled: bool = True) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar unless disabled; the bar vanishes when done."""
    return iter(tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True))
