"""The prior precision that maximises the post-hoc Laplace evidence, per block or shared.

With eigenvalues ``λ_i`` of the summed Fisher block and ``t = log τ``, the evidence
``log p(D|θ*) − ½τ||θ*||² + ½P log τ − ½Σ log(λ_i + τ)`` has derivative
``½ [Σ_i λ_i/(λ_i + τ) − τ ||θ*||²]`` in ``t``: the first term falls and the second rises with
``τ``, so the maximiser is the unique root (MacKay's ``τ = γ / ||θ*||²`` with ``γ`` the effective
number of parameters). It is found by bisection in ``log τ``, per block or jointly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ...blocks import CurvatureBlock
from ...options import PriorKind, TuneMethod
from .result import TuningResult

LOG_TAU_BOUNDS = (-25.0, 25.0)


def marglik_root(evals: list[Tensor], sq_norms: Tensor, iters: int = 200) -> Tensor:
    """The evidence-maximising ``τ`` for each group: ``Σ_i λ_i/(λ_i+τ) = τ ||θ||²``.

    Args:
        evals: one tensor of eigenvalues per group (a block, or all blocks together).
        sq_norms: ``||θ*||²`` per group.
    """
    lo = torch.full_like(sq_norms, LOG_TAU_BOUNDS[0])
    hi = torch.full_like(sq_norms, LOG_TAU_BOUNDS[1])

    def h(log_tau: Tensor) -> Tensor:
        tau = log_tau.exp()
        gamma = torch.stack([(e / (e + t)).sum() for e, t in zip(evals, tau, strict=True)])
        return gamma - tau * sq_norms

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        positive = h(mid) > 0
        lo = torch.where(positive, mid, lo)
        hi = torch.where(positive, hi, mid)
    tau = (0.5 * (lo + hi)).exp()
    at_edge = (hi >= LOG_TAU_BOUNDS[1] - 1e-6) | (lo <= LOG_TAU_BOUNDS[0] + 1e-6)
    if bool(at_edge.any()):
        warnings.warn(
            "Laplace: the evidence has no interior maximum for some blocks (zero curvature or "
            f"zero weights); their prior precision is clamped to exp{LOG_TAU_BOUNDS}.",
            stacklevel=3,
        )
    return tau


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
    prior = PriorKind.PER_MODULE if per_module else PriorKind.SHARED
    return TuningResult(TuneMethod.MARGLIK, tau.clone(), at_edge=bool(caught), prior=prior)
