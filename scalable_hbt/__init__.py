"""scalable_hbt — a scalable, matrix-free Hessian engine for the Hessian-based toolbox.

Influence functions, RelatIF, Resampling Uncertainty Estimation and the Local-Ensembles
extrapolation score from one curvature computation, with an exact dense oracle for
small models. See DESIGN.md for the mathematics every backend meets.
"""

from .curvature import CurvatureBackend, DenseCurvature
from .errors import (DenseTooLargeError, IndefiniteDampingError, InputError, SolverDivergenceError,
                     TrainModeWarning)
from .hessian import HessianOperator
from .objective import Objective
from .toolbox import Toolbox

__version__ = "0.1.0"

__all__ = ["Objective", "Toolbox", "HessianOperator", "CurvatureBackend", "DenseCurvature", "InputError",
           "IndefiniteDampingError", "DenseTooLargeError", "SolverDivergenceError", "TrainModeWarning",
           "__version__"]
