"""The linearised (GLM) predictive: ``f ~ N(f(x, θ*), J Σ J^T)`` without Jacobians over all weights.

For a Kronecker block with ``P = G ⊗ A + τI`` (``docs/math.md``, "GLM predictive"): with
``b = Q_A^T ā`` and ``K = J_z f · Q_G``, a Linear layer adds ``K diag(s) K^T`` with
``s_i = Σ_j b_j² / S_ij``; when the layer shares weights over positions (Conv2d, sequences) the
per-point Jacobian ``M_c = Σ_t (J_z f)_{c,t} ā_t^T`` is rotated, ``Q_G^T M_c Q_A``, and divided by
``S``. Diagonal and dense blocks use ``g^T (B + τI)^{-1} g`` on per-point parameter Jacobians.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..blocks import CurvatureBlock
from ..stats import Stats

Chunk = tuple[dict[str, Stats], Tensor]
"""One chunk of points: per-module Jacobian statistics (directions ``e_c``) and MAP logits."""


def block_covariance(st: Stats, block: CurvatureBlock, tau: Tensor) -> Tensor:
    """``[B, C, C]``: this block's contribution ``J_b (F_b + τ I)^{-1} J_b^T`` per point."""
    return st.quad(block, power=-1.0, damping=tau.to(block.dtype))


def glm_moments(
    chunks: list[Chunk], blocks: dict[str, CurvatureBlock], tau: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean ``[B, C]`` and covariance ``[B, C, C]`` of the linearised logits over all chunks,
    with ``τ`` one value per block (block order); nothing here depends on ``τ`` but the sum."""
    means, covs = [], []
    for stats, logits in chunks:
        cov: Tensor | None = None
        for (name, block), t in zip(blocks.items(), tau, strict=True):
            c = block_covariance(stats[name], block, t)
            cov = c if cov is None else cov + c
        assert cov is not None
        means.append(logits.to(cov.dtype))
        covs.append(cov)
    return torch.cat(means), torch.cat(covs)


def probit(mean: Tensor, cov: Tensor) -> Tensor:
    """``softmax(μ / sqrt(1 + π/8 · diag Σ))`` (the probit / mean-field approximation)."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=-1)


def sample_logits(mean: Tensor, cov: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``[n, B, C]`` draws of ``f ~ N(mean, cov)`` through a clamped eigendecomposition of cov."""
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # [B, C, C]
    eps = torch.randn(n, *mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.einsum("bij,nbj->nbi", root, eps)
