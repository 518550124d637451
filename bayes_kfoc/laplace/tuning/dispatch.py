"""``Laplace.optimize_prior_precision``'s dispatch: which data, which rule, which prior.

- with validation data (``"gridsearch"``, the default when ``val_loader`` is given): the joint
  search of the prior scale and the predictive temperature (:mod:`.validation`) for the GLM probit
  predictive; other predictives search the scale alone (:func:`.grid.tune_gridsearch`, ``T = 1``);
- without (``"consistency"``, the default otherwise): the training-consistency rule
  (:mod:`.consistency`) on the training points recorded by ``fit`` (or ``train_loader``);
- ``"marglik"``: the evidence maximiser, per module or shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...options import Link, PredMethod, PriorKind, TuneMethod
from ...stats import as_labels
from ...stats.inputs import Batches, batch_size, check_mapping, merge_batches, split_inputs
from .. import predictive
from ..predictive import PosteriorView
from ..prior import scaled_prior_base
from .consistency import consistency
from .evidence import tune_marglik
from .grid import tune_gridsearch
from .joint_search import search
from .result import Metric, TuningResult, nll
from .scale_variances import ScaleVariances

PRIORS = (PriorKind.SCALED.value, PriorKind.GLOBAL.value)  # what prior= accepts


def collect_points(loader: Iterable[Any], what: str, limit: int | None = None) -> Batches:
    """The ``(x, y)`` batches of ``loader`` (at most ``limit`` points), with clear errors; the
    inputs may be tensors or mappings (``model(**x)``), and need not share a shape."""
    out: Batches = []
    count = 0
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise TypeError(f"Laplace.optimize_prior_precision: {what} must yield (x, y) pairs.")
        x, y = batch
        if not isinstance(x, Tensor | Mapping) or not isinstance(y, Tensor):
            raise TypeError(
                f"Laplace.optimize_prior_precision: {what} must yield (inputs, labels) with "
                f"tensor labels and tensor or mapping inputs; got ({type(x).__name__}, "
                f"{type(y).__name__})."
            )
        if isinstance(x, Mapping):
            check_mapping(x, f"Laplace.optimize_prior_precision: {what}")
        y = as_labels(y, f"Laplace.optimize_prior_precision: {what}")
        n = batch_size(x)
        if y.ndim != 1 or len(y) != n:
            raise ValueError(
                f"Laplace.optimize_prior_precision: {what} labels must have shape [N] matching "
                f"the inputs' {n} points; got {tuple(y.shape)}."
            )
        if limit is not None and count + n > limit:
            take = limit - count
            x, y = split_inputs(x, take)[0], y[:take]
            n = take
        if n:
            out.append((x, y))
        count += n
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise ValueError(f"Laplace.optimize_prior_precision: {what} yielded no points.")
    return merge_batches(out)


def optimize_prior(
    view: PosteriorView,
    sq_norms: Tensor,
    num_data: int,
    train_sample: Batches | None,
    *,
    method: str | None,
    per_module: bool,
    val_loader: Iterable[Any] | None,
    train_loader: Iterable[Any] | None,
    prior: str,
    temperature: bool,
    grid: Sequence[float] | Tensor | None,
    metric: Metric | None,
    pred_method: str,
    link: str,
    n_samples: int,
    one_se: bool,
) -> TuningResult:
    """Choose ``τ`` (and ``T``) as :meth:`~bayes_kfoc.Laplace.optimize_prior_precision` says."""
    what = "Laplace.optimize_prior_precision"
    if method is None:
        method = "gridsearch" if val_loader is not None else "consistency"
    m = TuneMethod.parse(method, f"{what}: method")
    if prior not in PRIORS:
        raise ValueError(f"{what}: prior must be one of {PRIORS}, got {prior!r}.")
    kind = PriorKind(prior)
    blocks = list(view.blocks.values())
    if m is TuneMethod.MARGLIK:
        return tune_marglik(blocks, sq_norms, per_module)
    sizes = torch.tensor([b.num_params for b in blocks], dtype=torch.float64)
    base = (
        scaled_prior_base(sq_norms.cpu(), sizes)
        if kind is PriorKind.SCALED
        else torch.ones(len(blocks), dtype=torch.float64)
    )
    base = base.to(view.device)
    if m is TuneMethod.CONSISTENCY:
        if train_loader is not None:
            train_sample = collect_points(train_loader, "train_loader", limit=1000)
        if train_sample is None:
            raise ValueError(
                f"{what}: the consistency rule needs training points; pass train_loader= (or "
                "val_loader= to tune on validation data). A loaded posterior keeps none."
            )
        terms = ScaleVariances(view, train_sample, base, f"{what}: train_loader")
        return consistency(terms, base, blocks, num_data, prior=kind)
    if val_loader is None:
        raise ValueError(f"{what}: gridsearch needs val_loader.")
    points = collect_points(val_loader, "val_loader")
    pm = PredMethod.parse(pred_method, f"{what}: pred_method")
    lk = Link.parse(link, f"{what}: link")
    if pm is PredMethod.GLM and lk is Link.PROBIT:
        terms = ScaleVariances(view, points, base, f"{what}: val_loader")
        return search(
            terms,
            base,
            grid=grid,
            temperature=temperature,
            metric=metric,
            one_se=one_se,
            prior=kind,
        )
    y = torch.cat([yb for _, yb in points]).to(view.device)

    def score(s: float) -> float:
        tuned = view.with_tau(s * base)
        gen = torch.Generator(view.device).manual_seed(0)
        probs = torch.cat([predictive.predict(tuned, x, pm, lk, n_samples, gen) for x, _ in points])
        return (metric or nll)(probs, y)

    result = tune_gridsearch(score, grid, len(blocks))
    scale = float(result.prior_precision[0])
    return TuningResult(
        TuneMethod.GRIDSEARCH,
        (scale * base).double(),
        result.scores,
        result.at_edge,
        prior=kind,
        scale=scale,
    )
