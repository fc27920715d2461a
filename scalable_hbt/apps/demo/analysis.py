"""The physics questions the paper asks of the methods' outputs: which points stand off a
curve, which permuted points stand above their neighbours, where RUE marks the uncertain region."""

from __future__ import annotations

from typing import Any

import numpy as np

RUE_THRESHOLD = 5e-5
"""The paper's RUE threshold for the width of the uncertain region (section III D)."""


def stand_out(v1: np.ndarray, values: np.ndarray, marked: np.ndarray, neighbours: int = 4) -> np.ndarray:
    """How far each point lies off the smooth curve of the unmarked points: |value − median of
    the ``neighbours`` nearest (in V1) unmarked points|, excluding the point itself."""
    v1, values, marked = np.asarray(v1, float), np.asarray(values, float), np.asarray(marked, bool)
    ref_v1, ref_values = v1[~marked], values[~marked]
    out = np.empty(len(v1))
    for i in range(len(v1)):
        dist = np.abs(ref_v1 - v1[i])
        dist[(ref_v1 == v1[i]) & (ref_values == values[i])] = np.inf
        out[i] = abs(values[i] - np.median(ref_values[np.argsort(dist)[:neighbours]]))
    return out


def above_neighbours(values: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """For every marked point (in order), whether its value exceeds those of its nearest
    unmarked neighbours on either side in the array order (one neighbour at either end): the
    paper's test of LEES on permuted points against their in-distribution neighbours."""
    values, marked = np.asarray(values, float), np.asarray(marked, bool)
    unmarked = np.flatnonzero(~marked)
    out = []
    for i in np.flatnonzero(marked):
        left, right = unmarked[unmarked < i], unmarked[unmarked > i]
        neighbours = ([values[left[-1]]] if left.size else []) + ([values[right[0]]] if right.size else [])
        out.append(all(values[i] > v for v in neighbours))
    return np.array(out, dtype=bool)


def uncertain_region(v1: np.ndarray, rue: np.ndarray) -> dict[str, Any]:
    """Where RUE exceeds the paper's threshold ``RUE_THRESHOLD`` and 5 % of its maximum: per
    rule the threshold, the V1 range [min, max] of the points above it (None if none) and its
    width max − min (0 if none)."""
    v1, rue = np.asarray(v1), np.asarray(rue)
    out: dict[str, Any] = {}
    for name, threshold in (("paper_5e-5", RUE_THRESHOLD), ("relative_5pct", 0.05 * rue.max())):
        above = v1[rue > threshold]
        out[name] = {"threshold": float(threshold),
                     "v1_range": [float(above.min()), float(above.max())] if above.size else None,
                     "width": float(np.ptp(above)) if above.size else 0.0}
    return out
