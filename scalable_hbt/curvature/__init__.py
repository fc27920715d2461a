"""Curvature backends (DESIGN §2, layer 3) and the registry that names them."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .base import CurvatureBackend, UnsupportedOperation
from .dense import DenseCurvature

INVERSE_BACKENDS: dict[str, type[CurvatureBackend]] = {"dense": DenseCurvature}
EIGEN_BACKENDS: dict[str, type[CurvatureBackend]] = {"dense": DenseCurvature}


def make_backend(name: str | CurvatureBackend, role: str, options: dict[str, Any] | None = None) -> CurvatureBackend:
    """Instantiate the backend called ``name`` for ``role`` ("inverse" or "eigen")."""
    if isinstance(name, CurvatureBackend):
        return name
    registry = INVERSE_BACKENDS if role == "inverse" else EIGEN_BACKENDS
    if name not in registry:
        raise InputError(f"unknown {role} backend {name!r}; available: {sorted(registry)}.")
    return registry[name](**(options or {}))


__all__ = ["CurvatureBackend", "DenseCurvature", "UnsupportedOperation", "INVERSE_BACKENDS",
           "EIGEN_BACKENDS", "make_backend"]
