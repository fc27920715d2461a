"""The curvature cache (docs/design.md §2, layer 5: the curvature is computed once and cached to disk,
keyed by a fingerprint of model, data and settings): fingerprinting and storage."""

from __future__ import annotations

from .. import distributed
from ..curvature import CurvatureBackend
from ..operators import CurvatureOperator
from .fingerprint import (UncacheableError, backend_parts, data_digest, digest, fingerprint, fingerprint_parts, library_versions,
                          objective_parts)
from .storage import CacheWarning, CurvatureCache


def cacheable(backend: CurvatureBackend) -> bool:
    """Whether every setting ``backend.fit`` reads can be fingerprinted (a preconditioner given
    as a plain function cannot)."""
    try:
        backend_parts(backend)
    except UncacheableError:
        return False
    return True


def fit_or_load(backend: CurvatureBackend, operator: CurvatureOperator, cache: CurvatureCache | None) -> bool:
    """Fit ``backend`` on ``operator`` through ``cache``: load the entry keyed by the objective,
    the operator's settings and what the backend's ``fit`` reads, or fit and save it. Backends
    whose settings cannot be fingerprinted are simply fitted. Returns ``True`` when loaded."""
    if cache is None or not cacheable(backend):
        backend.fit(operator)
        return False
    parts = fingerprint_parts(operator.objective, backend, operator.settings())
    key = digest(parts)
    if cache.load(key, backend, operator):
        return True
    backend.fit(operator)
    if distributed.is_writer():  # every rank holds the same fit; one writes it
        cache.save(key, backend, parts)
    return False


__all__ = ["CurvatureCache", "CacheWarning", "UncacheableError", "fingerprint", "fingerprint_parts", "digest",
           "objective_parts", "data_digest", "library_versions", "cacheable", "fit_or_load"]
