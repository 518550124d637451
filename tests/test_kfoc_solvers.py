"""K-FOC's two solvers (Lanczos bidiagonalisation, power iteration) against a dense SVD (float64).

The maps are written out as explicit matrices on random PSD data, so each test compares the
matrix-free solver with ``torch.linalg.svd`` of the rearranged operator.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASE_IDS, CASES, Case
from reference import rel_err
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import fit_curvature
from bayes_kfoc.curvature._kfoc import ConvergenceWarning, power_iteration
from bayes_kfoc.curvature._lanczos import lanczos_bidiag

RTOL = 1e-8  # factor agreement with the dense SVD at tol=1e-12 (float64)


def _problem(n: int = 5, o: int = 4, points: int = 9, seed: int = 0):  # type: ignore[no-untyped-def]
    """Random ``ā_n`` and rank-2 ``B_n``, the two maps, and the dense top pair of ``R``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(points, n, generator=gen, dtype=torch.float64)
    d = torch.randn(points, 2, o, generator=gen, dtype=torch.float64)
    B = d.transpose(1, 2) @ d  # [N, o, o], PSD

    def a_update(G: Tensor) -> Tensor:
        w = (B * G).sum(dim=(1, 2))
        return a.T @ (a * w[:, None])

    def g_update(A: Tensor) -> Tensor:
        u = ((a @ A) * a).sum(dim=1)
        return (B * u[:, None, None]).sum(0)

    R = torch.einsum("ni,nj,nkl->ijkl", a, a, B).reshape(n * n, o * o)
    U, S, Vh = torch.linalg.svd(R)
    A_best = U[:, 0].reshape(n, n)
    G_best = Vh[0].reshape(o, o)
    sign = torch.sign(torch.trace(A_best))
    K_best = S[0] * torch.kron(sign * G_best, sign * A_best)
    A0 = a.T @ a / points
    return a_update, g_update, A0, B.sum(0), K_best, S[0]


@pytest.mark.parametrize("restart", [2, 12])
def test_lanczos_finds_the_top_singular_pair_with_and_without_restarts(restart: int) -> None:
    a_update, g_update, A0, _, K_best, s1 = _problem()
    A, G, info = lanczos_bidiag("layer", a_update, g_update, A0, 1e-12, 200, restart=restart)
    assert info["converged"] and info["scheme"] == "lanczos"
    assert rel_err(torch.kron(G, A), K_best) < RTOL
    assert abs(info["sigma1"] - float(s1)) / float(s1) < 1e-12
    for f in (A, G):  # symmetric PSD and balanced
        assert torch.equal(f, f.T) or rel_err(f, f.T) < 1e-14
        assert float(torch.linalg.eigvalsh(f).min()) >= 0.0
    assert abs(float(torch.linalg.matrix_norm(A) - torch.linalg.matrix_norm(G))) < 1e-9


def test_lanczos_needs_no_more_operator_applications_than_power_iteration() -> None:
    a_update, g_update, A0, G0, K_best, _ = _problem(n=6, o=5, points=12, seed=3)
    calls = {"n": 0}

    def count(f):  # type: ignore[no-untyped-def]
        def wrapped(x: Tensor) -> Tensor:
            calls["n"] += 1
            return f(x)

        return wrapped

    A, G, _ = power_iteration("p", count(a_update), count(g_update), A0, G0, 1e-10, 2000)
    power_calls, calls["n"] = calls["n"], 0
    A2, G2, _ = lanczos_bidiag("l", count(a_update), count(g_update), A0, 1e-10, 2000)
    assert calls["n"] < power_calls, (calls["n"], power_calls)
    assert rel_err(torch.kron(G2, A2), K_best) < 1e-6
    assert rel_err(torch.kron(G, A), K_best) < 1e-6


def test_lanczos_zero_fisher_and_non_convergence() -> None:
    a_update, g_update, A0, _, _, _ = _problem()
    A, G, info = lanczos_bidiag(
        "z", lambda G: 0 * a_update(G), lambda A: 0 * g_update(A), A0, 1e-9, 5
    )
    assert info["converged"] and info["sigma1"] == 0.0
    assert not bool(A.any()) and not bool(G.any())
    with pytest.warns(ConvergenceWarning, match="'slow'.*after 1 iterations"):
        _, _, info = lanczos_bidiag("slow", a_update, g_update, A0, 1e-14, 1)
    assert not info["converged"] and info["half_steps"] == 2


@pytest.mark.parametrize("mode", ["cached", "streaming"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fit_solvers_agree(case: Case, mode: str) -> None:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    fits = {
        s: fit_curvature(
            model, loader, solver=s, mode=mode, tol=1e-12, max_iter=500, progress=False
        )
        for s in ("lanczos", "power")
    }
    power_scheme = "gauss-seidel" if mode == "cached" else "jacobi"
    for name, b in fits["lanczos"].blocks.items():
        other = fits["power"].blocks[name]
        assert rel_err(b.to_dense(), other.to_dense()) < 1e-6, name
        if "scheme" in b.info:
            assert b.info["scheme"] == "lanczos" and other.info["scheme"] == power_scheme
            assert b.info["mode"] == other.info["mode"] == mode


def test_basis_grows_and_projects_out_its_span() -> None:
    from bayes_kfoc.curvature._lanczos import _Basis

    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 7, generator=gen, dtype=torch.float64))
    basis = _Basis(q[:, 0].reshape(4, 4), capacity=9)
    for j in range(7):  # grows 4 -> 8 rows
        basis.append(q[:, j].reshape(4, 4))
    assert basis.k == 7 and basis.rows.shape[0] == 8
    torch.testing.assert_close(basis.rows[:7], q.T)
    x = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    r = basis.orthogonalise(x).flatten()
    assert float((q.T @ r).abs().max()) < 1e-12
    coef = torch.arange(7, dtype=torch.float64)
    torch.testing.assert_close(basis.combine(coef), (q @ coef).reshape(4, 4))


@pytest.mark.parametrize(("m", "panel"), [(10, 3), (12, 4), (5, 256), (600, 256)])
def test_symmetric_gram_by_panels_equals_the_full_product(m: int, panel: int) -> None:
    from bayes_kfoc.stats import sym_tmm

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, m, generator=gen, dtype=torch.float64)
    w = torch.randn(40, 1, generator=gen, dtype=torch.float64)  # signed weights: Lanczos bases
    torch.testing.assert_close(sym_tmm(x, x * w, panel=panel), x.T @ (x * w), rtol=0, atol=1e-12)
