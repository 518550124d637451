"""Prior-precision tuning: the Laplace evidence maximised exactly, and a validation grid search.

Both return a :class:`TuningResult`; neither changes the posterior itself (the caller installs
the chosen ``τ``). The grid search scores a *function* of ``τ`` (the caller's predictive at that
``τ``), so the τ-independent work (Jacobians, MAP logits) is done once by the caller.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..blocks import CurvatureBlock
from ._prior import marglik_root

Metric = Callable[[Tensor, Tensor], float]
"""``metric(probs [N, C], labels [N]) -> float``, lower is better (e.g. NLL)."""

DEFAULT_GRID = torch.logspace(-2, 5, 29, dtype=torch.float64)
"""The coarse grid of the validation search: ``logspace(-2, 5, 29)`` (then refined)."""

REFINE_POINTS = 7  # points strictly between the best coarse point's neighbours


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

    method: str
    prior_precision: Tensor
    scores: dict[float, float] = field(default_factory=dict)
    at_edge: bool = False
    temperature: float = 1.0
    prior: str = "global"
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


def tune_marglik(
    blocks: Sequence[CurvatureBlock], sq_norms: Tensor, per_module: bool
) -> TuningResult:
    """The evidence-maximising ``τ``: per block (``per_module``) or one shared value.

    ``sq_norms`` holds ``||θ*_b||²`` per block (float64). See ``docs/math.md``, "Laplace
    evidence".
    """
    evals = [b.eigenvalues().double() for b in blocks]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if per_module:
            tau = marglik_root(evals, sq_norms)
        else:
            tau = marglik_root([torch.cat(evals)], sq_norms.sum().reshape(1)).expand(len(evals))
    for w in caught:  # re-issue at the user's call site
        warnings.warn(w.message, w.category, stacklevel=3)
    prior = "per-module" if per_module else "shared"
    return TuningResult("marglik", tau.clone(), at_edge=bool(caught), prior=prior)


def check_grid(grid: Sequence[float] | Tensor) -> Tensor:
    """``grid`` as a flat float64 tensor; raises unless it is non-empty, positive and finite."""
    g = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if g.numel() == 0:
        raise ValueError("Laplace.optimize_prior_precision: grid is empty; pass values > 0.")
    if not bool(torch.isfinite(g).all()) or bool((g <= 0).any()):
        raise ValueError(
            "Laplace.optimize_prior_precision: grid values must be positive and finite, got "
            f"{g.tolist()}."
        )
    return g


def tune_gridsearch(
    score: Callable[[float], float], grid: Sequence[float] | Tensor | None, num_blocks: int
) -> TuningResult:
    """One shared ``τ`` minimising ``score(τ)`` over ``grid`` (default :data:`DEFAULT_GRID`),
    then :data:`REFINE_POINTS` log-spaced points between the best point's neighbours.

    A NaN score counts as ``+inf``; an empty grid raises. Warns when the best ``τ`` is an end of
    the grid (at the upper end the validation data favour the MAP).
    """
    grid_t = check_grid(DEFAULT_GRID if grid is None else grid)
    scores: dict[float, float] = {}

    def scored(t: float) -> float:
        value = score(t)
        scores[t] = math.inf if math.isnan(value) else value
        return scores[t]

    coarse = [scored(float(t)) for t in grid_t]
    if not any(math.isfinite(v) for v in coarse):
        raise ValueError(
            "Laplace.optimize_prior_precision: the metric is NaN or infinite at every τ of the "
            f"grid ({len(coarse)} values); check the metric (it gets probs [N, C] and labels [N] "
            "and returns a float, lower is better) and the validation data."
        )
    best = min(range(len(coarse)), key=coarse.__getitem__)
    if len(grid_t) > 2:
        lo = grid_t[max(best - 1, 0)].log()
        hi = grid_t[min(best + 1, len(grid_t) - 1)].log()
        for t in torch.linspace(float(lo), float(hi), REFINE_POINTS + 2)[1:-1].exp():
            scored(float(t))
    best_tau = min(scores, key=scores.__getitem__)
    edges = (float(grid_t.min()), float(grid_t.max()))
    at_edge = best_tau in edges
    if at_edge:
        warnings.warn(
            f"Laplace.optimize_prior_precision: the best τ ({best_tau:.3g}) is at the edge of "
            f"the grid [{edges[0]:.3g}, {edges[1]:.3g}]; widen the grid (a τ at the upper edge "
            "means the validation data favour the MAP).",
            stacklevel=3,
        )
    tau = torch.full((num_blocks,), best_tau, dtype=torch.float64)
    return TuningResult("gridsearch", tau, dict(sorted(scores.items())), at_edge)
