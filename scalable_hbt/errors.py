"""Exceptions and warnings raised by scalable_hbt.

Every error names what is wrong and what to do about it; these classes let callers
catch the families separately while remaining ordinary ``ValueError``/``MemoryError``
subclasses for everyone else.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: non-finite values, wrong shapes or dtypes, unknown options."""


class IndefiniteDampingError(ValueError):
    """The damped Hessian ``H + δI`` is not positive definite.

    Attributes
    ----------
    min_eigenvalue:
        The most negative eigenvalue of H (or the negative curvature that was found).
    damping:
        The damping δ that was tried.
    suggested_damping:
        A damping that makes ``H + δI`` positive definite: ``|λ_min| + 0.01``.
    """

    def __init__(self, min_eigenvalue: float, damping: float, where: str = "") -> None:
        self.min_eigenvalue = float(min_eigenvalue)
        self.damping = float(damping)
        self.suggested_damping = abs(self.min_eigenvalue) + 0.01
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}H + δI is not positive definite: the most negative eigenvalue of H is "
            f"λ_min = {self.min_eigenvalue:.6g}, so with damping δ = {self.damping:.6g} the "
            f"smallest eigenvalue of H + δI is {self.min_eigenvalue + self.damping:.6g} ≤ 0. "
            f"Use damping ≥ {self.suggested_damping:.4g} (|λ_min| + 0.01, the paper's rule) "
            f"or damping='auto'."
        )


class DenseTooLargeError(MemoryError):
    """The explicit M×M Hessian would not fit in memory."""


class SolverDivergenceError(RuntimeError):
    """An iterative solver diverged or met a condition it cannot handle."""


class TrainModeWarning(UserWarning):
    """A model with dropout or batch-norm was handed over in train mode."""
