"""Prior-precision tuning: the Laplace evidence maximised exactly, and a validation grid search.

Both return a :class:`TuningResult`; neither changes the posterior itself (the caller installs
the chosen ``τ``). The grid search scores a *function* of ``τ`` (the caller's predictive at that
``τ``), so the τ-independent work (Jacobians, MAP logits) is done once by the caller.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..blocks import CurvatureBlock
from ..options import Link, PredMethod
from ..stats import as_labels, call_model, check_label_range
from . import predictive
from ._glm import chunk_variances, probit, total_variance
from ._prior import marglik_root
from .predictive import PosteriorView

Metric = Callable[[Tensor, Tensor], float]
"""``metric(probs [N, C], labels [N]) -> float``, lower is better (e.g. NLL)."""

DEFAULT_GRID = torch.logspace(-2, 5, 29, dtype=torch.float64)
"""The coarse grid of the validation search: ``logspace(-2, 5, 29)`` (then refined)."""

REFINE_POINTS = 7  # points strictly between the best coarse point's neighbours


@dataclass(frozen=True)
class TuningResult:
    """The outcome of :meth:`~bayes_kfoc.Laplace.optimize_prior_precision`.

    Attributes:
        method: ``"marglik"`` or ``"gridsearch"``.
        prior_precision: the chosen ``τ``, one value per block (block order), float64.
        scores: gridsearch only: ``{τ: metric}`` for every ``τ`` scored, sorted by ``τ``.
        at_edge: gridsearch: the best ``τ`` is an end of the grid; marglik: some block's
            evidence had no interior maximum (clamped).
    """

    method: str
    prior_precision: Tensor
    scores: dict[float, float] = field(default_factory=dict)
    at_edge: bool = False

    @property
    def grid(self) -> list[float]:
        """Every ``τ`` scored (gridsearch), ascending."""
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
    return TuningResult("marglik", tau.clone(), at_edge=bool(caught))


def tune_gridsearch(
    score: Callable[[float], float], grid: Sequence[float] | Tensor | None, num_blocks: int
) -> TuningResult:
    """One shared ``τ`` minimising ``score(τ)`` over ``grid`` (default :data:`DEFAULT_GRID`),
    then :data:`REFINE_POINTS` log-spaced points between the best point's neighbours.

    A NaN score counts as ``+inf``; an empty grid raises. Warns when the best ``τ`` is an end of
    the grid (at the upper end the validation data favour the MAP).
    """
    grid_t = torch.as_tensor(DEFAULT_GRID if grid is None else grid, dtype=torch.float64)
    if grid_t.numel() == 0:
        raise ValueError("Laplace.optimize_prior_precision: grid is empty; pass τ values > 0.")
    grid_t = grid_t.flatten()
    if not bool(torch.isfinite(grid_t).all()) or bool((grid_t <= 0).any()):
        raise ValueError(
            f"Laplace.optimize_prior_precision: grid values must be positive and finite, got "
            f"{grid_t.tolist()}."
        )
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


def validation_data(view: PosteriorView, val_loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Every ``(x, y)`` of ``val_loader``, concatenated and checked: at least one point, integer
    labels (any width, as ``long``) within the model's classes."""
    what = "Laplace.optimize_prior_precision: val_loader"
    xs, ys = [], []
    for batch in val_loader:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise TypeError(f"{what} must yield (x, y) pairs, got {type(batch).__name__}.")
        if not isinstance(batch[0], Tensor) or not isinstance(batch[1], Tensor):
            raise TypeError(f"{what} must yield tensors (x, y).")
        xs.append(batch[0])
        ys.append(as_labels(batch[1], what))
    if not xs or sum(len(t) for t in xs) == 0:
        raise ValueError(f"{what} yielded no points; pass a loader over held-out (x, y) data.")
    x, y = torch.cat(xs), torch.cat(ys).to(view.device)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{what}: labels must be [N] matching inputs [N, ...]; got {tuple(y.shape)} and "
            f"{tuple(x.shape)}."
        )
    with torch.no_grad():
        logits = call_model(view.model, predictive.check_inputs(view, x[:1]), what)
    check_label_range(y, logits.shape[-1], what)
    return x, y


def tune_on_loader(
    view: PosteriorView,
    val_loader: Iterable[Any],
    grid: Sequence[float] | Tensor | None,
    metric: Metric,
    method: PredMethod,
    link: Link,
    n_samples: int,
) -> TuningResult:
    """:func:`tune_gridsearch` of ``metric`` on the predictive over ``val_loader``.

    For the GLM probit predictive the Jacobians and MAP logits are computed once and every ``τ``
    reuses them; other predictives are re-run per ``τ`` with a fixed seed.
    """
    x, y = validation_data(view, val_loader)
    glm_probit = method is PredMethod.GLM and link is Link.PROBIT
    # The τ-independent work, once: squared Jacobian coordinates in each block's eigenbasis.
    terms = (
        [(chunk_variances(c, view.blocks), c[1]) for c in predictive.iter_jacobians(view, x)]
        if glm_probit
        else None
    )
    n = len(view.blocks)

    def score(t: float) -> float:
        tau = torch.full((n,), t, dtype=torch.float64, device=view.device)
        if terms is not None:
            var = torch.cat([total_variance(v, tau) for v, _ in terms])
            probs = probit(torch.cat([m for _, m in terms]).to(var.dtype), var)
        else:
            gen = torch.Generator(view.device).manual_seed(0)
            probs = predictive.predict(view.with_tau(tau), x, method, link, n_samples, gen)
        return metric(probs, y)

    return tune_gridsearch(score, grid, n)
