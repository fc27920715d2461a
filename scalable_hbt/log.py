"""Diagnostics and progress: the ``scalable_hbt`` logger and tqdm bars that can be silenced.

Everything the library reports goes through :data:`logger` (``logging.getLogger("scalable_hbt")``):
solver diagnostics at ``INFO``, one-time notices at ``WARNING`` (problems that change a result
are ``warnings.warn`` instead, so that they can be turned into errors). Progress bars are
tqdm bars, hidden when a caller passes ``enabled=False`` or the environment sets
``TQDM_DISABLE`` to a true value (tqdm's own convention).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("scalable_hbt")
logger.addHandler(logging.NullHandler())


def progress_disabled_by_environment() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no progress bars (any value but "", "0", "false", "no")."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
                 enabled: bool = True) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar unless disabled; the bar vanishes when done."""
    disable = not enabled or progress_disabled_by_environment()
    return iter(tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True))
