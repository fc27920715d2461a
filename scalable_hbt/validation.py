"""Checks of user settings with one message format: ``name = value: expected what.``

Every dataclass of settings and every backend constructor validates with these, so a job file
and a library call report a bad value the same way (a job prefixes the table, ``[curvature]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import InputError


class SettingError(InputError):
    """A setting has a value it cannot take; ``name``, ``value`` and ``expected`` say which."""

    def __init__(self, name: str, value: Any, expected: str, where: str = "") -> None:
        self.name, self.value, self.expected = name, value, expected
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{name} = {value!r}: expected {expected}.")


def check_choice(name: str, value: Any, allowed: Iterable[str], where: str = "") -> None:
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise SettingError(name, value, f"one of {allowed}", where)


def check_integer(name: str, value: Any, low: int | None = None, high: int | None = None, *,
                  allow_none: bool = False, note: str = "", where: str = "") -> None:
    """An int (not a bool) in [low, high]; ``None`` too when ``allow_none``."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bound = "" if low is None and high is None else (
            f" ≥ {low}" if high is None else f" ≤ {high}" if low is None else f" in [{low}, {high}]")
        raise SettingError(name, value, f"an integer{bound}{' or None' if allow_none else ''}{note}", where)


def check_number(name: str, value: Any, *, low: float | None = 0.0, high: float | None = None,
                 strict: bool = False, allow_none: bool = False, note: str = "", where: str = "") -> None:
    """A finite real number (not a bool) ≥ low (> low when ``strict``) and < high; ``None`` too
    when ``allow_none``."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None and (value <= low if strict else value < low):
        ok = False
    if ok and high is not None and value >= high:
        ok = False
    if not ok:
        if low is not None and high is not None:
            bound = f" in ({low:g}, {high:g})" if strict else f" in [{low:g}, {high:g})"
        elif low is not None:
            bound = f" {'>' if strict else '≥'} {low:g}"
        else:
            bound = ""
        raise SettingError(name, value, f"a number{bound} (finite){' or None' if allow_none else ''}{note}", where)


def check_bool(name: str, value: Any, where: str = "") -> None:
    if not isinstance(value, bool):
        raise SettingError(name, value, "true or false", where)
