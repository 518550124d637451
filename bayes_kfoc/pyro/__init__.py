"""Pyro integration: the Laplace posterior as a real Pyro guide.

- :func:`bayesian_model` turns a trained classifier into a Pyro model ``model(x, y=None)`` with a
  ``PyroSample`` Gaussian prior on every parameter (optionally linearised around the MAP);
- :class:`LaplaceGuide` is a :class:`pyro.infer.autoguide.AutoGuide` sampling a fitted
  :class:`~bayes_kfoc.Laplace` posterior (K-FOC / K-FAC / diagonal / dense blocks), for
  ``Predictive``, ``poutine.trace`` and ``Trace_ELBO``; :meth:`LaplaceGuide.from_model` fits one to
  a user-written Pyro BNN (its network an attribute of the model, or the model itself as in Pyro's
  tutorials); :meth:`LaplaceGuide.network_model` gives the matching model that evaluates the
  network functionally (``Predictive(parallel=True)`` for any network) and, with
  ``linearized=True``, the GLM predictive; :meth:`LaplaceGuide.update` follows a re-tuned ``τ``;
- :class:`KroneckerMatrixNormal` is the matrix normal with precision ``G ⊗ A + τI`` (row-major
  vec, exact damping) that the guide samples Kronecker blocks from.
"""

from ._functional import NetworkModel
from .distributions import KroneckerMatrixNormal
from .guide import LaplaceGuide
from .model import BayesianClassifier, bayesian_model
from .posteriors import BlockPosterior, DensePosterior, DiagPosterior, KronPosterior

__all__ = [
    "BayesianClassifier",
    "BlockPosterior",
    "DensePosterior",
    "DiagPosterior",
    "KronPosterior",
    "KroneckerMatrixNormal",
    "LaplaceGuide",
    "NetworkModel",
    "bayesian_model",
]
