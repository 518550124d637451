"""The GLM predictive of a last layer in closed form: no Jacobian, any number of classes.

When a Linear layer's output *is* the model's logits, ``f = W̄ φ`` with ``φ = [a; 1]`` (the
layer's input, with the bias coordinate), so ``J_W̄ f = I_C ⊗ φᵀ`` and, for the block
``P = G ⊗ A + τI`` with ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``,

    Cov(f) = Q_G diag(s) Q_Gᵀ,    s_i = Σ_j (Q_Aᵀ φ)_j² / (λ_G,i λ_A,j + τ)

(``docs/math.md``, "Last layer in closed form"). A diagonal block ``D`` (``[C, n]`` in the
layout of ``W̄``) gives a diagonal covariance, ``σ²_c = Σ_j φ_j² / (D_cj + τ)``. Memory: the
factors plus ``O(B · (n + C))``; the full covariance (``[B, C, C]``) only when asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, DiagBlock, KronBlock
from ..blocks.kron import vec_to_mat


def has_closed_form(block: CurvatureBlock) -> bool:
    """Kronecker and diagonal blocks have the closed form (dense blocks take the Jacobian path)."""
    return isinstance(block, KronBlock | DiagBlock)


class HeadVariance:
    """The τ-independent closed-form terms of a last-layer block at a chunk of points.

    ``features`` is the layer's input ``a`` ``[B, d_in]`` (the bias coordinate is appended here);
    ``transposed``: the weight is stored ``[d_in, d_out]`` (``Conv1D``), which orders a diagonal
    block's values.
    Kronecker: keeps ``(Q_Aᵀ φ)²`` ``[B, n]``; diagonal: ``φ²``. :meth:`__call__` gives the
    ``[B, C]`` variances at a prior ``τ``, :meth:`covariance` the ``[B, C, C]`` covariance and
    :meth:`sample` draws ``Q_G (√s ⊙ ε)``.
    """

    def __init__(self, features: Tensor, block: CurvatureBlock, transposed: bool = False):
        if not has_closed_form(block):
            raise TypeError(f"GLM: block {block.name!r} has no closed form (a dense block).")
        self.block = block
        phi = features.to(block.dtype).reshape(features.shape[0], -1)
        bias = len(block.param_shapes) == 2
        if bias:
            phi = torch.cat([phi, phi.new_ones((phi.shape[0], 1))], dim=1)
        if isinstance(block, KronBlock):
            _, qa, _, _ = block.eigh()
            self.right = (phi @ qa).square()  # [B, n]
        else:
            self.right = phi.square()
        self.bias = bias
        self.transposed = transposed

    def _scaled(self, tau: Tensor) -> Tensor:
        """``[B, o]``: ``s`` in G's eigenbasis (Kronecker), or the variances themselves (diag)."""
        block, tau = self.block, tau.to(self.block.dtype)
        if isinstance(block, KronBlock):
            inv = block.damped_eigenvalues(tau).reciprocal()  # [o, n]
        else:
            assert isinstance(block, DiagBlock)
            shape = next(iter(block.param_shapes.values()))
            o = shape[-1] if self.transposed else shape[0]
            n = self.right.shape[1]
            values = vec_to_mat(block.values, o, n - int(self.bias), self.bias, self.transposed)
            inv = (values + tau).reciprocal()
        return self.right @ inv.T

    def many(self, taus: Tensor) -> Tensor:
        """``[S, B, C]``: :meth:`__call__` at ``S`` priors at once."""
        return torch.stack([self(t) for t in taus])

    def __call__(self, tau: Tensor) -> Tensor:
        """``[B, C]`` variances of the logits at prior ``τ``: ``(Q_G²) s`` per point."""
        s = self._scaled(tau)
        if isinstance(self.block, KronBlock):
            qg = self.block.eigh()[3]
            return s @ qg.square().T
        return s

    def covariance(self, tau: Tensor) -> Tensor:
        """``[B, C, C]``: ``Q_G diag(s) Q_Gᵀ`` per point (diagonal for a diagonal block)."""
        s = self._scaled(tau)
        if isinstance(self.block, KronBlock):
            qg = self.block.eigh()[3]
            return (qg * s.unsqueeze(1)) @ qg.T
        return torch.diag_embed(s)

    def sample(self, tau: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, B, C]`` zero-mean draws with covariance :meth:`covariance`: ``Q_G (√s ⊙ ε)``."""
        s = self._scaled(tau)
        eps = torch.randn((n, *s.shape), generator=generator, dtype=s.dtype, device=s.device)
        z = eps * s.sqrt()
        if isinstance(self.block, KronBlock):
            return z @ self.block.eigh()[3].T
        return z
