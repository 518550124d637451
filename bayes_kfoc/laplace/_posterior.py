"""Posterior precision blocks ``P_b = F_b + τ_b I`` and their exact sampling and log-determinants.

Every block is handled through its eigendecomposition (Kronecker: both factors), with exact
damping; no Kronecker product and no dense precision is ever formed for Kronecker blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks import CurvatureBlock


def logdet_precision(blocks: list[CurvatureBlock], tau: Tensor) -> Tensor:
    """``Σ_b log det(F_b + τ_b I)``, differentiable in ``τ`` (``tau``: one value per block)."""
    total = tau.new_zeros(())
    for b, t in zip(blocks, tau, strict=True):
        lam = b.eigenvalues().to(tau.dtype)
        total = total + torch.log(lam + t).sum()
    return total


def sample_blocks(
    blocks: list[CurvatureBlock], tau: Tensor, n: int, generator: torch.Generator | None
) -> list[Tensor]:
    """Per block ``[n, P_b]`` draws from ``N(0, P_b^{-1})``, through each block's eigenbasis."""
    return [b.sample(n, t.to(b.dtype), generator) for b, t in zip(blocks, tau, strict=True)]
