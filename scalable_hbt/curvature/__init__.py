"""Curvature backends (docs/design.md §2, layer 3) and the registry that names them.

A new backend is one module with a :class:`CurvatureBackend` subclass and one line in
:data:`BACKENDS`; its ``roles`` say whether it serves as ``inverse``, ``eigen`` or both.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import InputError
from .base import CurvatureBackend, State, UnsupportedOperation
from .cg import CGCurvature
from .dense import DenseCurvature
from .kfac import EKFACCurvature, KFACCurvature, KFACFallbackWarning, KFACTiedWeightWarning
from .lanczos import LanczosCurvature, lanczos_top, smallest_eigenvalue
from .lissa import LiSSACurvature
from .lowrank import LowRankCurvature

BACKENDS: dict[str, type[CurvatureBackend]] = {
    "dense": DenseCurvature,
    "cg": CGCurvature,
    "lissa": LiSSACurvature,
    "kfac": KFACCurvature,
    "ekfac": EKFACCurvature,
    "lanczos": LanczosCurvature,
    "lowrank": LowRankCurvature,
}

ROLES = ("inverse", "eigen")


def backend_names(role: str) -> list[str]:
    """The registered backends that can serve as ``role`` ("inverse" or "eigen")."""
    return [name for name, cls in BACKENDS.items() if role in cls.roles]


def check_backend_options(name: str, options: dict[str, Any] | None, what: str) -> None:
    """Raise :class:`InputError` when ``options`` name a keyword the constructor of backend
    ``name`` does not take (a typo would otherwise fail only when the backend is built)."""
    if not options:
        return
    params = inspect.signature(BACKENDS[name].__init__).parameters
    accepted = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                          inspect.Parameter.VAR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"{what}: the {name!r} backend takes no option(s) {unknown}; it takes {sorted(accepted)}.")


def make_backend(name: str | CurvatureBackend, role: str, options: dict[str, Any] | None = None) -> CurvatureBackend:
    """The backend called ``name`` for ``role`` ("inverse" or "eigen"), built with ``options``;
    an instance is returned as it is (after checking that it can serve ``role``)."""
    if isinstance(name, CurvatureBackend):
        if role not in name.roles:
            raise InputError(f"the {name.name!r} backend cannot serve as {role}; {role} backends: {backend_names(role)}.")
        return name
    if name not in BACKENDS or role not in BACKENDS[name].roles:
        raise InputError(f"unknown {role} backend {name!r}; available: {backend_names(role)}.")
    check_backend_options(name, options, f"{role}_options")
    return BACKENDS[name](**(options or {}))


__all__ = ["CurvatureBackend", "State", "UnsupportedOperation", "BACKENDS", "ROLES", "backend_names",
           "check_backend_options", "make_backend", "DenseCurvature", "CGCurvature", "LiSSACurvature",
           "KFACCurvature", "EKFACCurvature", "KFACFallbackWarning", "KFACTiedWeightWarning", "LanczosCurvature",
           "LowRankCurvature", "lanczos_top", "smallest_eigenvalue"]
