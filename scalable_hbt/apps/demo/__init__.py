"""``hbt demo``: the toolbox on the paper's built-in physics example (see :mod:`.run`).

Modules, one responsibility each: :mod:`.config` (``DemoConfig``, every default of the
command), :mod:`.training` (the trained classifiers), :mod:`.comparison` (dense versus
matrix-free backends), :mod:`.experiments` (Fig. 4 sign anomaly, Fig. 6 system sizes),
:mod:`.analysis` (the physics read-outs of the methods' outputs), :mod:`.report` (figures,
summary, ``report.json``), :mod:`.timing` and :mod:`.run` (the orchestration).

Only :mod:`.config` is imported with the package: the ``hbt`` command line builds its parser
from ``DemoConfig`` on every call, and the other modules (matplotlib, scipy.stats) load on
first use of one of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import FIGURES, QUICK_FIGURES, REGIMES, DemoConfig, parse_figures

_MODULE_OF = {
    **dict.fromkeys(("RUE_THRESHOLD", "above_neighbours", "stand_out", "uncertain_region"), "analysis"),
    **dict.fromkeys(("LEES_M", "MethodResults", "compare_backends", "matrix_free_toolbox"), "comparison"),
    **dict.fromkeys(("sign_experiment", "size_experiment"), "experiments"),
    **dict.fromkeys(("draw_figures", "format_summary", "format_table", "write_report"), "report"),
    **dict.fromkeys(("FIG3_TEST_V1", "run_demo"), "run"),
    **dict.fromkeys(("TrainedModel", "train_classifier", "train_network"), "training"),
}

__all__ = ["DemoConfig", "FIGURES", "QUICK_FIGURES", "REGIMES", "parse_figures", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    """The names of the package's other modules, imported on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
