"""The statistics engine: one collector feeds every curvature computer and predictive.

A :class:`Collector` runs forward and backward over one batch with module hooks and returns, per
target module, its :data:`Stats`: :class:`KronStats` for Linear / Conv2d (inputs and output
directions, or per-direction gradients) and :class:`GradStats` (explicit per-direction parameter
gradients) for every other module. Consumers use one interface on both: ``diag``, ``grads``,
``quad`` (quadratic forms against any block, e.g. the GLM covariance), ``inner`` and
``gram_cross`` (Frobenius quantities), plus K-FAC's sums and K-FOC's two maps on
:class:`KronStats`. Conventions are in ``docs/math.md`` ("Notation", "Fisher directions").
"""

from .batch import as_labels, call_model, check_label_range, normal_tensor, unpack_batch
from .collect import ONE_LOGIT, Collector, Stats
from .directions import logit_directions, num_directions
from .generic import GradStats
from .kron import GradientStats, KfacSums, KronStats, LinearStats, SharedStats, kron_stats, sym_tmm
from .probe import probe
from .targets import (
    CONV2D,
    GENERIC,
    LINEAR,
    TIED,
    StatsKind,
    Target,
    classify,
    owners,
    select,
    targets_for,
    tied,
)

__all__ = [
    "CONV2D",
    "GENERIC",
    "LINEAR",
    "ONE_LOGIT",
    "TIED",
    "Collector",
    "GradStats",
    "GradientStats",
    "KfacSums",
    "KronStats",
    "LinearStats",
    "SharedStats",
    "Stats",
    "StatsKind",
    "Target",
    "as_labels",
    "call_model",
    "check_label_range",
    "classify",
    "kron_stats",
    "logit_directions",
    "normal_tensor",
    "num_directions",
    "owners",
    "probe",
    "select",
    "sym_tmm",
    "targets_for",
    "tied",
    "unpack_batch",
]
