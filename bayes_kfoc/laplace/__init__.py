"""The Laplace posterior: fit, tune, predict, sample and save.

- :class:`Laplace` holds a :class:`~bayes_kfoc.Curvature` and the prior;
- :mod:`.prior`: the prior precision ``τ`` and its one normaliser;
- :mod:`.tuning`: evidence and validation tuning, returning a :class:`TuningResult`;
- :mod:`.predictive`: the GLM and weight-sampling predictives of a :class:`PosteriorView` (the
  GLM's closed-form last layer, exact and sampled paths; :class:`GlmPlan` says which ran);
- :mod:`.glm_terms`: the GLM probit predictive at fixed inputs for many priors
  (:class:`GlmTerms`, from :meth:`Laplace.glm_terms`);
- :mod:`.serialization`: atomic, checksummed saving and loading.
"""

from ._layout import Architecture, Layout, architecture, check_architecture
from ._plan import GlmPlan
from .glm_terms import GlmTerms
from .laplace import Laplace
from .predictive import PosteriorView
from .prior import PriorPrecision, check_prior_precision, prior_precision_vector
from .tuning import TuningResult

__all__ = [
    "Architecture",
    "GlmPlan",
    "GlmTerms",
    "Laplace",
    "Layout",
    "PosteriorView",
    "PriorPrecision",
    "TuningResult",
    "architecture",
    "check_architecture",
    "check_prior_precision",
    "prior_precision_vector",
]
