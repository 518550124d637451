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


def log_evidence(
    blocks: list[CurvatureBlock], tau: Tensor, sq_norms: Tensor, log_likelihood: float
) -> Tensor:
    """``log p(D|θ*) − ½Σ τ_b||θ_b||² + ½Σ P_b log τ_b − ½ Σ log det(F_b + τ_b I)``
    (``docs/math.md``, "Laplace evidence"), differentiable in ``tau`` (one value per block)."""
    sizes = torch.tensor([b.num_params for b in blocks], dtype=tau.dtype, device=tau.device)
    return (
        log_likelihood
        - 0.5 * (tau * sq_norms.to(tau.device)).sum()
        + 0.5 * (sizes * tau.log()).sum()
        - 0.5 * logdet_precision(blocks, tau)
    )
