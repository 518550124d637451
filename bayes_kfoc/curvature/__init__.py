"""The curvature fit: K-FOC (Lanczos / power iteration), K-FAC, diagonal and dense blocks.

:func:`fit_curvature` orchestrates; :class:`FitOptions` validates its options, :func:`prepare`
checks the model and first batch, and the result is a :class:`Curvature` with typed
:class:`FitInfo` and per-block :class:`SolverInfo`.
"""

from ._checks import check_train_mode, default_memory_budget, human_bytes
from ._kfoc import ConvergenceWarning
from ._result import Curvature
from .coverage import full_param_name
from .fit import fit_curvature
from .info import FitInfo, SolverInfo
from .options import FitOptions
from .passes import DataPasses, FitSetup, prepare

__all__ = [
    "ConvergenceWarning",
    "Curvature",
    "DataPasses",
    "FitInfo",
    "FitOptions",
    "FitSetup",
    "SolverInfo",
    "check_train_mode",
    "default_memory_budget",
    "fit_curvature",
    "full_param_name",
    "human_bytes",
    "prepare",
]
