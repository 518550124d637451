"""Choosing the prior precision ``τ`` (and the predictive temperature ``T``) of a posterior.

Every rule returns a :class:`TuningResult` and leaves the posterior alone; the caller installs
the chosen ``τ``. One module per concept:

- :mod:`.dispatch`: :meth:`~bayes_kfoc.Laplace.optimize_prior_precision`'s choice of data, rule
  and prior;
- :mod:`.grid`: the one default scale grid, and the plain grid search over it;
- :mod:`.joint_search`: the scale-and-temperature search on validation data (GLM probit);
- :mod:`.consistency`: the scale without validation data (training-consistency rule);
- :mod:`.evidence`: the post-hoc evidence maximiser, per block or shared;
- :mod:`.scale_variances`: the GLM logit variances at many scales, in bounded memory;
- :mod:`.result`: :class:`TuningResult` and the validation metric's type.
"""

from .dispatch import optimize_prior
from .evidence import LOG_TAU_BOUNDS, marglik_root
from .grid import DEFAULT_GRID, DEFAULT_RANGE, STEP
from .result import Metric, TuningResult, nll

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_RANGE",
    "LOG_TAU_BOUNDS",
    "STEP",
    "Metric",
    "TuningResult",
    "marglik_root",
    "nll",
    "optimize_prior",
]
