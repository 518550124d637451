"""The Laplace posterior: fit, tune, predict, sample and save."""

from .laplace import Laplace

__all__ = ["Laplace"]
