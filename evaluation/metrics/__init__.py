"""Evaluation metrics: classification, calibration and OOD detection.

All metrics are pure functions of ``(probs, labels)``, of logits or of score vectors; they
accept torch tensors or NumPy arrays, return Python floats (or small dataclasses), and raise
:class:`ValueError` naming the metric on invalid input (NaN/Inf, wrong shapes, rows of ``probs``
not summing to one, labels out of range, empty or mismatched inputs).
"""

from evaluation.metrics._validation import ROW_SUM_ATOL, ArrayLike
from evaluation.metrics.calibration import (
    DEFAULT_N_BINS,
    ReliabilityCurve,
    adaptive_ece,
    ece,
    mce,
    reliability_curve,
)
from evaluation.metrics.classification import NLL_EPS, accuracy, brier_score, nll
from evaluation.metrics.ood import (
    OODMetrics,
    aupr_in,
    aupr_out,
    auroc,
    energy,
    fpr_at_95_tpr,
    fpr_at_tpr,
    max_logit,
    max_probability,
    mutual_information,
    ood_metrics,
    predictive_entropy,
)

__all__ = [
    "DEFAULT_N_BINS",
    "NLL_EPS",
    "ROW_SUM_ATOL",
    "ArrayLike",
    "OODMetrics",
    "ReliabilityCurve",
    "accuracy",
    "adaptive_ece",
    "aupr_in",
    "aupr_out",
    "auroc",
    "brier_score",
    "ece",
    "energy",
    "fpr_at_95_tpr",
    "fpr_at_tpr",
    "max_logit",
    "max_probability",
    "mce",
    "mutual_information",
    "nll",
    "ood_metrics",
    "predictive_entropy",
    "reliability_curve",
]
