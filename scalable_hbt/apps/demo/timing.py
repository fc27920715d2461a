"""Wall-clock timings of the demo's stages, reported through the library logger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ...log import logger


@contextmanager
def timed(timings: dict[str, float], key: str, log: bool = False) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``; ``log``: report them at INFO level
    on the ``scalable_hbt`` logger (``hbt demo`` shows them unless ``--no-progress``)."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    timings[key] = timings.get(key, 0.0) + seconds
    if log:
        logger.info("%s: %.1f s", key, seconds)
