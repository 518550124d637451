"""The outcome of a prior-precision tuning rule, and the metric the validation rules minimise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ...options import PriorKind, TuneMethod

Metric = Callable[[Tensor, Tensor], float]
"""``metric(probs [N, C], labels [N]) -> float``, lower is better (e.g. NLL)."""


@dataclass(frozen=True)
class TuningResult:
    """The outcome of :meth:`~bayes_kfoc.Laplace.optimize_prior_precision`.

    Attributes:
        method: ``"gridsearch"``, ``"consistency"`` or ``"marglik"``.
        prior_precision: the chosen ``τ``, one value per block (block order), float64.
        temperature: the chosen predictive temperature ``T`` (``1`` unless tuned).
        prior: ``"scaled"`` (``τ_b = s · P_b / ||θ*_b||²``) or ``"global"`` (``τ_b = s``);
            ``"per-module"`` / ``"shared"`` for the evidence.
        scale: the chosen ``s`` (``None`` for the evidence).
        scores: ``{s: metric}`` for every scale scored (gridsearch: the validation metric at
            that scale's best ``T``; consistency: the ratio ``r(s)``), sorted by ``s``.
        temperatures: gridsearch: ``{s: T}``, the best temperature at each scale.
        at_edge: the chosen scale is an end of the searched range (for the validation search:
            after expanding it), or the tuned temperature is at its upper end, or the evidence
            had no interior maximum (each is warned about).
    """

    method: TuneMethod
    prior_precision: Tensor
    scores: dict[float, float] = field(default_factory=dict)
    at_edge: bool = False
    temperature: float = 1.0
    prior: PriorKind = PriorKind.GLOBAL
    scale: float | None = None
    temperatures: dict[float, float] = field(default_factory=dict)

    @property
    def grid(self) -> list[float]:
        """Every scale ``s`` scored, ascending (``τ`` itself for the global prior)."""
        return sorted(self.scores)


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` under ``probs`` (clamped at ``1e-12``)."""
    p = probs.gather(1, labels.unsqueeze(1)).clamp_min(1e-12)
    return float(-p.log().mean())
