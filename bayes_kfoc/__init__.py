"""bayes-kfoc: calibrated post-hoc uncertainty for PyTorch classifiers.

Curvature (:func:`fit_curvature`) is the **summed** Fisher of the softmax likelihood, one block per
module, in ``parameters_to_vector`` order. K-FOC blocks are the Frobenius-optimal ``G ⊗ A``.
"""

from ._version import __version__
from .blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock
from .curvature import ConvergenceWarning, Curvature, fit_curvature
from .laplace import GlmTerms, Laplace
from .laplace.marglik import MarglikEpoch, MarglikResult, marglik_training
from .stats.capture import set_padding_mask
from .stats.output import set_logits

__all__ = [
    "ConvergenceWarning",
    "Curvature",
    "CurvatureBlock",
    "DenseBlock",
    "DiagBlock",
    "GlmTerms",
    "KronBlock",
    "Laplace",
    "MarglikEpoch",
    "MarglikResult",
    "__version__",
    "fit_curvature",
    "marglik_training",
    "set_logits",
    "set_padding_mask",
]
