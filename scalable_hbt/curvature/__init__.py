"""Curvature backends (DESIGN §2, layer 3) and the registry that names them."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .base import CurvatureBackend, UnsupportedOperation
from .cg import CGCurvature
from .dense import DenseCurvature
from .kfac import EKFACCurvature, KFACCurvature, KFACFallbackWarning
from .lanczos import LanczosCurvature, LowRankCurvature, lanczos_top
from .lissa import LiSSACurvature

INVERSE_BACKENDS: dict[str, type[CurvatureBackend]] = {
    "dense": DenseCurvature, "cg": CGCurvature, "lissa": LiSSACurvature, "kfac": KFACCurvature,
    "ekfac": EKFACCurvature, "lowrank": LowRankCurvature}
EIGEN_BACKENDS: dict[str, type[CurvatureBackend]] = {
    "dense": DenseCurvature, "lanczos": LanczosCurvature, "lowrank": LowRankCurvature}


def make_backend(name: str | CurvatureBackend, role: str, options: dict[str, Any] | None = None) -> CurvatureBackend:
    """Instantiate the backend called ``name`` for ``role`` ("inverse" or "eigen")."""
    if isinstance(name, CurvatureBackend):
        return name
    registry = INVERSE_BACKENDS if role == "inverse" else EIGEN_BACKENDS
    if name not in registry:
        raise InputError(f"unknown {role} backend {name!r}; available: {sorted(registry)}.")
    return registry[name](**(options or {}))


__all__ = ["CurvatureBackend", "DenseCurvature", "CGCurvature", "LiSSACurvature", "KFACCurvature", "EKFACCurvature",
           "KFACFallbackWarning", "LanczosCurvature", "LowRankCurvature", "lanczos_top", "UnsupportedOperation", "INVERSE_BACKENDS",
           "EIGEN_BACKENDS", "make_backend"]
