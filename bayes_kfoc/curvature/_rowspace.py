"""K-FOC's input side restricted to the row space of the inputs (cached fits with few rows).

Every per-direction gradient ``M = Σ_t δ_t ā_tᵀ`` has its rows in the span of the inputs
``ā_{n,t}``, and so do both of K-FOC's maps: ``R(G) = Σ M^T G M`` and K-FAC's start
``Σ ā āᵀ``. Stack the ``R = N·T`` inputs as ``X`` (``[R, n]``) and take the thin QR of
``Xᵀ = Q Rₓ`` (``Q`` ``[n, R]`` with orthonormal columns). Then ``X = Rₓᵀ Qᵀ`` exactly, every
``A`` iterate is ``Q Ã Qᵀ``, and ``||Q Ã Qᵀ||_F = ||Ã||_F``: the problem with inputs
``ã = Qᵀ ā`` (the rows of ``Rₓᵀ``, size ``R``) has the same singular values, the same ``G``,
and ``A = Q Ã Qᵀ`` (``docs/math.md``, "K-FOC on few inputs").

When ``R`` is well below ``n`` (a 3×3 convolution with 256+ input channels on a 4×4 or 1×1
feature map, and a few hundred points: ResNet-18's last two stages) each half-step then costs
``O(R·R²)`` instead of ``O(R·n²)`` and the solver's factor-sized work ``O(R²)`` instead of
``O(n²)``, for one QR (``O(n·R²)``) and one product ``Q Ã Qᵀ`` (``O(n²·R)``) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..stats import KronStats, LinearStats, SharedStats, sym_tmm

ROW_FRACTION = 0.5
"""Restrict to the row space when the stacked inputs have at most this fraction of ``n`` rows:
then the QR and the final product cost less than two of the half-steps they make cheaper."""


@dataclass(frozen=True)
class RowSpace:
    """The inputs' row space of one layer: ``Q`` (``[n, R]``, orthonormal columns), the
    statistics with inputs ``ã = Qᵀ ā`` and K-FAC's input factor in that basis."""

    basis: Tensor
    stats: list[KronStats]
    kfac_a: Tensor

    def expand(self, a_small: Tensor) -> Tensor:
        """``Q Ã Qᵀ`` (``[n, n]``) for a symmetric ``Ã`` (``[R, R]``)."""
        qt = self.basis.T.contiguous()
        return sym_tmm(qt, a_small @ qt)


def row_space(stats: list[KronStats], kfac_a: Tensor) -> RowSpace | None:
    """The row-space form of one layer's cached statistics and of K-FAC's ``A`` (``kfac_a``,
    K-FOC's start; it lies in the span, expanded or reduced over positions), or ``None`` when it
    does not pay (more than :data:`ROW_FRACTION` ``· n`` stacked inputs) or does not apply
    (per-direction gradients ``M`` were cached instead of the inputs)."""
    if not stats or not all(isinstance(st, LinearStats | SharedStats) for st in stats):
        return None
    n = stats[0].n
    inputs = [st.a.reshape(-1, n) for st in stats]  # type: ignore[attr-defined]
    rows = sum(x.shape[0] for x in inputs)
    if rows == 0 or rows > ROW_FRACTION * n:
        return None
    q, r = torch.linalg.qr(torch.cat(inputs).T)  # Xᵀ = Q Rₓ: q [n, R], r [R, R]
    coords = r.T  # row i of X is coords[i] in q's basis
    small: list[KronStats] = []
    start = 0
    for st, x in zip(stats, inputs, strict=True):
        a_small = coords[start : start + x.shape[0]]
        start += x.shape[0]
        if isinstance(st, LinearStats):
            small.append(LinearStats(a_small, st.d, st.bias))
        else:
            assert isinstance(st, SharedStats)
            small.append(SharedStats(a_small.reshape(st.num_points, st.T, -1), st.d, st.bias))
    return RowSpace(q, small, sym_tmm(q, kfac_a @ q))
