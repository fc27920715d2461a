"""The four methods of the toolbox, each written once against the curvature interface."""

from .extrapolation import extrapolation_score, m_converged, m_from_threshold, scores_for_all_m
from .influence import influence, inverse_gradient_norms, relatif, similarity
from .rue import bootstrap_shifts, bootstrap_weights, rue

__all__ = ["influence", "similarity", "relatif", "inverse_gradient_norms", "rue", "bootstrap_weights",
           "bootstrap_shifts", "extrapolation_score", "m_converged", "m_from_threshold", "scores_for_all_m"]
