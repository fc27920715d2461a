"""Self-influence: how much each training point supports its own fit (influence with t = r),

.. math::

    I(z_i, z_i) = \\tfrac1n\\, g_i^T C_δ^{-1} g_i \\quad (≥ 0 \\text{ for } C_δ \\text{ positive definite}),

for every training point, in one pass of per-sample gradients. Points the model can only fit
by bending around them — mislabelled or outlying points — have large self-influence. With the
dense, K-FAC or EK-FAC backend the quadratic form costs no solve (``inverse_quadratic`` in the
eigenbasis); with CG or LiSSA it costs one solve per training point.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..curvature import CurvatureBackend, backend_names
from ..data import DataLike
from ..objective import Objective
from ..validation import SettingError
from .base import FittedCurvature, Method, MethodResult


def self_influence(objective: Objective, backend: CurvatureBackend, damping: float) -> Tensor:
    """I(z_i, z_i) = (1/n) g_iᵀ C_δ⁻¹ g_i for every training point, shape ``(n,)``."""
    rows = objective.training_rows(lambda G: backend.inverse_quadratic(G, damping).unsqueeze(1), 1,
                                   desc="self-influence", collective=backend.collective_solve)
    return rows[:, 0] / objective.n


@dataclass(frozen=True)
class SelfInfluenceSettings:
    """``backend``: the inverse backend of the quadratic form (default: the Toolbox's inverse;
    "kfac"/"ekfac" make it one cheap pass)."""

    backend: str | CurvatureBackend | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backend, CurvatureBackend) or self.backend is None:
            return
        if self.backend not in backend_names("inverse"):
            raise SettingError("backend", self.backend, f"None or one of {backend_names('inverse')}")


def _run(fitted: FittedCurvature, X: DataLike | None, y: Tensor | None, s: SelfInfluenceSettings) -> MethodResult:
    backend = fitted.inverse_backend(s.backend)
    return self_influence(fitted.objective, backend, fitted.damping), {"backend": backend.name}


SELF_INFLUENCE = Method("self_influence", SelfInfluenceSettings, _run, per_training_point=False,
                        needs=frozenset({"inverse"}), domain="train")
