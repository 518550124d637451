"""The linearised (GLM) predictive: ``f ~ N(f(x, θ*), J Σ J^T)`` without Jacobians over all weights.

For a Kronecker block with ``P = G ⊗ A + τI`` (``docs/math.md``, "GLM predictive"): with
``b = Q_A^T ā`` and ``K = J_z f · Q_G``, a Linear layer adds ``K diag(s) K^T`` with
``s_i = Σ_j b_j² / S_ij``; when the layer shares weights over positions (Conv2d, sequences) the
per-point Jacobian ``M_c = Σ_t (J_z f)_{c,t} ā_t^T`` is rotated, ``Q_G^T M_c Q_A``, and divided by
``S``. Diagonal and dense blocks use ``g^T (B + τI)^{-1} g`` on per-point parameter Jacobians.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock, robust_eigh
from ..blocks.kron import vec_to_mat
from ..stats import KronStats, LinearStats, Stats
from ..stats.kron import SharedStats

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


class BlockVariance:
    """The τ-independent part of one block's GLM logit variances at a chunk of points.

    ``diag(J_b (F_b + τI)^{-1} J_bᵀ)`` is a contraction of squared Jacobian coordinates in the
    block's eigenbasis with the inverse damped spectrum ``1/S(τ)``: the coordinates are computed
    once here, and :meth:`__call__` applies ``τ`` (``docs/math.md``, "GLM predictive"). Kronecker
    blocks on rank-one statistics keep ``(J_z f · Q_G)²`` ``[C, B, d_out]`` and
    ``(Q_Aᵀ ā)²`` ``[B, n]``; shared-weight statistics keep ``(Q_Gᵀ M_c Q_A)²``; diagonal and
    dense blocks keep ``(Qᵀ g)²`` per class.
    """

    def __init__(self, st: Stats, block: CurvatureBlock):
        self.block = block
        dtype = block.dtype
        self.left: Tensor
        self.right: Tensor | None = None
        self.evals: Tensor | None = None
        if isinstance(block, KronBlock):
            _, qa, _, qg = block.eigh()
            if isinstance(st, LinearStats):
                self.left = (st.d.to(dtype) @ qg).square_()  # [C, B, o]
                self.right = (st.a.to(dtype) @ qa).square()  # [B, n]
            else:
                if not isinstance(st, KronStats):
                    raise TypeError(f"GLM: block {block.name!r} is Kronecker, its statistics not.")
                self.left = st.rotated_grads(qg, qa).square_()  # [C, B, o, n]
        elif isinstance(block, DiagBlock) and isinstance(st, LinearStats):
            self.left = st.d.to(dtype).square()  # [C, B, o]
            self.right = st.a.to(dtype).square()  # [B, n]
            self.evals = vec_to_mat(
                block.values, st.o, st.n - int(st.bias), st.bias, st.transposed
            )  # [o, n]
        else:
            g = st.grads().to(dtype)
            g = g.reshape(-1, st.num_points, g.shape[-1])  # [C, B, P]
            if isinstance(block, DenseBlock):
                evals, q = block.eigh()
                self.left, self.evals = (g @ q).square(), evals
            elif isinstance(block, DiagBlock):
                self.left, self.evals = g.square(), block.values
            else:
                raise TypeError(f"GLM: no variance rule for {type(block).__name__} blocks.")

    def __call__(self, tau: Tensor) -> Tensor:
        """``[B, C]`` variances of the logits contributed by this block at prior ``τ``."""
        tau = tau.to(self.block.dtype)
        if isinstance(self.block, KronBlock):
            inv = self.block.damped_eigenvalues(tau).reciprocal()  # [o, n]
            if self.right is not None:
                return torch.einsum("cbi,bi->bc", self.left, self.right @ inv.T)
            return torch.einsum("cbij,ij->bc", self.left, inv)
        assert self.evals is not None
        inv = (self.evals + tau).reciprocal()
        if self.right is not None:
            return torch.einsum("cbo,bo->bc", self.left, self.right @ inv.T)
        return torch.einsum("cbp,p->bc", self.left, inv)

    def many(self, taus: Tensor) -> Tensor:
        """``[S, B, C]``: :meth:`__call__` at ``S`` priors ``taus`` at once, one GEMM over the
        stored coordinates (not one pass over them per prior)."""
        taus = taus.to(self.block.dtype)
        if isinstance(self.block, KronBlock):
            spectrum = self.block.damped_eigenvalues()
        else:
            assert self.evals is not None
            spectrum = self.evals
        inv = (spectrum.unsqueeze(0) + taus.reshape(-1, *[1] * spectrum.ndim)).reciprocal()
        if self.right is not None:  # rank-one: left [C, B, o], right [B, n], inv [S, o, n]
            r = torch.einsum("bj,sij->sbi", self.right, inv)
            return torch.einsum("cbi,sbi->sbc", self.left, r)
        c, b = self.left.shape[:2]
        out = self.left.reshape(c * b, -1) @ inv.reshape(inv.shape[0], -1).T  # [C·B, S]
        return out.reshape(c, b, -1).permute(2, 1, 0)


def _position_kernel_is_cheaper(st: SharedStats) -> bool:
    """For one ``τ``: the position-kernel contraction (``N·T²·o·n + V·N·T²·o``) costs fewer
    multiply-adds than forming the rotated gradients (``V·N·T·o·n``) and contracting their
    squares (``2·V·N·o·n``), i.e. roughly ``T < V``: few output positions, many classes."""
    N, V, T, o, n = st.num_points, st.V, st.T, st.o, st.n
    return N * T * T * o * n + V * N * T * T * o < V * N * T * o * n + 2 * V * N * o * n


SLICE_BYTES = 8 << 20
"""Rotated gradients of a shared-weight block are made and contracted this many bytes at a time:
cache-sized temporaries instead of one ``[C, B, o, n]`` tensor (whose first touch, page by page,
cost more than its multiply-adds)."""


def _sliced_rotated_variance(st: SharedStats, qg: Tensor, qa: Tensor, inv: Tensor) -> Tensor:
    """``[B, C]``: ``Σ_ij (Q_Gᵀ M_c Q_A)²_ij W_ij`` from the rotated position factors, a few
    points at a time (:data:`SLICE_BYTES`)."""
    d = (st.d.to(qg.dtype) @ qg).transpose(-1, -2)  # [C, B, o, T]
    a = st.a.to(qa.dtype) @ qa  # [B, T, n]
    c, b = d.shape[:2]
    step = max(1, SLICE_BYTES // max(c * st.o * st.n * d.element_size(), 1))
    out = d.new_empty(b, c)
    for s in range(0, b, step):
        r = torch.matmul(d[:, s : s + step], a[s : s + step]).square_()  # [C, b, o, n]
        out[s : s + step] = torch.einsum("cbij,ij->bc", r, inv)
    return out


def block_variance(st: Stats, block: CurvatureBlock, tau: Tensor) -> Tensor:
    """``[B, C]``: :class:`BlockVariance` at one ``τ``, without keeping squared coordinates.

    A Kronecker block on ``T`` shared positions with ``T`` below the number of directions
    contracts a kernel of the inputs instead: with ``d'_t = Q_Gᵀ δ_t``, ``a'_t = Q_Aᵀ ā_t`` and
    ``W = 1/S(τ)``, ``Σ_ij (Σ_t d'_ti a'_tj)² W_ij = Σ_{t,s,i} d'_ti d'_si K_tsi`` with
    ``K_tsi = Σ_j a'_tj a'_sj W_ij`` (``[T, T, o]`` per point, shared by all directions).
    Otherwise, where the rotated position factors are cheaper than the formed gradients, their
    products are made and contracted a few points at a time (:data:`SLICE_BYTES`).
    """
    if not isinstance(block, KronBlock) or not isinstance(st, SharedStats):
        return BlockVariance(st, block)(tau)
    kernel = _position_kernel_is_cheaper(st)
    if not kernel and not st.factored_rotation_is_cheaper():
        return BlockVariance(st, block)(tau)
    dtype = block.dtype
    _, qa, _, qg = block.eigh()
    inv = block.damped_eigenvalues(tau.to(dtype)).reciprocal()  # [o, n]
    if not kernel:
        return _sliced_rotated_variance(st, qg, qa, inv)
    a = st.a.to(dtype) @ qa  # [B, T, n]
    d = st.d.to(dtype) @ qg  # [C, B, T, o]
    k = (a.unsqueeze(2) * a.unsqueeze(1)) @ inv.T  # [B, T, T, o]
    dk = torch.einsum("cbsi,btsi->cbti", d, k)
    return (dk * d).sum(dim=(2, 3)).T


def total_variance(terms: Sequence[Callable[[Tensor], Tensor]], tau: Tensor) -> Tensor:
    """``[B, C]``: the logit variances of all blocks' terms at ``τ`` (one value per block)."""
    out = terms[0](tau[0])
    for term, t in zip(terms[1:], tau[1:], strict=True):
        out = out + term(t)
    return out


def probit(mean: Tensor, var: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """``softmax(μ / sqrt(1 + π/8 · σ²))`` (the probit / mean-field approximation) from the
    logits' mean ``[B, C]`` and variances ``[B, C]``.

    With a predictive ``temperature`` ``T`` the logits are ``f / T``: mean ``μ/T`` and
    variances ``σ²/T²``.
    """
    t = torch.as_tensor(temperature, dtype=mean.dtype, device=mean.device)
    return torch.softmax((mean / t) / torch.sqrt(1 + math.pi / 8 * var / t.square()), dim=-1)


def sample_logits(mean: Tensor, cov: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``[n, B, C]`` draws of ``f ~ N(mean, cov)`` through a clamped eigendecomposition of cov
    (redone in float64 where it fails to converge, as the blocks' factors are)."""
    evals, evecs, _ = robust_eigh(cov, "GLM logit covariance")
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # [B, C, C]
    eps = torch.randn(n, *mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.einsum("bij,nbj->nbi", root, eps)
