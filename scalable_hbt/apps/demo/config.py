"""What ``hbt demo`` runs: :class:`DemoConfig`, the one place of every default of the demo.

Each field that ``hbt demo`` exposes carries its command-line help in its metadata
(:func:`option`); ``scalable_hbt.apps.cli`` builds the ``hbt demo`` parser from the fields,
so a default and its help text exist once. The parser is built on every ``hbt`` call, so
this module imports no more than the standard library at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ...physics import TrainingRecipe

FIGURES: tuple[str, ...] = ("fig3", "fig4", "fig5", "fig6")
"""Every figure the demo can draw."""

QUICK_FIGURES: tuple[str, ...] = ("fig3", "fig5", "fig6")
"""Figures drawn in ``--quick`` mode unless asked otherwise (Fig. 4 trains two more models)."""

Regime = Literal["stopped", "tight"]
REGIMES: tuple[str, ...] = ("stopped", "tight")
"""Training regimes (the help of ``DemoConfig.regime`` says what each means)."""

Network = Literal["paper", "gap", "sign"]

POINTS_PER_PHASE = 500
"""Training points per phase of the main model (the paper's)."""

QUICK_POINTS_PER_PHASE = 100
"""Training points per phase of the main model in quick mode."""

SIDE_POINTS_PER_PHASE = 100
"""At most this many training points per phase for the extra models (Fig. 4 sign sets, Fig. 6
size comparison), which keeps the full demo within its time budget."""

SIGN_LR = 1e-3
"""Adam learning rate (+ L-BFGS) for the sign-flipped training sets of Fig. 4: at 1e-2 the paper
CNN collapses to a constant output on them (objective ln 2, all ReLUs dead); 1e-3 trains."""

MIN_SIZE_POINTS = 2
"""The fewest training points per phase of the size comparison."""


def parse_figures(text: str) -> tuple[str, ...]:
    """``"all"``, ``"none"`` or a comma-separated subset of ``fig3,fig4,fig5,fig6``."""
    text = text.strip().lower()
    if text == "all":
        return FIGURES
    if text in ("none", ""):
        return ()
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}, 'all' or 'none'.")
    return names


def parse_size_points(text: str | int) -> int:
    """An integer ≥ ``MIN_SIZE_POINTS`` (training points per phase of the size comparison)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer ≥ {MIN_SIZE_POINTS}, got {text!r}") from None
    if value < MIN_SIZE_POINTS:
        raise ValueError(f"expected an integer ≥ {MIN_SIZE_POINTS}, got {value}")
    return value


def option(default: Any, help: str, *, flag: str | None = None, dest: str | None = None,
           parse: Callable[[str], Any] | None = None, **argparse_settings: Any) -> Any:
    """A ``DemoConfig`` field shown on the ``hbt demo`` command line.

    ``help`` is the option's help text (for a field that is True by default, the help of
    its ``--no-...`` flag); ``flag`` and ``dest`` override the flag ``--field-name`` and the
    argparse destination; ``parse`` turns the option's text into the value (a ValueError
    is a usage error); ``argparse_settings`` go to ``add_argument`` as they are.
    """
    cli = {"help": help, "flag": flag, "dest": dest, "parse": parse, "settings": argparse_settings}
    return field(default=default, metadata={"cli": cli})


@dataclass
class DemoConfig:
    """What ``hbt demo`` runs; each field's meaning is its help text below (``hbt demo --help``).

    ``n_per_phase`` and ``epochs`` (not on the command line) override the training sizes,
    for tiny runs in the tests.
    """

    out: Path = option(Path("hbt_demo_output"), "output folder for report.json and the PNG figures",
                       metavar="DIR")
    quick: bool = option(False, f"smaller training grid ({QUICK_POINTS_PER_PHASE} points per phase instead of "
                                f"{POINTS_PER_PHASE}; Fig. 4 only on request)")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    seed: int = option(0, "seed for training, the sign and OOD choices, LiSSA, Lanczos and the RUE bootstrap",
                       parse=int)
    progress: bool = option(True, "hide progress bars and timings")
    figures: tuple[str, ...] | None = option(
        None, f"figures to draw: comma-separated {','.join(FIGURES)}, or 'all' or 'none' "
              f"(default: all; --quick: {','.join(QUICK_FIGURES)})", parse=parse_figures, metavar="LIST")
    n_per_phase: int | None = None
    epochs: int | None = None
    size_comparison: bool = option(False, "Fig. 6: also train the size-invariant CNN on 12 and 14 sites "
                                          "(several extra minutes)")
    size_points_per_phase: int | None = option(
        None, f"training points per phase of the size comparison (default: {SIDE_POINTS_PER_PHASE}; the paper's "
              f"{POINTS_PER_PHASE} take much longer, most of it the L = 14 RUE)",
        flag="--size-points", dest="size_points", parse=parse_size_points, metavar="N")
    regime: Regime = option("stopped", "training regime: 'stopped' (the paper's: SGD with momentum and a "
                                       "decreasing learning rate for a fixed budget, no polish) or 'tight' "
                                       "(Adam + L-BFGS to a tight minimum)", choices=REGIMES)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {self.regime!r}.")
        if self.size_points_per_phase is not None:
            try:
                parse_size_points(self.size_points_per_phase)
            except ValueError as err:
                raise ValueError(f"size_points_per_phase: {err}.") from None

    @property
    def points_per_phase(self) -> int:
        """Training points per phase of the main model (``QUICK_POINTS_PER_PHASE`` in quick mode,
        ``POINTS_PER_PHASE`` otherwise, unless ``n_per_phase`` overrides)."""
        return self.n_per_phase or (QUICK_POINTS_PER_PHASE if self.quick else POINTS_PER_PHASE)

    @property
    def side_points_per_phase(self) -> int:
        """Training points per phase of the extra models (Fig. 4 sign sets, Fig. 6 size
        comparison): at most ``SIDE_POINTS_PER_PHASE``."""
        return min(self.points_per_phase, SIDE_POINTS_PER_PHASE)

    @property
    def size_comparison_points_per_phase(self) -> int:
        """Training points per phase of the Fig. 6 size comparison."""
        return self.size_points_per_phase or self.side_points_per_phase

    def recipe(self, network: Network) -> TrainingRecipe:
        """How to train ``network``: "paper" (the 740-parameter CNN), "gap" (the size-invariant
        CNN), in ``self.regime``, or "sign" (the paper CNN on the sign-flipped sets of Fig. 4,
        Adam at ``SIGN_LR`` + L-BFGS in either regime)."""
        from ...physics import GAP_CNN_RECIPE, PAPER_CNN_RECIPE, TIGHT_RECIPE  # the physics data stack loads on use

        if network == "sign":
            # either regime: on the sign-flipped sets neither SGD (the paper CNN recipe) nor Adam
            # without the polish leaves the ln 2 plateau within its budget; Adam + L-BFGS does
            return replace(TIGHT_RECIPE, lr=SIGN_LR)
        if self.regime == "stopped":
            return PAPER_CNN_RECIPE if network == "paper" else GAP_CNN_RECIPE
        return TIGHT_RECIPE if network == "paper" else replace(TIGHT_RECIPE, lr=SIGN_LR)

    @property
    def selected_figures(self) -> tuple[str, ...]:
        """The figures to draw."""
        return self.figures if self.figures is not None else (QUICK_FIGURES if self.quick else FIGURES)
