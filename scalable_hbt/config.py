"""The configuration the Toolbox takes, a job file is validated into and the demo builds.

:class:`CurvatureConfig` says which curvature is computed and how; each method's options are
its own settings dataclass (:mod:`scalable_hbt.methods`). Every value is checked when the
object is made, with an error naming the field and what it accepts, so a configuration that
exists is one that will run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from .curvature import CurvatureBackend, backend_names, check_backend_options, make_backend
from .data import DataLike
from .errors import InputError
from .validation import SettingError, check_bool, check_choice, check_integer, check_number
from .task import PRESETS
from .objective import Objective
from .operators import HVP_MODES, HVPMode

Damping = float | Literal["auto"]
CURVATURES = ("hessian", "ggn")
"""The curvature operators a Toolbox can apply."""


@dataclass(frozen=True)
class CurvatureConfig:
    """Which curvature, which backends, which damping.

    Attributes
    ----------
    damping:
        δ in C_δ = C + δI, a finite number ≥ 0, or ``"auto"``: δ = max(−λ_min, 0) + 0.01 (the
        paper's rule; λ_min from a backend that knows it, else from Lanczos on −C).
    inverse:
        Backend for C_δ⁻¹ (influence, similarity, RelatIF, RUE): a registered name or an instance.
    eigen:
        Backend for the top eigenpairs (LEES); ``None`` for a Toolbox that never computes LEES.
    curvature:
        The operator C: ``"hessian"`` (the exact Hessian) or ``"ggn"`` (the generalised
        Gauss–Newton matrix, positive semi-definite for losses convex in the outputs).
    rue_damping:
        δ' for RUE (a number > 0); default δ + 1.
    inverse_options, eigen_options:
        Keyword arguments of the backends' constructors (names checked against them).
    hvp_mode, max_vectors, cache_graphs:
        How the operator computes products (see :class:`~scalable_hbt.operators.HessianOperator`;
        the GGN operator uses reverse mode only and ignores ``hvp_mode``).
    """

    damping: Damping = "auto"
    inverse: str | CurvatureBackend = "cg"
    eigen: str | CurvatureBackend | None = "lanczos"
    curvature: str = "hessian"
    rue_damping: float | None = None
    inverse_options: Mapping[str, Any] = field(default_factory=dict)
    eigen_options: Mapping[str, Any] = field(default_factory=dict)
    hvp_mode: HVPMode = "reverse-over-reverse"
    max_vectors: int = 32
    cache_graphs: bool = False

    def __post_init__(self) -> None:
        if self.damping != "auto":
            check_number("damping", self.damping, note=" or 'auto'")
        for role in ("inverse", "eigen"):
            name, options = getattr(self, role), getattr(self, f"{role}_options")
            if options is None:
                object.__setattr__(self, f"{role}_options", {})
                options = {}
            if name is None and role == "eigen":
                if options:
                    raise InputError("eigen_options were given but eigen is None.")
                continue
            if not isinstance(options, Mapping):
                raise SettingError(f"{role}_options", options, "a table of keyword arguments")
            if isinstance(name, CurvatureBackend):
                if role not in name.roles:
                    raise SettingError(role, name.name, f"a backend that can serve as {role}: {backend_names(role)}")
                if options:
                    raise InputError(f"{role}_options apply to a backend given by name, not to an instance.")
                continue
            check_choice(role, name, backend_names(role))
            check_backend_options(name, dict(options), f"{role}_options")
            make_backend(name, role, dict(options))  # the constructor checks the option values
        check_choice("curvature", self.curvature, CURVATURES)
        check_number("rue_damping", self.rue_damping, strict=True, allow_none=True)
        check_choice("hvp_mode", self.hvp_mode, HVP_MODES)
        check_integer("max_vectors", self.max_vectors, 1)
        check_bool("cache_graphs", self.cache_graphs)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ObjectiveSettings:
    """How an :class:`~scalable_hbt.objective.Objective` is built from a model and training data
    (the ``[objective]`` table of a job file): loss name, weight decay wd ≥ 0, batch size,
    dtype ("float32" | "float64") and device ("cpu", "cuda", "cuda:1" …; CUDA must exist)."""

    loss: str = "cross_entropy"
    weight_decay: float = 0.0
    batch_size: int = 256
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, sorted(PRESETS))
        check_number("weight_decay", self.weight_decay)
        check_integer("batch_size", self.batch_size, 1)
        check_choice("dtype", self.dtype, sorted(DTYPES))
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise SettingError("device", self.device, "a torch device such as 'cpu', 'cuda' or 'cuda:1'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingError("device", self.device, f"a device that exists here: CUDA is not available "
                               f"(torch {torch.__version__}); use 'cpu'")

    def build(self, model: nn.Module, train: DataLike, *, device: str | torch.device | None = None,
              progress: bool = True) -> Objective:
        """The Objective of ``model`` on ``train`` with these settings (``device`` overrides)."""
        return Objective(model, self.loss, train, weight_decay=float(self.weight_decay), batch_size=self.batch_size,
                         dtype=DTYPES[self.dtype], device=device if device is not None else self.device,
                         progress=progress)
