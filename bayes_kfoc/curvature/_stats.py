"""Per-batch statistics of one module, and the sums every structure needs from them.

Conventions (``MATH.md``): a Kronecker-capable module has, per point ``n``, inputs ``ā_{n,t}``
(``[T, n]``, bias as the last homogeneous coordinate; ``T = 1`` for a plain Linear layer,
``T`` = output positions for Conv2d) and directions ``δ_{n,v,t}`` (``[V, T, d_out]``). Its
per-direction gradient is ``M_{n,v} = Σ_t δ_{n,v,t} ā_{n,t}^T`` (``d_out x n``), and the Fisher
block is ``Σ_{n,v} vec(M)vec(M)^T`` in the row-major vec of ``W̄``, i.e. ``Σ_n B_n ⊗ ā ā^T``
when ``T = 1``. All sums are over points (summed Fisher), never averaged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, KronBlock
from ..blocks.kron import mat_to_vec


def sym_tmm(x: Tensor, y: Tensor, panel: int = 256) -> Tensor:
    """``x.T @ y`` for 2-D ``x``, ``y`` whose product is known to be symmetric (a weighted Gram
    matrix): only the block-lower triangle is multiplied, in column panels of width ``panel``,
    and mirrored. For ``m`` output columns that is ``(b + 1) / 2b`` of the flops with
    ``b = ⌈m / panel⌉`` panels (62% at ``m = 1024``); below two panels it is one plain GEMM.
    """
    m = x.shape[1]
    if m < 2 * panel:
        return x.T @ y
    out = x.new_empty(m, m)
    for start in range(0, m, panel):
        stop = min(start + panel, m)
        block = x[:, start:].T @ y[:, start:stop]  # rows start.., columns start:stop
        out[start:, start:stop] = block
        out[start:stop, start:] = block.T
    return out


class KronStats:
    """Statistics of a Linear / Conv2d module for one batch.

    Args:
        a: ``[N, T, n]`` inputs with the homogeneous coordinate appended when there is a bias.
        d: ``[V, N, T, d_out]`` output directions.
        bias: whether the last input coordinate is the bias's.
    """

    def __init__(self, a: Tensor, d: Tensor, bias: bool):
        self.bias = bias
        self.num_points = a.shape[0]
        self.T = a.shape[1]
        self.n = a.shape[2]
        self.V = d.shape[0]
        self.o = d.shape[-1]
        self.a: Tensor | None = a
        self.d: Tensor | None = d
        self.m: Tensor | None = None

    def compact(self, cache_m: bool | None = None) -> KronStats:
        """Keep ``M`` (``[V·N, d_out, n]``) instead of ``a``/``d`` when that makes K-FOC cheaper.

        ``cache_m=None`` decides by the flop count of one iteration; only matters when ``T > 1``.
        Call :meth:`kfac_sums` first: it needs ``a`` and ``d``.
        """
        if cache_m is None:
            cache_m = self._m_flops() < self._unfold_flops()
        if cache_m and self.T > 1 and self.m is None:
            self.m = self._build_m()
            self.a = self.d = None
        return self

    # -- cost model (flops of one full K-FOC iteration) ---------------------------------------
    def _m_flops(self) -> int:
        k, o, n = self.V * self.num_points, self.o, self.n
        return 4 * k * o * n * (o + n)

    def _unfold_flops(self) -> int:
        N, V, T, o, n = self.num_points, self.V, self.T, self.o, self.n
        return N * (2 * V * (2 * T * o * o + 2 * T * T * o) + 2 * (2 * T * T * n + 2 * T * n * n))

    def _build_m(self) -> Tensor:
        assert self.a is not None and self.d is not None
        return torch.einsum("vnto,nti->vnoi", self.d, self.a).reshape(-1, self.o, self.n)

    def per_direction_grads(self) -> Tensor:
        """``M`` as ``[V·N, d_out, n]`` (formed on demand when not cached)."""
        if self.m is not None:
            return self.m
        if self.T == 1:
            assert self.a is not None and self.d is not None
            d, a = self.d[:, :, 0], self.a[:, 0]
            return (d.unsqueeze(-1) * a.unsqueeze(0).unsqueeze(-2)).reshape(-1, self.o, self.n)
        return self._build_m()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.d, self.m) if t is not None)

    @property
    def a_dtype_size(self) -> int:
        """Bytes per element of the statistics (and so of the factors)."""
        t = self.a if self.a is not None else self.m
        assert t is not None
        return t.element_size()

    # -- K-FAC ----------------------------------------------------------------------------------
    def kfac_sums(self, with_g: bool = True) -> tuple[Tensor, Tensor, int]:
        """``(Σ_{n,t} ā ā^T, Σ_{n,v,t} δ δ^T, N·T)``; call before ``M`` replaces ``a``/``d``.

        ``with_g=False`` returns zeros for the second sum (K-FOC's Lanczos solver does not use it).
        """
        assert self.a is not None and self.d is not None
        a = self.a.reshape(-1, self.n)
        if not with_g:
            return sym_tmm(a, a), a.new_zeros(self.o, self.o), self.num_points * self.T
        d = self.d.reshape(-1, self.o)
        return sym_tmm(a, a), sym_tmm(d, d), self.num_points * self.T

    # -- K-FOC power-iteration updates ------------------------------------------------------------
    def a_update(self, G: Tensor) -> Tensor:
        """``Σ_{n,v} M^T G M`` (``= Σ_n ā ā^T ⟨G, B_n⟩`` when ``T = 1``)."""
        if self.m is not None:
            gm = torch.matmul(G, self.m)
            return sym_tmm(self.m.reshape(-1, self.n), gm.reshape(-1, self.n))
        assert self.a is not None and self.d is not None
        if self.T == 1:
            d, a = self.d[:, :, 0], self.a[:, 0]
            w = ((d @ G) * d).sum(dim=(0, 2))
            return sym_tmm(a, a * w.unsqueeze(1))
        kmat = torch.einsum("vnto,vnso->nts", self.d @ G, self.d)
        return sym_tmm(self.a.reshape(-1, self.n), (kmat @ self.a).reshape(-1, self.n))

    def g_update(self, A: Tensor) -> Tensor:
        """``Σ_{n,v} M A M^T`` (``= Σ_n B_n (ā^T A ā)`` when ``T = 1``)."""
        if self.m is not None:
            ma = torch.matmul(self.m, A)
            return torch.einsum("koi,kpi->op", ma, self.m)
        assert self.a is not None and self.d is not None
        if self.T == 1:
            d, a = self.d[:, :, 0], self.a[:, 0]
            u = ((a @ A) * a).sum(dim=1)
            dd = d.reshape(-1, self.o)
            return sym_tmm(dd, (d * u.unsqueeze(-1)).reshape(-1, self.o))
        lmat = (self.a @ A) @ self.a.transpose(1, 2)  # [N, T, T]
        ld = torch.matmul(lmat, self.d)  # [V, N, T, o]
        return sym_tmm(self.d.reshape(-1, self.o), ld.reshape(-1, self.o))

    # -- diagonal, dense and Frobenius quantities -------------------------------------------------
    def diag(self) -> Tensor:
        """The exact Fisher diagonal, ``[P]`` in ``parameters_to_vector`` order."""
        if self.m is None and self.T == 1:
            assert self.a is not None and self.d is not None
            d2 = self.d[:, :, 0].square().sum(0)  # [N, o]
            return mat_to_vec(d2.T @ self.a[:, 0].square(), self.bias)
        return mat_to_vec(self.per_direction_grads().square().sum(0), self.bias)

    def grads(self) -> Tensor:
        """Per-direction gradients ``[V·N, P]`` in ``parameters_to_vector`` order."""
        return mat_to_vec(self.per_direction_grads(), self.bias)

    def inner(self, block: CurvatureBlock) -> Tensor:
        """``⟨F_batch, K⟩_F = Σ_k g_k^T K g_k`` without forming ``F`` (``K`` any block)."""
        if isinstance(block, KronBlock):
            if self.m is None and self.T == 1:
                assert self.a is not None and self.d is not None
                d, a = self.d[:, :, 0], self.a[:, 0]
                w = ((d @ block.G) * d).sum(dim=(0, 2))
                u = ((a @ block.A) * a).sum(dim=1)
                return (w * u).sum()
            m = self.per_direction_grads()
            return (m * (block.G @ m @ block.A)).sum()
        g = self.grads()
        return (g * block.matvec(g)).sum()

    def gram_cross(self, other: KronStats) -> Tensor:
        """``Σ_{k∈self, l∈other} ⟨g_k, g_l⟩²``: one chunk of ``||F||_F²`` (``MATH.md``)."""
        if self.T == 1 and other.T == 1 and self.m is None and other.m is None:
            assert self.a is not None and self.d is not None
            assert other.a is not None and other.d is not None
            ga = (self.a[:, 0] @ other.a[:, 0].T).square()  # [N1, N2]
            d1 = self.d[:, :, 0].reshape(-1, self.o)
            d2 = other.d[:, :, 0].reshape(-1, self.o)
            gd = (d1 @ d2.T).square().reshape(self.V, self.num_points, other.V, other.num_points)
            return (ga * gd.sum(dim=(0, 2))).sum()
        g1 = self.per_direction_grads().flatten(1)
        g2 = other.per_direction_grads().flatten(1)
        return (g1 @ g2.T).square().sum()


class GradStats:
    """Per-direction parameter gradients ``[V, N, P]`` of a generic module (diag/dense only)."""

    def __init__(self, g: Tensor):
        self.g = g
        self.num_points = g.shape[1]

    @property
    def nbytes(self) -> int:
        return self.g.numel() * self.g.element_size()

    def diag(self) -> Tensor:
        return self.g.square().sum(dim=(0, 1))

    def grads(self) -> Tensor:
        return self.g.reshape(-1, self.g.shape[-1])

    def inner(self, block: CurvatureBlock) -> Tensor:
        g = self.grads()
        return (g * block.matvec(g)).sum()

    def gram_cross(self, other: GradStats) -> Tensor:
        return (self.grads() @ other.grads().T).square().sum()
