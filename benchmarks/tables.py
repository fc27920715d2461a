"""Markdown table cells and tables shared by the benchmark reports."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, digits: int = 3, booleans: tuple[str, str] = ("yes", "no")) -> str:
    """A number for a table: 3 significant digits, '—' for missing or NaN, a boolean as one of ``booleans``."""
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    if isinstance(x, bool):
        return booleans[0] if x else booleans[1]
    if isinstance(x, int):
        return f"{x:,}"
    if not isinstance(x, float):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}" if abs(x) < 100 else f"{x:.0f}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return out + [""]
