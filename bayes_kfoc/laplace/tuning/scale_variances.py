"""GLM logit variances at many prior scales, in bounded memory (for the tuning rules).

The tuning rules score the GLM probit predictive at prior scales ``s = 10^u`` (``τ = s · base``)
on a fixed set of points. Everything τ-independent (the Jacobian statistics and their squared
coordinates in each block's eigenbasis, :class:`._glm.BlockVariance`; the closed-form terms of
a last layer, :class:`._head.HeadVariance`) is computed chunk by chunk:

- when all points' terms fit ``memory_budget``, they are kept, and any scale costs one
  contraction per block (one Jacobian pass in all);
- otherwise each chunk's terms are contracted at **every scale asked for so far, and at the
  scales the search may ask for next** (:meth:`ScaleVariances.prepare`'s ``ahead``) while the
  chunk is alive, and freed: only ``[N, C]`` variances per scale are kept. A scale asked for
  later (the refinement between the best scale's neighbours) costs another Jacobian pass.

Memory: one chunk's terms (the chunk size comes from the budget) plus the stored variances.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ...options import GlmPath
from ...stats import check_label_range
from ...stats.inputs import Batches
from .._glm import total_variance
from .._glm_pass import GlmChunk, glm_chunks, glm_plan
from .._plan import GlmPlan, budget_bytes
from ..predictive import PosteriorView, check_inputs

AHEAD_SHARE = 4  # the look-ahead scales may use 1 / AHEAD_SHARE of the memory budget


def key(u: float) -> float:
    """A scale's exponent as a dictionary key (``round(u, 10)``, as the searches round)."""
    return round(u, 10)


class ScaleVariances:
    """``[N, C]`` GLM logit variances at scales ``10^u`` over ``points``, with MAP logits and
    labels; see the module docstring.

    Args:
        view: the posterior (its ``memory_budget`` bounds the memory).
        points: the ``(x, y)`` batches.
        base: ``τ = 10^u · base`` (one value per block).
        what: the caller and the data, for errors (``"Laplace.optimize_prior_precision:
            val_loader"``).
        keep: keep every chunk's terms (``None``: when they fit the budget).
    """

    def __init__(
        self,
        view: PosteriorView,
        points: Batches,
        base: Tensor,
        what: str,
        keep: bool | None = None,
    ):
        self.view = view
        self.points = points
        self.base = base.to(view.device)
        self.what = what
        self.keep = keep
        self.budget = budget_bytes(view.memory_budget, view.device)
        self.passes = 0
        self._cache: dict[float, Tensor] = {}
        self._terms: list[list[Any]] | None = None
        self._logits: Tensor | None = None
        self._labels: Tensor | None = None

    @property
    def logits(self) -> Tensor:
        """``[N, C]`` MAP logits (float64), after the first :meth:`prepare`."""
        assert self._logits is not None, "call prepare first"
        return self._logits

    @property
    def labels(self) -> Tensor:
        assert self._labels is not None, "call prepare first"
        return self._labels

    def _chunks(self) -> Iterator[tuple[GlmChunk, Tensor, GlmPlan]]:
        """Per chunk: the GLM chunk (its blocks' terms on demand), the labels, and the plan."""
        for x, y in self.points:
            x = check_inputs(self.view, x)
            plan = glm_plan(self.view, x, 1, GlmPath.EXACT, self.what)
            start = 0
            for chunk in glm_chunks(self.view, x, plan, None):
                b = chunk.logits.shape[0]
                yield chunk, y[start : start + b], plan
                start += b
        self.passes += 1

    def prepare(self, us: Iterable[float], ahead: Iterable[float] = ()) -> None:
        """Make the scales ``us`` available; when a Jacobian pass is needed, also evaluate the
        scales ``ahead`` (while their stored variances use at most a quarter of the budget).
        The first call runs the first pass (MAP logits, labels; the terms are kept when they
        fit the budget)."""
        first = self._logits is None
        todo = list(dict.fromkeys(key(u) for u in us if key(u) not in self._cache))
        if not first and (not todo or self._terms is not None):
            return
        if first:
            x0 = check_inputs(self.view, self.points[0][0])
            c = glm_plan(self.view, x0, 1, GlmPath.EXACT, self.what).num_classes
            per_scale = sum(int(y.numel()) for _, y in self.points) * c * 8
        else:
            per_scale = self.logits.numel() * 8
        room = max(self.budget // AHEAD_SHARE - per_scale * len(todo), 0)
        extra = [key(u) for u in ahead if key(u) not in self._cache and key(u) not in todo]
        todo += list(dict.fromkeys(extra))[: room // max(per_scale, 1)]
        kept: list[list[Any]] | None = [] if first and self.keep is not False else None
        parts: dict[float, list[Tensor]] = {u: [] for u in todo}
        logits, labels = [], []
        count = 0
        exps = torch.tensor(todo, dtype=torch.float64, device=self.base.device)
        taus = 10.0 ** exps.unsqueeze(1) * self.base  # [S, blocks]
        names = list(self.view.blocks)
        for chunk, y, plan in self._chunks():
            count += chunk.logits.shape[0]
            if kept is not None and self.keep is None:
                if count * plan.terms_bytes + plan.exact_bytes > self.budget:
                    kept = None  # too big to keep: stream from now on
            terms = []
            var: Tensor | None = None
            for i, k in enumerate(names):  # every scale in one contraction per block
                term = chunk.term(k)
                if todo:
                    v = term.many(taus[:, i])
                    var = v if var is None else var + v
                if kept is not None:
                    terms.append(term)
                del term  # streamed: one block's terms alive at a time
            if var is not None:
                for u, v in zip(todo, var, strict=True):
                    parts[u].append(v)
            if first:
                logits.append(chunk.logits)
                labels.append(y)
            if kept is not None:
                kept.append(terms)
        for u in todo:
            self._cache[u] = torch.cat(parts[u])
        if first:
            out = torch.cat(logits).double()
            y_all = torch.cat(labels).to(out.device)
            check_label_range(y_all, out.shape[1], self.what)
            self._logits, self._labels, self._terms = out, y_all, kept

    def take(self, u: float) -> Tensor:
        """``[N, C]`` variances at ``10^u`` (computed now if needed; a stored one is released)."""
        k = key(u)
        if k not in self._cache and self._terms is not None:
            return torch.cat([total_variance(t, 10.0**u * self.base) for t in self._terms])
        self.prepare([u])
        return self._cache.pop(k)
