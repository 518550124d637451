"""Non-Bayesian post-hoc calibration baselines the Laplace methods are compared against."""

from evaluation.baselines.temperature import TemperatureScaled, fit_temperature

__all__ = ["TemperatureScaled", "fit_temperature"]
