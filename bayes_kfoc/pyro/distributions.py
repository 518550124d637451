"""A matrix-normal distribution with Kronecker precision and exact damping.

Conventions (``docs/math.md``, "Kronecker posterior with exact damping"):

- The event is a matrix ``X`` of shape ``(d_out, n)``. For a layer's posterior it is
  ``W̄ = [W b]``: the weight flattened to ``d_out x d_in`` (Conv2d: ``weight.flatten(1)``) with the
  bias appended as the **last column** (so ``n = d_in + 1`` with a bias).
- The precision acts on the **row-major** vec of ``X`` (PyTorch's ``flatten()``):
  ``P = G ⊗ A + τ I``, output factor ``G`` (``d_out x d_out``) first, input factor ``A``
  (``n x n``) second, ``τ > 0`` the damping (for a Laplace posterior: the prior precision added
  to the **summed** Fisher).
- Everything goes through the eigendecompositions ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``
  with ``S = λ_G λ_Aᵀ + τ`` (shape ``d_out x n``); no Kronecker product is formed, and the damping
  is exact (not split between the factors).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions.utils import lazy_property

from ..blocks import robust_eigh

__all__ = ["KroneckerMatrixNormal"]

_Shape = torch.Size | list[int] | tuple[int, ...]
_EMPTY = torch.Size()


def _sandwich(left: Tensor, x: Tensor, right: Tensor) -> Tensor:
    """``left @ x @ right`` for ``x`` of shape ``[..., m, k]`` (matrices broadcast)."""
    return torch.matmul(torch.matmul(left, x), right)


class KroneckerMatrixNormal(dist.TorchDistribution):
    r"""A matrix normal ``X ~ N(M, P^{-1})`` with ``P = G ⊗ A + τ I`` on the row-major vec of ``X``.

    With ``S = λ_G λ_Aᵀ + τ`` and ``Z = Q_Gᵀ (X − M) Q_A``:

    .. math::

        \log q(X) = -\tfrac{d}{2}\log 2\pi + \tfrac12 \sum_{ij} \log S_{ij}
                    - \tfrac12 \sum_{ij} S_{ij} Z_{ij}^2,
        \qquad X = M + Q_G (E ⊘ \sqrt{S}) Q_Aᵀ,\; E_{ij} \sim N(0, 1).

    ``event_shape`` is ``(d_out, n)``; ``batch_shape`` is the broadcast of the leading dimensions
    of ``loc`` (``[..., d_out, n]``), of the eigen-decompositions (``[..., n]``, ``[..., n, n]``,
    ``[..., d_out]``, ``[..., d_out, d_out]``) and of ``damping`` (``[...]``).

    Args:
        loc: the mean ``M``, ``[..., d_out, n]`` (bias as the last column for a layer).
        input_eigenvalues: ``λ_A``, ``[..., n]``, non-negative.
        input_eigenvectors: ``Q_A``, ``[..., n, n]``, orthogonal (columns are eigenvectors).
        output_eigenvalues: ``λ_G``, ``[..., d_out]``, non-negative.
        output_eigenvectors: ``Q_G``, ``[..., d_out, d_out]``, orthogonal.
        damping: ``τ > 0``, a scalar or ``[...]``: added exactly to every eigenvalue of ``G ⊗ A``.
        validate_args: as in :class:`torch.distributions.Distribution`.

    Use :meth:`from_factors` to start from the factors ``A`` and ``G`` themselves, and
    :meth:`from_block` for a :class:`~bayes_kfoc.KronBlock`.

    .. warning:: The vec order is **row-major** (``G ⊗ A``, output factor first), as
       ``W.flatten()``; the papers' column-stacking writes the same precision ``A ⊗ G``.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.independent(constraints.real, 2),
        "input_eigenvalues": constraints.independent(constraints.nonnegative, 1),
        "input_eigenvectors": constraints.independent(constraints.real, 2),
        "output_eigenvalues": constraints.independent(constraints.nonnegative, 1),
        "output_eigenvectors": constraints.independent(constraints.real, 2),
        "damping": constraints.positive,
    }
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        input_eigenvalues: Tensor,
        input_eigenvectors: Tensor,
        output_eigenvalues: Tensor,
        output_eigenvectors: Tensor,
        damping: float | Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if loc.ndim < 2:
            raise ValueError(
                f"KroneckerMatrixNormal: loc must be [..., d_out, n], got shape {tuple(loc.shape)}."
            )
        d_out, n = int(loc.shape[-2]), int(loc.shape[-1])
        checks = {
            "input_eigenvalues": (input_eigenvalues, (n,)),
            "input_eigenvectors": (input_eigenvectors, (n, n)),
            "output_eigenvalues": (output_eigenvalues, (d_out,)),
            "output_eigenvectors": (output_eigenvectors, (d_out, d_out)),
        }
        for what, (t, trailing) in checks.items():
            if tuple(t.shape[t.ndim - len(trailing) :]) != trailing or t.ndim < len(trailing):
                raise ValueError(
                    f"KroneckerMatrixNormal: {what} must end in {list(trailing)} to match loc "
                    f"[..., {d_out}, {n}], got shape {tuple(t.shape)}."
                )
        damping_t = torch.as_tensor(damping, dtype=loc.dtype, device=loc.device)
        self.loc = loc
        self.input_eigenvalues = input_eigenvalues
        self.input_eigenvectors = input_eigenvectors
        self.output_eigenvalues = output_eigenvalues
        self.output_eigenvectors = output_eigenvectors
        self.damping = damping_t
        batch_shape = torch.broadcast_shapes(
            loc.shape[:-2],
            input_eigenvalues.shape[:-1],
            input_eigenvectors.shape[:-2],
            output_eigenvalues.shape[:-1],
            output_eigenvectors.shape[:-2],
            damping_t.shape,
        )
        super().__init__(batch_shape, torch.Size((d_out, n)), validate_args=validate_args)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_factors(
        cls, loc: Tensor, A: Tensor, G: Tensor, damping: float | Tensor, **kwargs: Any
    ) -> KroneckerMatrixNormal:
        """From the (symmetric PSD) factors ``A`` (``[n, n]``, input) and ``G`` (output)."""
        la, qa, _ = robust_eigh(0.5 * (A + A.transpose(-1, -2)), "KroneckerMatrixNormal: A")
        lg, qg, _ = robust_eigh(0.5 * (G + G.transpose(-1, -2)), "KroneckerMatrixNormal: G")
        return cls(loc, la.clamp_min(0), qa, lg.clamp_min(0), qg, damping, **kwargs)

    @classmethod
    def from_block(
        cls, block: Any, loc: Tensor, damping: float | Tensor, **kwargs: Any
    ) -> KroneckerMatrixNormal:
        """From a :class:`~bayes_kfoc.KronBlock` (its cached, PSD-clamped eigendecompositions).

        ``loc`` is ``W̄*`` of shape ``[..., d_out, n]``; ``block.to_mat`` turns a
        ``parameters_to_vector``-ordered vector into it.
        """
        la, qa, lg, qg = block.eigh()
        return cls(loc, la, qa, lg, qg, damping, **kwargs)

    # -- shapes ---------------------------------------------------------------------------------
    def expand(self, batch_shape: _Shape, _instance: Any = None) -> KroneckerMatrixNormal:
        new = self._get_checked_instance(KroneckerMatrixNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.input_eigenvalues = self.input_eigenvalues
        new.input_eigenvectors = self.input_eigenvectors
        new.output_eigenvalues = self.output_eigenvalues
        new.output_eigenvectors = self.output_eigenvectors
        new.damping = self.damping
        super(KroneckerMatrixNormal, new).__init__(batch_shape, self.event_shape, False)
        new._validate_args = self._validate_args
        return new

    # -- spectrum -------------------------------------------------------------------------------
    @lazy_property
    def damped_eigenvalues(self) -> Tensor:
        """``S = λ_G λ_Aᵀ + τ``, ``[..., d_out, n]``: the eigenvalues of the precision."""
        s = self.output_eigenvalues.unsqueeze(-1) * self.input_eigenvalues.unsqueeze(-2)
        return s + self.damping.unsqueeze(-1).unsqueeze(-1)

    @property
    def mean(self) -> Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def mode(self) -> Tensor:
        return self.mean

    @property
    def variance(self) -> Tensor:
        """Marginal variances ``[..., d_out, n]``: ``(Q_G ⊙ Q_G) S^{-1} (Q_A ⊙ Q_A)ᵀ``."""
        var = _sandwich(
            self.output_eigenvectors.square(),
            self.damped_eigenvalues.reciprocal(),
            self.input_eigenvectors.square().transpose(-1, -2),
        )
        return var.expand(self.batch_shape + self.event_shape)

    @property
    def precision_matrix(self) -> Tensor:
        """The dense ``[..., d, d]`` precision in row-major vec order (small events only)."""
        q = self._kron_eigenvectors()
        return (q * self.damped_eigenvalues.flatten(-2).unsqueeze(-2)) @ q.transpose(-1, -2)

    @property
    def covariance_matrix(self) -> Tensor:
        """The dense ``[..., d, d]`` covariance in row-major vec order (small events only)."""
        q = self._kron_eigenvectors()
        inv = self.damped_eigenvalues.reciprocal().flatten(-2).unsqueeze(-2)
        return (q * inv) @ q.transpose(-1, -2)

    def _kron_eigenvectors(self) -> Tensor:
        """``Q_G ⊗ Q_A``: column ``(k, l)`` is the eigenvector of ``S[k, l]`` (row-major)."""
        d_out, n = self.event_shape
        q = torch.einsum("...ik,...jl->...ijkl", self.output_eigenvectors, self.input_eigenvectors)
        q = q.reshape(*q.shape[:-4], d_out * n, d_out * n)
        return q.expand(self.batch_shape + q.shape[-2:])

    # -- sampling and density -------------------------------------------------------------------
    def rsample(self, sample_shape: _Shape = _EMPTY) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        white = eps * self.damped_eigenvalues.rsqrt()
        return self.loc + _sandwich(
            self.output_eigenvectors, white, self.input_eigenvectors.transpose(-1, -2)
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        s = self.damped_eigenvalues
        z = _sandwich(
            self.output_eigenvectors.transpose(-1, -2), value - self.loc, self.input_eigenvectors
        )
        d = self.event_shape.numel()
        maha = (z.square() * s).sum((-2, -1))
        return -0.5 * d * math.log(2 * math.pi) + 0.5 * s.log().sum((-2, -1)) - 0.5 * maha

    def entropy(self) -> Tensor:
        d = self.event_shape.numel()
        h = 0.5 * d * (1.0 + math.log(2 * math.pi)) - 0.5 * self.damped_eigenvalues.log().sum(
            (-2, -1)
        )
        return h.expand(self.batch_shape)
