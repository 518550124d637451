"""The curvature engine: statistics collection, K-FOC (Lanczos / power), K-FAC, diagonal, dense."""

from ._kfoc import ConvergenceWarning
from ._result import Curvature
from .fit import fit_curvature

__all__ = ["ConvergenceWarning", "Curvature", "fit_curvature"]
