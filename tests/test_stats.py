"""The public statistics engine against explicit per-direction gradients, in float64.

Every representation (rank-one Linear, shared-weight unfold, per-direction gradients) and every
block kind must give the same quadratic forms ``g^T (K + δI)^p g`` as a dense eigendecomposition
of ``K``, and the same K-FOC maps and diagonal as the explicit gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayes_kfoc.blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock
from bayes_kfoc.blocks.kron import mat_to_vec
from bayes_kfoc.stats import (
    GradientStats,
    GradStats,
    KronStats,
    LinearStats,
    SharedStats,
    kron_stats,
)

V, N, D_OUT, D_IN = 3, 5, 4, 3  # with a bias: n = 4


def _raw(T: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, T, D_IN, generator=g, dtype=torch.float64)
    a = torch.cat([a, torch.ones(N, T, 1, dtype=torch.float64)], dim=-1)
    d = torch.randn(V, N, T, D_OUT, generator=g, dtype=torch.float64)
    return a, d


def _explicit_grads(a: Tensor, d: Tensor) -> Tensor:
    """``[V, N, P]``: ``vec(Σ_t δ_t ā_tᵀ)`` in ``parameters_to_vector`` order, by loops."""
    out = torch.zeros(V, N, D_OUT * (D_IN + 1), dtype=torch.float64)
    for v in range(V):
        for n in range(N):
            m = sum(torch.outer(d[v, n, t], a[n, t]) for t in range(a.shape[1]))
            out[v, n] = mat_to_vec(m, True)
    return out


def _representations(T: int) -> list[KronStats]:
    a, d = _raw(T)
    raw = kron_stats(a, d, True)
    reps: list[KronStats] = [raw]
    if isinstance(raw, SharedStats):
        reps.append(raw.compact(cache_m=True))
    return reps


def _blocks() -> list[CurvatureBlock]:
    g = torch.Generator().manual_seed(1)
    shapes = {"weight": torch.Size([D_OUT, D_IN]), "bias": torch.Size([D_OUT])}
    p = D_OUT * (D_IN + 1)
    ra = torch.randn(D_IN + 1, D_IN + 1, generator=g, dtype=torch.float64)
    rg = torch.randn(D_OUT, D_OUT, generator=g, dtype=torch.float64)
    rd = torch.randn(p, p, generator=g, dtype=torch.float64)
    return [
        KronBlock("m", shapes, ra @ ra.T, rg @ rg.T),
        DiagBlock("m", shapes, torch.rand(p, generator=g, dtype=torch.float64)),
        DenseBlock("m", shapes, rd @ rd.T),
    ]


def _dense_power(k: Tensor, power: float, damping: float) -> Tensor:
    evals, evecs = torch.linalg.eigh(k + damping * torch.eye(k.shape[0], dtype=k.dtype))
    return (evecs * evals.pow(power)) @ evecs.T


@pytest.mark.parametrize("T", [1, 3], ids=["linear", "shared"])
@pytest.mark.parametrize("power,damping", [(1.0, 0.0), (-1.0, 0.7), (-0.5, 2.0)])
def test_quadratic_forms_match_a_dense_matrix_power(T: int, power: float, damping: float) -> None:
    a, d = _raw(T)
    g = _explicit_grads(a, d)
    for block in _blocks():
        kp = _dense_power(block.to_dense(), power, damping)
        want = torch.einsum("vnp,pq,wnq->nvw", g, kp, g)
        for st in _representations(T):
            got = st.quad(block, power, damping)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            diag = st.quad(block, power, damping, diagonal=True)
            torch.testing.assert_close(diag, torch.diagonal(want, dim1=1, dim2=2))
        # the generic gradients path agrees too
        torch.testing.assert_close(GradStats(g).quad(block, power, damping), want)


@pytest.mark.parametrize("T", [1, 3], ids=["linear", "shared"])
def test_maps_diagonal_and_gram_match_explicit_gradients(T: int) -> None:
    a, d = _raw(T)
    m = torch.einsum("vnto,nti->vnoi", d, a).reshape(V * N, D_OUT, D_IN + 1)  # W̄ per direction
    flat = _explicit_grads(a, d).reshape(V * N, -1)
    rg = torch.randn(D_OUT, D_OUT, dtype=torch.float64)
    ra = torch.randn(D_IN + 1, D_IN + 1, dtype=torch.float64)
    G, A = rg @ rg.T, ra @ ra.T
    for st in _representations(T):
        torch.testing.assert_close(st.a_update(G), torch.einsum("koi,op,kpj->ij", m, G, m))
        torch.testing.assert_close(st.g_update(A), torch.einsum("koi,ij,kpj->op", m, A, m))
        torch.testing.assert_close(st.diag(), flat.square().sum(0))
        torch.testing.assert_close(st.gram_cross(st), (flat @ flat.T).square().sum())


def test_compact_returns_a_new_representation_and_keeps_the_raw_sums() -> None:
    a, d = _raw(3)
    raw = kron_stats(a, d, True)
    assert isinstance(raw, SharedStats)
    before = raw.kfac_sums()
    compact = raw.compact(cache_m=True)
    assert isinstance(compact, GradientStats) and compact is not raw
    after = raw.kfac_sums()  # still available: compact() did not consume the raw statistics
    torch.testing.assert_close(before.a, after.a)
    assert before.count == after.count == N * 3
    a1, d1 = _raw(1)
    linear = kron_stats(a1, d1, True)
    assert isinstance(linear, LinearStats) and linear.compact() is linear
    assert linear.kfac_sums(with_g=False).g is None
