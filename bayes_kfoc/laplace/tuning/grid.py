"""The scale grid every tuning rule shares, and the plain grid search over it.

The prior scale ``s`` (``τ = s · base``) is searched on a log grid of :data:`STEP` decades over
:data:`DEFAULT_RANGE` (:data:`DEFAULT_GRID`, 29 points from ``1e-2`` to ``1e5``). This is the
one place the default grid is written: the joint scale-and-temperature search
(:mod:`.joint_search`) expands it, the consistency rule (:mod:`.consistency`) scans in its
steps, and :func:`tune_gridsearch` (predictives other than the GLM probit) refines it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...options import TuneMethod
from .result import TuningResult

STEP = 0.25
"""Decades between neighbouring grid scales."""

DEFAULT_RANGE = (-2.0, 5.0)
"""``log10 s`` of the default grid's ends."""

DEFAULT_GRID = torch.logspace(
    DEFAULT_RANGE[0],
    DEFAULT_RANGE[1],
    round((DEFAULT_RANGE[1] - DEFAULT_RANGE[0]) / STEP) + 1,
    dtype=torch.float64,
)
"""The default scales: ``logspace(-2, 5, 29)``, one every :data:`STEP` decades."""

REFINE_POINTS = 7  # points strictly between the best coarse point's neighbours


def default_log10_grid() -> Tensor:
    """``log10`` of :data:`DEFAULT_GRID`'s scales, as the searches step through them (exact
    multiples of :data:`STEP`, float64)."""
    return torch.arange(DEFAULT_RANGE[0], DEFAULT_RANGE[1] + 1e-9, STEP, dtype=torch.float64)


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
    return TuningResult(TuneMethod.GRIDSEARCH, tau, dict(sorted(scores.items())), at_edge)
