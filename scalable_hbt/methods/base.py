"""What a method is, for the registry: its settings, how it runs on a fitted curvature, and
what it needs from the training data.

A method is a pure function of (objective, curvature backends, damping, test points,
settings). :class:`Method` wraps it for the :class:`~scalable_hbt.toolbox.Toolbox` and the
batch jobs: its ``settings`` dataclass validates the options (a job file is checked against
it before any work starts), ``run`` calls the function with what a :class:`FittedCurvature`
provides, ``prepare`` computes once what every chunk of test points reuses (RUE's parameter
shifts, RelatIF's normalizer), and ``test_local`` says whether, once prepared, a chunk needs
only its test points (no solve, no pass over the training data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from torch import Tensor

from ..curvature import CurvatureBackend
from ..data import DataLike
from ..errors import InputError
from ..objective import Labels, Objective, TestLoss
from ..validation import check_choice


class FittedCurvature(Protocol):
    """What methods may ask of a fitted toolbox."""

    objective: Objective
    inverse: CurvatureBackend
    eigen: CurvatureBackend | None

    @property
    def damping(self) -> float: ...

    @property
    def rue_damping(self) -> float: ...

    def inverse_backend(self, name: str | CurvatureBackend | None) -> CurvatureBackend: ...

    def training_inverse_norms(self, normalizer: str | CurvatureBackend | None) -> Tensor: ...

    def bootstrap_shifts(self, n_bootstrap: int, seed: int) -> Tensor: ...


@dataclass(frozen=True)
class TestSettings:
    """How test points are measured: ``labels`` "true" (the given targets) or "predicted"
    (argmax at θ̃); ``test_loss`` "objective" (loss + regulariser, the default) or "loss"."""

    __test__ = False  # not a pytest test class

    labels: Labels = "true"
    test_loss: TestLoss = "objective"

    def __post_init__(self) -> None:
        check_choice("labels", self.labels, ("true", "predicted"))
        check_choice("test_loss", self.test_loss, ("objective", "loss"))


MethodResult = tuple[Tensor, dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes
    ----------
    name:
        The registry key ("influence", "lees", …) used by the Toolbox and job files.
    settings:
        A frozen dataclass of the method's options, validated in ``__post_init__``.
    run:
        ``run(fitted, X, y, settings) -> (result, info)``; result ``(T, n)`` or ``(T,)``.
    per_training_point:
        Whether the result has one column per training point (``(T, n)``) or one value per
        test point (``(T,)``).
    needs:
        Which backends ``run`` uses ("inverse", "eigen").
    prepare:
        ``prepare(fitted, settings)``: compute once what every chunk of test points reuses.
    test_local:
        ``test_local(settings)``: once prepared, a chunk needs only its test points.
    domain:
        "test" (a result per test point; ``run`` gets the test points) or "train" (one result
        over the training data, such as self-influence; ``run`` gets no test points).
    """

    name: str
    settings: type
    run: Callable[[FittedCurvature, DataLike, Tensor | None, Any], MethodResult]
    per_training_point: bool
    needs: frozenset[str]
    prepare: Callable[[FittedCurvature, Any], None] = lambda fitted, settings: None
    test_local: Callable[[Any], bool] = lambda settings: False
    domain: str = "test"

    def make_settings(self, options: dict[str, Any] | None = None, where: str | None = None) -> Any:
        """The settings dataclass from ``options``; an unknown key is named with the known ones
        (a bad value raises the settings' own :class:`~scalable_hbt.validation.SettingError`)."""
        options = dict(options or {})
        known = [f.name for f in fields(self.settings)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(f"{where or self.name}: unknown option(s) {unknown}; known: {known}.")
        return self.settings(**options)
