"""Exceptions and warnings raised by scalable_hbt.

Every error names what is wrong and what to do about it; these classes let callers
catch the families separately while remaining ordinary ``ValueError``/``MemoryError``
subclasses for everyone else. One failure, one class: a damping that leaves C + δI
indefinite is an :class:`IndefiniteDampingError` whichever backend finds it.
"""

from __future__ import annotations

from typing import Literal

DAMPING_MARGIN = 0.01
"""The paper's rule δ = |λ_min| + 0.01: the margin added to −λ_min by ``damping="auto"``."""

Evidence = Literal["exact", "estimate", "bound"]


class InputError(ValueError):
    """Bad user input: non-finite values, wrong shapes or dtypes, unknown options."""


class IndefiniteDampingError(ValueError):
    """The damped curvature ``C + δI`` is not positive definite.

    Attributes
    ----------
    min_eigenvalue:
        The most negative eigenvalue of C (``evidence="exact"``), a Ritz estimate of it
        (``"estimate"``), or an upper bound on it (``"bound"``: the Rayleigh quotient of a
        direction of negative curvature that a solver met; the true λ_min is at most this).
    damping:
        The damping δ that was tried.
    suggested_damping:
        |min_eigenvalue| + 0.01, the paper's rule — safe when the value is exact; when it is
        only a bound, ``damping="auto"`` (which computes λ_min) is the safe choice.
    """

    def __init__(self, min_eigenvalue: float, damping: float, where: str = "", evidence: Evidence = "exact") -> None:
        self.min_eigenvalue = float(min_eigenvalue)
        self.damping = float(damping)
        self.evidence = evidence
        self.suggested_damping = abs(self.min_eigenvalue) + DAMPING_MARGIN
        prefix = f"{where}: " if where else ""
        if evidence == "bound":
            message = (
                f"{prefix}C + δI is not positive definite: a direction p with pᵀ(C + δI)p ≤ 0 was met; its "
                f"Rayleigh quotient pᵀCp/pᵀp = {self.min_eigenvalue:.6g} is an upper bound on λ_min(C), so with "
                f"damping δ = {self.damping:.6g} some eigenvalue of C + δI is ≤ {self.min_eigenvalue + self.damping:.6g}. "
                f"The true λ_min may be more negative: use damping='auto' (it computes λ_min and applies "
                f"δ = |λ_min| + {DAMPING_MARGIN}), or a damping well above {self.suggested_damping:.4g}."
            )
        else:
            what = "the most negative eigenvalue of C is" if evidence == "exact" else \
                "a Ritz estimate of the most negative eigenvalue of C is"
            message = (
                f"{prefix}C + δI is not positive definite: {what} λ_min = {self.min_eigenvalue:.6g}, so with "
                f"damping δ = {self.damping:.6g} the smallest eigenvalue of C + δI is "
                f"{'≈ ' if evidence == 'estimate' else ''}{self.min_eigenvalue + self.damping:.6g} ≤ 0. "
                f"Use damping ≥ {self.suggested_damping:.4g} (|λ_min| + {DAMPING_MARGIN}, the paper's rule) "
                f"or damping='auto'."
            )
        super().__init__(message)


class DenseTooLargeError(MemoryError):
    """The explicit M×M curvature matrix would not fit in memory."""


class SolverDivergenceError(RuntimeError):
    """An iterative solver diverged or its answer is known to be wrong (the message names the cause)."""


class TrainModeWarning(UserWarning):
    """A model with dropout or batch-norm was handed over in train mode."""
