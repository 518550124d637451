"""The linearised (GLM) predictive: ``f ~ N(f(x, θ*), J Σ J^T)`` without Jacobians over all weights.

For a Kronecker block with ``P = G ⊗ A + τI`` (``MATH.md``, "GLM predictive"): with
``b = Q_A^T ā`` and ``K = J_z f · Q_G``, a Linear layer adds ``K diag(s) K^T`` with
``s_i = Σ_j b_j² / S_ij``; when the layer shares weights over positions (Conv2d, sequences) the
per-point Jacobian ``M_c = Σ_t (J_z f)_{c,t} ā_t^T`` is rotated, ``Q_G^T M_c Q_A``, and divided by
``S``. Diagonal and dense blocks use ``g^T (B + τI)^{-1} g`` on per-point parameter Jacobians.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, DiagBlock, KronBlock
from ..blocks.kron import vec_to_mat
from ..curvature._collect import Stats
from ..curvature._stats import KronStats


def block_covariance(st: Stats, block: CurvatureBlock, tau: Tensor) -> Tensor:
    """``[B, C, C]``: this block's contribution ``J_b (F_b + τ I)^{-1} J_b^T`` per point."""
    dtype = block.dtype
    if isinstance(block, KronBlock):
        assert isinstance(st, KronStats)
        _, qa, _, qg = block.eigh()
        inv_s = block.damped_eigenvalues(tau.to(dtype)).reciprocal()  # [o, n]
        c, b = st.V, st.num_points
        if st.m is None and st.T == 1:
            assert st.a is not None and st.d is not None
            a = st.a[:, 0].to(dtype)
            d = st.d[:, :, 0].to(dtype)  # [C, B, o]
            s = (a @ qa).square() @ inv_s.T  # [B, o]
            k = d @ qg  # [C, B, o]
            return torch.einsum("cbi,ebi,bi->bce", k, k, s)
        m = st.per_direction_grads().to(dtype).reshape(c, b, st.o, st.n)
        mt = qg.T @ m @ qa
        return torch.einsum("cbij,ebij,ij->bce", mt, mt, inv_s)
    if isinstance(block, DiagBlock) and isinstance(st, KronStats) and st.m is None and st.T == 1:
        assert st.a is not None and st.d is not None
        d_out, n_in = st.o, st.n
        prec = vec_to_mat(block.values + tau.to(dtype), d_out, n_in - int(st.bias), st.bias)
        s = st.a[:, 0].to(dtype).square() @ prec.reciprocal().T  # [B, o]
        d = st.d[:, :, 0].to(dtype)
        return torch.einsum("cbi,ebi,bi->bce", d, d, s)
    g = st.grads().to(dtype)
    c = g.shape[0] // st.num_points
    g = g.reshape(c, st.num_points, -1)
    return torch.einsum("cbp,ebp->bce", g, block.matpow(g, -1.0, tau.to(dtype)))


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
