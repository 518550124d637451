"""The Laplace posterior: fit, tune, predict, sample and save."""

from ._layout import Architecture, Layout, architecture, check_architecture
from .laplace import Laplace
from .prior import PriorPrecision, check_prior_precision, prior_precision_vector

__all__ = [
    "Architecture",
    "Laplace",
    "Layout",
    "PriorPrecision",
    "architecture",
    "check_architecture",
    "check_prior_precision",
    "prior_precision_vector",
]
