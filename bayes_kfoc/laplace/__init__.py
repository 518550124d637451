"""The Laplace posterior: fit, tune, predict, sample and save."""

from .laplace import Laplace
from .prior import PriorPrecision, check_prior_precision, prior_precision_vector

__all__ = ["Laplace", "PriorPrecision", "check_prior_precision", "prior_precision_vector"]
