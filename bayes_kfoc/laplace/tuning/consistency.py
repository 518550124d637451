"""A prior scale without validation data: the largest posterior the training data stay
consistent with.

Under the Laplace approximation's own quadratic model, averaging the training log-likelihood
over the posterior lowers it by ``½ γ`` in expectation, with ``γ = Σ_b Σ_i λ_i / (λ_i + τ_b)``
the effective number of parameters. The measured drop of the GLM probit predictive,
``N · [NLL_probit(τ) − NLL_MAP]`` on (a sample of) the training points, follows that
prediction while the posterior is tight, and outgrows it once the posterior spreads into
directions where the quadratic model no longer holds (saturated softmax points tolerate any
logit variance, which is why the post-hoc evidence picks a far too wide posterior). With the
ratio

    r(s) = N · [NLL_probit(τ_s) − NLL_MAP] / (½ γ(τ_s)),    τ_s = s · base,

the rule scans ``s`` downwards from ``10^7`` in quarter decades and keeps the smallest ``s``
such that ``r`` stays within ``(1 + slack)`` of its tight-posterior value ``r(10^7)`` for every
larger scale (``slack = 0.5``). The temperature stays 1.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ...blocks import CurvatureBlock
from ...options import PriorKind, TuneMethod
from .grid import STEP
from .result import TuningResult
from .scale_variances import ScaleVariances

TOP = 7.0  # log10 s of the tight-posterior reference
BOTTOM = -4.0  # log10 s the scan never passes
SLACK = 0.5


def effective_parameters(blocks: list[CurvatureBlock], tau: Tensor) -> float:
    """``γ = Σ_b Σ_i λ_i / (λ_i + τ_b)`` over the blocks' (undamped) eigenvalues."""
    total = 0.0
    for b, t in zip(blocks, tau, strict=True):
        lam = b.eigenvalues().double()
        total += float((lam / (lam + t.to(lam))).sum())
    return total


def consistency(
    train: ScaleVariances,
    base: Tensor,
    blocks: list[CurvatureBlock],
    num_data: int,
    *,
    slack: float = SLACK,
    prior: PriorKind = PriorKind.SCALED,
) -> TuningResult:
    """The rule of the module docstring on the training sample ``train``."""
    if not slack > 0:
        raise ValueError(f"Laplace.optimize_prior_precision: slack must be positive, got {slack}.")
    lattice, u = [TOP], TOP - STEP
    while u >= BOTTOM - 1e-9:  # the scan's own arithmetic, so that every scale is prepared
        lattice.append(u)
        u -= STEP
    train.prepare(lattice)
    logits, labels = train.logits, train.labels
    base = base.to(logits.device)
    nll_map = float(-torch.log_softmax(logits, -1).gather(1, labels[:, None]).mean())

    def ratio(u: float) -> float:
        tau = 10.0**u * base
        var = train.take(u)
        lp = torch.log_softmax(logits / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
        drop = num_data * (float(-lp.gather(1, labels[:, None]).mean()) - nll_map)
        gamma = effective_parameters(blocks, tau)
        return drop / (0.5 * gamma) if gamma > 0 else 0.0

    scores: dict[float, float] = {}
    r_top = scores[TOP] = ratio(TOP)
    limit = r_top + slack * max(abs(r_top), 1e-12)
    chosen = TOP
    u = TOP - STEP
    while u >= BOTTOM - 1e-9:
        r = scores[round(u, 10)] = ratio(u)
        if not (r <= limit):
            break
        chosen = round(u, 10)
        u -= STEP
    at_edge = chosen <= BOTTOM + 1e-9 or chosen == TOP
    if at_edge:
        warnings.warn(
            f"Laplace.optimize_prior_precision: the consistency rule stopped at the end of its "
            f"range (s = {10.0**chosen:.3g}); pass val_loader= to tune on validation data.",
            stacklevel=4,
        )
    return TuningResult(
        TuneMethod.CONSISTENCY,
        (10.0**chosen * base).double(),
        {10.0**k: v for k, v in sorted(scores.items())},
        at_edge,
        prior=prior,
        scale=10.0**chosen,
    )
