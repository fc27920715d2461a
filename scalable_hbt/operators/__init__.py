"""Curvature operators (docs/design.md §2, layer 2): matrix-free C = (1/n) Σ_i C_i + wd·I — the Hessian or
the generalised Gauss–Newton matrix — and views of it."""

from .base import CurvatureOperator
from .ggn import GGNOperator
from .hessian import HVP_MODES, HessianOperator, HVPMode
from .views import LinearOperator, MiniBatch, Projected, Scaled, Shifted, project_out

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "HVPMode", "HVP_MODES", "LinearOperator", "MiniBatch",
           "Projected", "Scaled", "Shifted", "project_out"]
