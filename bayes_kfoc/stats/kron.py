"""Per-batch statistics of a Kronecker-capable module (Linear, Conv2d), and what every consumer
needs from them: K-FAC sums, K-FOC's two matrix-free maps, the exact diagonal, per-direction
gradients, quadratic forms against any block, and chunks of ``||F||_F²``.

Conventions (``docs/math.md``, "Notation" and "K-FOC"): per point ``n`` the module has inputs
``ā_{n,t}`` (``[T, n]``, bias as the last homogeneous coordinate; ``T = 1`` for a plain Linear
layer, ``T`` = positions for Conv2d or sequences) and directions ``δ_{n,v,t}`` (``[V, T, d_out]``).
Its per-direction gradient is ``M_{n,v} = Σ_t δ_{n,v,t} ā_{n,t}^T`` (``d_out x n``), and the
Fisher block is ``Σ_{n,v} vec(M)vec(M)^T`` in the row-major vec of ``W̄``, i.e.
``Σ_n B_n ⊗ ā ā^T`` when ``T = 1``. All sums are over points (summed Fisher), never averaged.

Three representations, one interface (:class:`KronStats`):

- :class:`LinearStats`: ``T = 1``, the rank-one form ``a [N, n]``, ``d [V, N, d_out]``;
- :class:`SharedStats`: ``T > 1``, ``a [N, T, n]``, ``d [V, N, T, d_out]``;
- :class:`GradientStats`: the per-direction gradients ``M`` ``[V·N, d_out, n]``.

The first two are what a batch produces (:func:`kron_stats`) and give K-FAC's sums;
:meth:`KronStats.compact` returns the representation that makes K-FOC's maps cheapest
(a :class:`GradientStats` when forming ``M`` once beats the unfold), without changing ``self``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, DiagBlock, KronBlock
from ..blocks.kron import mat_to_vec, vec_to_mat


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


def _is_identity_power(power: float, damping: float | Tensor) -> bool:
    """``(B + δI)^p`` is ``B`` itself: no eigendecomposition needed."""
    return power == 1.0 and not bool(torch.as_tensor(damping).ne(0).any())


def _spectrum_power(block: KronBlock, power: float, damping: float | Tensor) -> Tensor:
    """``S^p`` with ``S = λ_G λ_A^T + δ`` (``[d_out, n]``), in the block's dtype."""
    s = block.damped_eigenvalues(torch.as_tensor(damping, dtype=block.dtype))
    return s.reciprocal() if power == -1.0 else s.pow(power)


def grads_quad(
    g: Tensor,
    num_points: int,
    block: CurvatureBlock,
    power: float,
    damping: float | Tensor,
    diagonal: bool,
) -> Tensor:
    """Quadratic forms from explicit per-direction gradients ``g`` (``[V·N, P]``)."""
    dtype = block.dtype
    g = g.to(dtype).reshape(-1, num_points, g.shape[-1])
    if _is_identity_power(power, damping):
        kg = block.matvec(g)
    else:
        kg = block.matpow(g, power, torch.as_tensor(damping, dtype=dtype))
    return torch.einsum("cbp,cbp->bc" if diagonal else "cbp,ebp->bce", g, kg)


@dataclass(frozen=True)
class KfacSums:
    """K-FAC's sums over one batch: ``Σ_{n,t} ā ā^T``, ``Σ_{n,v,t} δ δ^T`` (``None`` when not
    asked for) and the count ``N·T`` that averages the first."""

    a: Tensor
    g: Tensor | None
    count: int


class KronStats(ABC):
    """Statistics of one batch of a Linear / Conv2d module (see the module docstring).

    Attributes:
        bias: whether the last input coordinate is the bias's.
        num_points: ``N``, points in the batch.
        V: directions per point; ``n``: input size (with bias); ``o``: output size ``d_out``.
    """

    bias: bool
    transposed: bool = False  # the weight is stored [d_in, d_out] (see blocks.kron.vec_to_mat)
    num_points: int
    V: int
    n: int
    o: int

    @property
    @abstractmethod
    def tensors(self) -> tuple[Tensor, ...]: ...

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def element_size(self) -> int:
        """Bytes per element of the statistics (and so of the factors)."""
        return self.tensors[0].element_size()

    def compact(self, cache_m: bool | None = None) -> KronStats:
        """The representation that makes K-FOC's maps cheapest (``self`` unless ``M`` wins)."""
        return self

    @abstractmethod
    def per_direction_grads(self) -> Tensor:
        """``M`` as ``[V·N, d_out, n]`` (formed on demand when not held)."""

    @abstractmethod
    def a_update(self, G: Tensor) -> Tensor:
        """``Σ_{n,v} M^T G M`` (``= Σ_n ā ā^T ⟨G, B_n⟩`` when ``T = 1``)."""

    @abstractmethod
    def g_update(self, A: Tensor) -> Tensor:
        """``Σ_{n,v} M A M^T`` (``= Σ_n B_n (ā^T A ā)`` when ``T = 1``)."""

    def diag(self) -> Tensor:
        """The exact Fisher diagonal, ``[P]`` in ``parameters_to_vector`` order."""
        return mat_to_vec(self.per_direction_grads().square().sum(0), self.bias, self.transposed)

    def rotated_grads(self, qg: Tensor, qa: Tensor) -> Tensor:
        """``Q_Gᵀ M Q_A`` per direction and point, ``[V, N, d_out, n]``: the per-direction
        gradients in a Kronecker block's eigenbasis (``qg`` ``[d_out, d_out]``, ``qa``
        ``[n, n]``), in ``qg``'s dtype."""
        m = self.per_direction_grads().to(qg.dtype).reshape(self.V, self.num_points, self.o, -1)
        return qg.T @ m @ qa

    def grads(self) -> Tensor:
        """Per-direction gradients ``[V·N, P]`` in ``parameters_to_vector`` order."""
        return mat_to_vec(self.per_direction_grads(), self.bias, self.transposed)

    def quad(
        self,
        block: CurvatureBlock,
        power: float = 1.0,
        damping: float | Tensor = 0.0,
        diagonal: bool = False,
    ) -> Tensor:
        """``g_{n,v}^T (K + δI)^p g_{n,w}`` per point: ``[N, V, V]`` (``[N, V]`` if ``diagonal``).

        ``K`` is any block of this module (in its dtype). With the Jacobian directions ``e_c``
        and ``p = −1``, ``δ = τ`` this is the block's GLM logit covariance
        ``J_b (F_b + τI)^{-1} J_b^T``; with ``p = 1``, ``δ = 0`` its trace is ``⟨F_batch, K⟩_F``.
        """
        dtype = block.dtype
        if isinstance(block, KronBlock):
            m = self.per_direction_grads().to(dtype).reshape(self.V, self.num_points, self.o, -1)
            eq = "cbij,cbij->bc" if diagonal else "cbij,ebij->bce"
            if _is_identity_power(power, damping):
                return torch.einsum(eq, m, block.G @ m @ block.A)
            _, qa, _, qg = block.eigh()
            mt = self.rotated_grads(qg, qa)
            eq = "cbij,cbij,ij->bc" if diagonal else "cbij,ebij,ij->bce"
            return torch.einsum(eq, mt, mt, _spectrum_power(block, power, damping))
        return grads_quad(self.grads(), self.num_points, block, power, damping, diagonal)

    def inner(self, block: CurvatureBlock) -> Tensor:
        """``⟨F_batch, K⟩_F = Σ_k g_k^T K g_k`` without forming ``F`` (``K`` any block)."""
        return self.quad(block, diagonal=True).sum()

    def gram_cross(self, other: KronStats) -> Tensor:
        """``Σ_{k∈self, l∈other} ⟨g_k, g_l⟩²``: one chunk of ``||F||_F²`` (``docs/math.md``,
        "Certificate")."""
        g1 = self.per_direction_grads().flatten(1)
        g2 = other.per_direction_grads().flatten(1)
        return (g1 @ g2.T).square().sum()


class LinearStats(KronStats):
    """``T = 1``: inputs ``a [N, n]`` and directions ``d [V, N, d_out]`` (rank-one gradients)."""

    def __init__(self, a: Tensor, d: Tensor, bias: bool):
        self.a, self.d, self.bias = a, d, bias
        self.num_points, self.n = a.shape
        self.V, self.o = d.shape[0], d.shape[-1]

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return (self.a, self.d)

    def kfac_sums(self, with_g: bool = True, reduce: bool = False) -> KfacSums:
        dd = self.d.reshape(-1, self.o)
        return KfacSums(
            sym_tmm(self.a, self.a), sym_tmm(dd, dd) if with_g else None, self.num_points
        )

    def per_direction_grads(self) -> Tensor:
        m = self.d.unsqueeze(-1) * self.a.unsqueeze(0).unsqueeze(-2)
        return m.reshape(-1, self.o, self.n)

    def a_update(self, G: Tensor) -> Tensor:
        w = ((self.d @ G) * self.d).sum(dim=(0, 2))
        return sym_tmm(self.a, self.a * w.unsqueeze(1))

    def g_update(self, A: Tensor) -> Tensor:
        u = ((self.a @ A) * self.a).sum(dim=1)
        dd = self.d.reshape(-1, self.o)
        return sym_tmm(dd, (self.d * u.unsqueeze(-1)).reshape(-1, self.o))

    def diag(self) -> Tensor:
        d2 = self.d.square().sum(0)  # [N, o]
        return mat_to_vec(d2.T @ self.a.square(), self.bias, self.transposed)

    def quad(
        self,
        block: CurvatureBlock,
        power: float = 1.0,
        damping: float | Tensor = 0.0,
        diagonal: bool = False,
    ) -> Tensor:
        dtype = block.dtype
        eq = "cbi,cbi,bi->bc" if diagonal else "cbi,ebi,bi->bce"
        a, d = self.a.to(dtype), self.d.to(dtype)
        if isinstance(block, KronBlock):
            if _is_identity_power(power, damping):
                u = ((a @ block.A) * a).sum(dim=1)  # ā^T A ā per point
                return torch.einsum(eq, d @ block.G, d, u.unsqueeze(1).expand(-1, self.o))
            _, qa, _, qg = block.eigh()
            s = (a @ qa).square() @ _spectrum_power(block, power, damping).T  # [N, o]
            k = d @ qg  # [V, N, o]
            return torch.einsum(eq, k, k, s)
        if isinstance(block, DiagBlock):
            prec = vec_to_mat(
                block.values + torch.as_tensor(damping, dtype=dtype),
                self.o,
                self.n - int(self.bias),
                self.bias,
                self.transposed,
            )
            spec = prec.reciprocal() if power == -1.0 else prec.pow(power)
            return torch.einsum(eq, d, d, a.square() @ spec.T)
        return grads_quad(self.grads(), self.num_points, block, power, damping, diagonal)

    def gram_cross(self, other: KronStats) -> Tensor:
        if not isinstance(other, LinearStats):
            return super().gram_cross(other)
        ga = (self.a @ other.a.T).square()  # [N1, N2]
        d1, d2 = self.d.reshape(-1, self.o), other.d.reshape(-1, self.o)
        gd = (d1 @ d2.T).square().reshape(self.V, self.num_points, other.V, other.num_points)
        return (ga * gd.sum(dim=(0, 2))).sum()


class SharedStats(KronStats):
    """``T > 1`` (weights shared over positions): ``a [N, T, n]``, ``d [V, N, T, d_out]``."""

    live: Tensor | None = None  # [N, T]: 1 at real positions, 0 at padding (see kfac_sums)

    def __init__(self, a: Tensor, d: Tensor, bias: bool):
        self.a, self.d, self.bias = a, d, bias
        self.num_points, self.T, self.n = a.shape
        self.V, self.o = d.shape[0], d.shape[-1]

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return (self.a, self.d)

    def kfac_sums(self, with_g: bool = True, reduce: bool = False) -> KfacSums:
        """K-FAC "expand": sums over points and live positions, counted by them; "reduce": per
        point ``g = Σ_t δ_t`` and ``ā`` the mean over its live positions, counted ``N``
        (``docs/math.md``, "K-FAC over positions"). The live positions are those of
        :attr:`live` (``[N, T]``, 1 real / 0 padding, from the model's ``attention_mask``), or
        every position when it is ``None``; padding is never guessed from the directions."""
        live = self.live if self.live is not None else self.a.new_ones(self.a.shape[:2])
        live = live.to(self.a.dtype)
        if reduce:
            per_point = live.sum(dim=1, keepdim=True)
            w = torch.where(per_point > 0, live / per_point.clamp_min(1), 1.0 / self.T)
            a_red = torch.einsum("nt,nti->ni", w, self.a)
            g_red = torch.einsum("vnto,nt->vno", self.d, live.to(self.d.dtype)).reshape(-1, self.o)
            g = sym_tmm(g_red, g_red) if with_g else None
            return KfacSums(sym_tmm(a_red, a_red), g, self.num_points)
        if self.live is None:
            a, d = self.a.reshape(-1, self.n), self.d.reshape(-1, self.o)
            count = self.num_points * self.T
        else:
            keep = live.reshape(-1).bool()
            a, d = self.a.reshape(-1, self.n)[keep], self.d.reshape(self.V, -1, self.o)[:, keep]
            d, count = d.reshape(-1, self.o), int(keep.sum())
        g = sym_tmm(d, d) if with_g else None
        return KfacSums(sym_tmm(a, a), g, count)

    def compact(self, cache_m: bool | None = None) -> KronStats:
        """``M`` when one K-FOC iteration on it costs fewer flops than on the unfold
        (``cache_m=None``), or as forced by ``cache_m``."""
        if cache_m is None:
            cache_m = self._m_flops() < self._unfold_flops()
        if not cache_m:
            return self
        out = GradientStats(self.per_direction_grads(), self.num_points, self.bias)
        out.transposed = self.transposed
        return out

    # -- cost model (flops of one full K-FOC iteration) ---------------------------------------
    def _m_flops(self) -> int:
        k, o, n = self.V * self.num_points, self.o, self.n
        return 4 * k * o * n * (o + n)

    def _unfold_flops(self) -> int:
        N, V, T, o, n = self.num_points, self.V, self.T, self.o, self.n
        return N * (2 * V * (2 * T * o * o + 2 * T * T * o) + 2 * (2 * T * T * n + 2 * T * n * n))

    def per_direction_grads(self) -> Tensor:
        return torch.einsum("vnto,nti->vnoi", self.d, self.a).reshape(-1, self.o, self.n)

    def factored_rotation_is_cheaper(self) -> bool:
        """:meth:`rotated_grads`' choice: rotating the position factors first costs fewer
        multiply-adds than rotating each formed ``M``."""
        N, V, T, o, n = self.num_points, self.V, self.T, self.o, self.n
        factored = V * N * T * o * o + N * T * n * n + V * N * T * o * n
        formed = V * N * T * o * n + V * N * o * n * (o + n)
        return factored < formed

    def rotated_grads(self, qg: Tensor, qa: Tensor) -> Tensor:
        """``Q_Gᵀ M Q_A = Σ_t (Q_Gᵀ δ_t)(Q_Aᵀ ā_t)ᵀ``: the ``T`` position factors are rotated
        first (``V·N·T·o² + N·T·n²`` multiply-adds, the inputs' rotation shared by all
        directions) and multiplied after (``V·N·T·o·n``), instead of rotating each formed
        ``M`` (``V·N·o·n·(o + n)``) — ``(o + n) / T`` times fewer for a convolution with few
        output positions (a ResNet's late stages), the same product when ``T`` is large."""
        if not self.factored_rotation_is_cheaper():
            return super().rotated_grads(qg, qa)
        d = self.d.to(qg.dtype) @ qg  # [V, N, T, o]
        a = self.a.to(qa.dtype) @ qa  # [N, T, n]
        return torch.einsum("vnto,nti->vnoi", d, a)

    def a_update(self, G: Tensor) -> Tensor:
        kmat = torch.einsum("vnto,vnso->nts", self.d @ G, self.d)
        return sym_tmm(self.a.reshape(-1, self.n), (kmat @ self.a).reshape(-1, self.n))

    def g_update(self, A: Tensor) -> Tensor:
        lmat = (self.a @ A) @ self.a.transpose(1, 2)  # [N, T, T]
        ld = torch.matmul(lmat, self.d)  # [V, N, T, o]
        return sym_tmm(self.d.reshape(-1, self.o), ld.reshape(-1, self.o))


class GradientStats(KronStats):
    """The per-direction gradients ``M`` ``[V·N, d_out, n]`` (direction-major) of ``N`` points."""

    def __init__(self, m: Tensor, num_points: int, bias: bool):
        self.m, self.num_points, self.bias = m, num_points, bias
        self.V = m.shape[0] // num_points
        self.o, self.n = m.shape[1], m.shape[2]

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return (self.m,)

    def per_direction_grads(self) -> Tensor:
        return self.m

    def kfac_sums(self, with_g: bool = True, reduce: bool = False) -> KfacSums:
        """Only K-FOC's start when the gradients are all there is (a tied weight):
        ``Σ_k M_kᵀ M_k`` and ``Σ_k M_k M_kᵀ``, counted ``N`` (the rank-one case's K-FAC sums
        weighted by ``|δ|²`` and ``|ā|²``)."""
        flat = self.m.reshape(-1, self.n)
        g = torch.einsum("koi,kpi->op", self.m, self.m) if with_g else None
        return KfacSums(sym_tmm(flat, flat), g, self.num_points)

    def a_update(self, G: Tensor) -> Tensor:
        gm = torch.matmul(G, self.m)
        return sym_tmm(self.m.reshape(-1, self.n), gm.reshape(-1, self.n))

    def g_update(self, A: Tensor) -> Tensor:
        ma = torch.matmul(self.m, A)
        return torch.einsum("koi,kpi->op", ma, self.m)


def kron_stats(a: Tensor, d: Tensor, bias: bool) -> LinearStats | SharedStats:
    """The statistics of one batch: ``a [N, T, n]`` (homogeneous coordinate appended when there
    is a bias) and ``d [V, N, T, d_out]``; ``T = 1`` gives the rank-one :class:`LinearStats`."""
    if a.shape[1] == 1:
        return LinearStats(a[:, 0], d[:, :, 0], bias)
    return SharedStats(a, d, bias)
