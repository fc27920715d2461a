"""Curvature operators (docs/design.md §2, layer 2): matrix-free C = (1/n) Σ_i C_i + wd·I and views of it."""

from .base import CurvatureOperator
from .hessian import HVP_MODES, HessianOperator, HVPMode
from .views import LinearOperator, MiniBatch, Projected, Scaled, Shifted, project_out

__all__ = ["CurvatureOperator", "HessianOperator", "HVPMode", "HVP_MODES", "LinearOperator", "MiniBatch",
           "Projected", "Scaled", "Shifted", "project_out"]
