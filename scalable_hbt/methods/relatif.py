"""RelatIF (Barshan et al. 2020; docs/design.md §1): influence relative to how strongly a training
point can move the parameters at all,

.. math::

    I_R(z_r, z_t) = I(z_r, z_t) \\,/\\, \\|C_δ^{-1} g_r\\| .

The normalizer ‖C_δ⁻¹ g_r‖ of every training point does not depend on the test points: it is
computed once (one pass of per-sample gradients through the normalizer backend's
``inverse_norms``; cheap with K-FAC/EK-FAC, n solves with CG) and reused for every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..curvature import CurvatureBackend, backend_names
from ..data import DataLike
from ..validation import SettingError
from ..objective import Labels, Objective, TestLoss
from .base import FittedCurvature, Method, MethodResult, TestSettings
from .influence import gradient_dots, solved_test_gradients


def inverse_gradient_norms(objective: Objective, normalizer: CurvatureBackend, damping: float) -> Tensor:
    """The RelatIF normalizer ‖C_δ⁻¹ g_r‖ for every training point, shape ``(n,)``."""
    rows = objective.training_rows(lambda G: normalizer.inverse_norms(G, damping).unsqueeze(1), 1,
                                   desc="RelatIF normalizer", collective=normalizer.collective_solve)
    return rows[:, 0]


def relatif(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
            y_test: Tensor | None = None, *, normalizer: CurvatureBackend | None = None,
            norms: Tensor | None = None, labels: Labels = "true", test_loss: TestLoss = "objective") -> Tensor:
    """I_R(z_r, z_t) = I(z_r, z_t) / ‖C_δ⁻¹ g_r‖, shape ``(T, n)``.

    The numerator uses ``inverse``; the normalizer uses ``normalizer`` (default: the same
    backend), unless its values ``norms (n,)`` are given."""
    if norms is None:
        norms = inverse_gradient_norms(objective, normalizer or inverse, damping)
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    return gradient_dots(objective, S, "RelatIF") / objective.n / norms


@dataclass(frozen=True)
class RelatIFSettings(TestSettings):
    """``normalizer``: the backend of ‖C_δ⁻¹ g_r‖ (default: the Toolbox's inverse backend)."""

    normalizer: str | CurvatureBackend | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.normalizer, CurvatureBackend):
            return
        if self.normalizer is not None and self.normalizer not in backend_names("inverse"):
            raise SettingError("normalizer", self.normalizer, f"None or one of {backend_names('inverse')}")


def _run(fitted: FittedCurvature, X: DataLike, y: Tensor | None, s: RelatIFSettings) -> MethodResult:
    norms = fitted.training_inverse_norms(s.normalizer)
    return relatif(fitted.objective, fitted.inverse, fitted.damping, X, y, norms=norms, labels=s.labels,
                   test_loss=s.test_loss), {"normalizer": fitted.inverse_backend(s.normalizer).name}


def _prepare(fitted: FittedCurvature, s: RelatIFSettings) -> None:
    fitted.training_inverse_norms(s.normalizer)


RELATIF = Method("relatif", RelatIFSettings, _run, per_training_point=True, needs=frozenset({"inverse"}),
                 prepare=_prepare)
