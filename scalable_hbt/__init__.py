"""scalable_hbt — a scalable, matrix-free Hessian engine for the Hessian-based toolbox.

Influence functions, RelatIF, Resampling Uncertainty Estimation and the Local-Ensembles
extrapolation score from one curvature computation, with an exact dense oracle for
small models. ``docs/design.md`` states the mathematics every backend meets.
"""

from .config import CurvatureConfig
from .curvature import CurvatureBackend, DenseCurvature
from .errors import DenseTooLargeError, IndefiniteDampingError, InputError, SolverDivergenceError, TrainModeWarning
from .objective import Objective
from .operators import CurvatureOperator, HessianOperator
from .toolbox import Toolbox
from .version import __version__

__all__ = ["Objective", "Toolbox", "CurvatureConfig", "CurvatureOperator", "HessianOperator", "CurvatureBackend",
           "DenseCurvature", "InputError", "IndefiniteDampingError", "DenseTooLargeError", "SolverDivergenceError",
           "TrainModeWarning", "__version__"]
