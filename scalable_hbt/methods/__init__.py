"""The methods of the toolbox, each written once against the curvature interface, and the
registry that names them. A new method is one module defining a :class:`Method` and one line
in :data:`METHODS`; the Toolbox (``Toolbox.compute``) and job files find it there."""

from .base import FittedCurvature, Method, TestSettings
from .influence import INFLUENCE, SIMILARITY, InfluenceSettings, influence, similarity
from .lees import LEES, LEESSettings, extrapolation_score, m_converged, m_from_threshold, scores_for_all_m
from .relatif import RELATIF, RelatIFSettings, inverse_gradient_norms, relatif
from .rue import RUE, RUESettings, bootstrap_shifts, bootstrap_weights, rue
from .self_influence import SELF_INFLUENCE, SelfInfluenceSettings, self_influence
from .topk import TOP_K, TopKSettings, top_k

METHODS: dict[str, Method] = {method.name: method for method in (INFLUENCE, SIMILARITY, RELATIF, RUE, LEES,
                                                                 SELF_INFLUENCE, TOP_K)}

__all__ = ["METHODS", "Method", "FittedCurvature", "TestSettings", "InfluenceSettings", "RelatIFSettings",
           "RUESettings", "LEESSettings", "influence", "similarity", "relatif", "inverse_gradient_norms", "rue",
           "bootstrap_weights", "bootstrap_shifts", "extrapolation_score", "m_converged", "m_from_threshold",
           "scores_for_all_m", "SelfInfluenceSettings", "self_influence", "TopKSettings", "top_k"]
