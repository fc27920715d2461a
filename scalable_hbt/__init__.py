"""scalable_hbt — a scalable, matrix-free Hessian engine for the Hessian-based toolbox.

Influence functions, RelatIF, Resampling Uncertainty Estimation and the Local-Ensembles
extrapolation score from one curvature computation, with an exact dense oracle for
small models. ``docs/design.md`` states the mathematics every backend meets.
"""

__version__ = "0.2.0"

from .config import CurvatureConfig  # noqa: E402
from .curvature import CurvatureBackend, DenseCurvature  # noqa: E402
from .errors import (DenseTooLargeError, IndefiniteDampingError, InputError, SolverDivergenceError,  # noqa: E402
                     TrainModeWarning)
from .objective import Objective  # noqa: E402
from .operators import CurvatureOperator, HessianOperator  # noqa: E402
from .toolbox import Toolbox  # noqa: E402

__all__ = ["Objective", "Toolbox", "CurvatureConfig", "CurvatureOperator", "HessianOperator", "CurvatureBackend",
           "DenseCurvature", "InputError", "IndefiniteDampingError", "DenseTooLargeError", "SolverDivergenceError",
           "TrainModeWarning", "__version__"]
