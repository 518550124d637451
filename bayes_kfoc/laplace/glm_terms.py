"""The GLM probit predictive at fixed inputs, for many priors and temperatures at once.

Everything in the linearised predictive that does not depend on the prior is computed once
(:meth:`~bayes_kfoc.Laplace.glm_terms`): the MAP logits and, per block, the squared Jacobian
coordinates in the block's eigenbasis (``docs/math.md``, "GLM predictive"), with last layers in
closed form. Any prior precision ``τ`` then costs one contraction per block with the inverse
damped spectrum, and any temperature ``T`` a softmax: this is how a user sweeps the prior, and
how the study draws its matched-prior figures, without a Jacobian pass per prior.

Memory: every point's terms are kept (``C`` squared coordinates per parameter of a shared-weight
block and point; ``C + d_in`` numbers per point for a rank-one layer): build it on chunks of
points that fit. The library's own tuning rules stream the same terms under ``memory_budget``
instead (:mod:`.tuning.scale_variances`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import GlmPath
from ..stats.inputs import Inputs
from ._glm import probit, total_variance
from ._glm_pass import glm_chunks, glm_plan
from .predictive import PosteriorView, check_inputs
from .prior import PriorPrecision, prior_precision_vector

Term = Callable[[Tensor], Tensor]
"""One block's τ-independent terms at a chunk of points: ``term(τ_b) -> [B, C]`` variances."""


@dataclass(frozen=True)
class GlmTerms:
    """The linearised logits of a fitted :class:`~bayes_kfoc.Laplace` at fixed inputs.

    Attributes:
        logits: ``[N, C]`` MAP logits (float64, untempered).
        blocks: the posterior's block names (block order: ``τ`` vectors follow it).
        scaled_base: ``P_b / ||θ*_b||²`` per block: ``τ_b = s · scaled_base_b`` is the scaled
            prior of scale ``s`` (``optimize_prior_precision(prior="scaled")``).
        prior_precision: the posterior's ``τ`` per block when the terms were made (the
            default of :meth:`variances` and :meth:`probs`).
        temperature: the posterior's ``T`` then (the default of :meth:`probs`).
        chunks: per chunk of points, each block's terms (block order).
    """

    logits: Tensor
    blocks: tuple[str, ...]
    scaled_base: Tensor
    prior_precision: Tensor
    temperature: float
    chunks: Sequence[Sequence[Term]]

    def tau(
        self, prior_precision: PriorPrecision | None = None, scale: float | None = None
    ) -> Tensor:
        """``τ`` per block (float64): ``prior_precision`` in any accepted spelling (a scalar,
        one value per block, a dict by block name), or the scaled prior of ``scale``, or the
        posterior's own ``τ``; not both."""
        if prior_precision is not None and scale is not None:
            raise ValueError("GlmTerms: pass prior_precision= or scale=, not both.")
        if scale is not None:
            if not scale > 0:
                raise ValueError(f"GlmTerms: scale must be positive, got {scale!r}.")
            return (scale * self.scaled_base).double()
        if prior_precision is None:
            return self.prior_precision
        return prior_precision_vector(prior_precision, list(self.blocks))

    def variances(
        self, prior_precision: PriorPrecision | None = None, *, scale: float | None = None
    ) -> Tensor:
        """``[N, C]`` variances of the linearised logits (untempered) at the prior of
        :meth:`tau`."""
        tau = self.tau(prior_precision, scale)
        if not self.chunks:
            return self.logits.new_zeros(self.logits.shape)
        device = self.logits.device
        return torch.cat([total_variance(c, tau.to(device)) for c in self.chunks]).to(
            self.logits.dtype
        )

    def probs(
        self,
        prior_precision: PriorPrecision | None = None,
        *,
        scale: float | None = None,
        temperature: float | None = None,
    ) -> Tensor:
        """``[N, C]`` GLM probit probabilities (:meth:`~bayes_kfoc.Laplace.predict`'s default)
        at the prior of :meth:`tau` and ``temperature`` (default: the posterior's ``T``)."""
        t = self.temperature if temperature is None else temperature
        if not t > 0:
            raise ValueError(f"GlmTerms: temperature must be positive, got {t!r}.")
        return probit(self.logits, self.variances(prior_precision, scale=scale), t)


def glm_terms(view: PosteriorView, x: Inputs, scaled_base: Tensor) -> GlmTerms:
    """:class:`GlmTerms` at ``x``: one exact Jacobian pass chunk by chunk (last layers in closed
    form), every chunk's terms kept."""
    x = check_inputs(view, x)
    plan = glm_plan(view, x, 1, GlmPath.EXACT, "Laplace.glm_terms")
    chunks, logits = [], []
    for chunk in glm_chunks(view, x, plan, None):
        by_name = chunk.terms()
        chunks.append([by_name[k] for k in view.blocks])
        logits.append(chunk.logits)
    return GlmTerms(
        logits=torch.cat(logits).double(),
        blocks=tuple(view.blocks),
        scaled_base=scaled_base.double(),
        prior_precision=view.tau.double(),
        temperature=view.temperature,
        chunks=chunks,
    )
