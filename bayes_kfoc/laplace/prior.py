"""The isotropic Gaussian prior ``N(0, τ_b^{-1} I)`` per posterior block, and the one place where
every accepted spelling of ``τ`` is turned into a vector in block order.

``τ`` acts on the **summed** log-likelihood scale (``docs/math.md``, "Scales people get wrong"):
a model trained with weight decay ``λ`` on a mean loss over ``N`` points has ``τ = N·λ``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

PriorPrecision = float | Tensor | Mapping[str, float]
"""A scalar (shared by every block), one value per block (a tensor in block order), or
``{module_name: τ}``."""


def check_prior_precision(tau: Tensor, what: str = "prior_precision") -> Tensor:
    """Raise unless every ``τ`` is positive and finite; returns ``tau``."""
    if not bool(torch.isfinite(tau).all()) or bool((tau <= 0).any()):
        raise ValueError(
            f"Laplace: {what} must be positive and finite, got {tau.tolist()}; the prior is "
            "N(0, 1/τ), so τ > 0."
        )
    return tau


def prior_precision_vector(
    value: PriorPrecision, blocks: Sequence[str], what: str = "Laplace: prior_precision"
) -> Tensor:
    """``τ`` as a float64 CPU vector with one entry per block, in the order of ``blocks``.

    Args:
        value: a scalar, a tensor with one value per block (block order), or a mapping
            ``{module_name: τ}`` naming every block exactly once.
        blocks: the posterior's block (module) names, in block order.
        what: the prefix of error messages (the caller and argument).
    """
    names = list(blocks)
    n = len(names)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names unknown module(s) {unknown}; the blocks are {names}.")
        missing = sorted(set(names) - set(value))
        if missing:
            raise ValueError(f"{what} lacks module(s) {missing}; the blocks are {names}.")
        tau = torch.tensor([float(value[k]) for k in names], dtype=torch.float64)
    else:
        tau = torch.as_tensor(value, dtype=torch.float64).detach().flatten().cpu()
        if tau.numel() == 1:
            tau = tau.expand(n).clone()
        elif tau.numel() != n:
            raise ValueError(
                f"{what} has {tau.numel()} values but there are {n} blocks ({names}); pass a "
                "scalar, one value per block, or a dict {module: τ}."
            )
    return check_prior_precision(tau, what.rpartition(": ")[2] or "prior_precision")


def scaled_prior_base(sq_norms: Tensor, sizes: Tensor) -> Tensor:
    """``P_b / ||θ*_b||²`` per block: the precision of an isotropic Gaussian whose mean squared
    weight equals the block's MAP (float64).

    The scaled prior ``τ_b = s · P_b / ||θ*_b||²`` is equivariant to a block's scale: weights
    that precede a normalisation (BatchNorm, LayerNorm) can be rescaled by ``c`` without changing
    the network, which scales their Fisher by ``1/c²``, and ``τ_b`` scales the same way, so the
    posterior's predictive does not depend on that arbitrary scale. A block whose weights are
    all zero falls back to the whole network's ``P / ||θ*||²``.
    """
    sq = sq_norms.double()
    size = sizes.to(sq)
    overall = size.sum() / sq.sum().clamp_min(torch.finfo(torch.float64).tiny)
    base = size / sq.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(sq > 0, base, overall)
