"""K-FOC on the Van Loan–Pitsianis rearrangement, without forming the Fisher.

``min_{A,G} ||F − G ⊗ A||_F`` is the top singular pair of ``R(F) = Σ_n vec(B_n) vec(ā_n ā_n^T)^T``.
Two solvers share the two matrix-free maps ``R(G) = Σ ā ā^T ⟨G, B_n⟩`` (the ``A`` update) and its
adjoint ``Rᵀ(A) = Σ B_n (ā^T A ā)`` (the ``G`` update):

- :func:`power_iteration` / :func:`power_iteration_jacobi` alternate the two maps, normalising
  each update; both maps send PSD matrices to PSD matrices, so a PSD start (K-FAC) keeps every
  iterate PSD. Converges like ``(σ₂/σ₁)^{2k}``.
- :func:`lanczos_bidiag` runs Golub–Kahan–Lanczos bidiagonalisation on the same maps (one ``A``
  and one ``G`` update per step, like a power iteration) from K-FAC's ``A``. The Krylov space
  converges like a Chebyshev polynomial in the gap, so a slowly converging layer needs a fraction
  of the steps; the Ritz factors are projected onto the PSD cone at the end (the part removed
  is ``O(tol)`` and reported as ``info.psd_clamped``).

At convergence ``||A||_F = 1`` and ``G' = Rᵀ(A)`` give ``σ₁ = ||G'||_F`` and the optimum
``G' ⊗ A``; the scale is then split evenly, ``||A||_F = ||G||_F = √σ₁``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .info import SolverInfo

Result = tuple[Tensor, Tensor, SolverInfo]  # balanced (A, G) and how the solver ended


class ConvergenceWarning(UserWarning):
    """A K-FOC solver stopped at ``max_iter`` before reaching ``tol``."""


def warn_unconverged(results: Sequence[tuple[str, SolverInfo]], stacklevel: int = 2) -> None:
    """One :class:`ConvergenceWarning` for every block in ``results`` that did not converge,
    pointing ``stacklevel`` frames above the caller."""
    bad = [(k, i) for k, i in results if not i.converged]
    if not bad:
        return
    parts = "; ".join(
        f"module {k!r} ({i.scheme}): relative factor change {i.residual:.3e} > tol {i.tol:.1e} "
        f"after {i.iterations} iterations"
        for k, i in bad
    )
    warnings.warn(
        f"K-FOC did not converge for {len(bad)} module(s): {parts}. Raise max_iter, or loosen tol.",
        ConvergenceWarning,
        stacklevel=stacklevel + 1,
    )


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol``, floored at what the dtype can resolve (50 ulp) so float32 fits can converge."""
    return max(tol, 50 * torch.finfo(dtype).eps)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.matrix_norm(x)
    return (x / norm if bool(norm > 0) else x), norm


def _change(new: Tensor, old: Tensor) -> float:
    return float(torch.linalg.matrix_norm(new - old))


def _finish(
    A: Tensor,
    G: Tensor,
    sigma: float,
    it: int,
    change: float,
    tol: float,
    converged: bool,
    scheme: str,
) -> Result:
    """Balanced factors ``(√σ A, √σ G)`` from unit-norm ``A``, ``G`` and ``σ₁``, plus info."""
    info = SolverInfo(
        iterations=it, converged=converged, residual=change, sigma1=sigma, tol=tol, scheme=scheme
    )
    if sigma <= 0:
        return torch.zeros_like(A), torch.zeros_like(G), info
    root = math.sqrt(sigma)
    return A * root, G * root, info


def power_iteration(
    name: str,
    a_update: Callable[[Tensor], Tensor],
    g_update: Callable[[Tensor], Tensor],
    A0: Tensor,
    G0: Tensor,
    tol: float,
    max_iter: int,
    warn: bool = True,
) -> Result:
    """Gauss–Seidel power iteration for one layer (cached statistics): ``A`` then ``G``.

    ``a_update(G)`` must return ``Σ ā ā^T ⟨G, B_n⟩`` summed over all data (and ranks);
    ``g_update(A)`` returns ``Σ B_n (ā^T A ā)``. ``(A0, G0)`` is the warm start (K-FAC).

    Convergence is tested after every half-step: when the factor just updated changed by less
    than ``tol`` (relative Frobenius), the pair (that factor, the other one) is returned. That
    factor is then the exact optimum given the other, so ``||F − G⊗A||² = ||F||² − σ₁²`` holds
    with ``σ₁`` the norm of its unnormalised update. Returns balanced ``(A, G, info)``; warns
    (``warn``) when ``max_iter`` is reached first.
    """
    out = _power_iteration(a_update, g_update, A0, G0, tol, max_iter)
    if warn:
        warn_unconverged([(name, out[2])])
    return out


def _power_iteration(
    a_update: Callable[[Tensor], Tensor],
    g_update: Callable[[Tensor], Tensor],
    A0: Tensor,
    G0: Tensor,
    tol: float,
    max_iter: int,
) -> Result:
    tol = effective_tol(tol, G0.dtype)
    A, G = _unit(A0)[0], _unit(G0)[0]
    change = math.inf
    for it in range(1, max_iter + 1):
        A_new, s = _unit(a_update(G))
        if not bool(s > 0):
            return _finish(A, G, 0.0, it, 0.0, tol, True, "gauss-seidel")
        change = _change(A_new, A)
        A = A_new
        if change < tol:
            return _finish(A, G, float(s), it, change, tol, True, "gauss-seidel")
        G_new, s = _unit(g_update(A))
        change = _change(G_new, G)
        G = G_new
        if change < tol:
            return _finish(A, G, float(s), it, change, tol, True, "gauss-seidel")
    return _finish(A, G, float(s), max_iter, change, tol, False, "gauss-seidel")


def power_iteration_jacobi(
    names: list[str],
    updates: Callable[[dict[str, tuple[Tensor, Tensor]]], dict[str, tuple[Tensor, Tensor]]],
    init: dict[str, tuple[Tensor, Tensor]],
    tol: float,
    max_iter: int,
    on_iteration: Callable[[int, int], None] | None = None,
    warn: bool = True,
) -> dict[str, Result]:
    """Jacobi power iteration for several layers at once (streaming: one data pass per step).

    ``updates({name: (A, G)})`` returns ``{name: (Σ ā ā^T ⟨G, B_n⟩, Σ B_n (ā^T A ā))}`` for the
    layers still iterating, from one pass over the data. A layer stops when either factor changed
    by less than ``tol``; it returns that factor with the one it was computed from (the same
    fixed point and certificate as :func:`power_iteration`).
    """
    state = {k: (_unit(a)[0], _unit(g)[0]) for k, (a, g) in init.items()}
    done: dict[str, Result] = {}
    for it in range(1, max_iter + 1):
        active = [k for k in names if k not in done]
        if not active:
            break
        ups = updates({k: state[k] for k in active})
        for k in active:
            A, G = state[k]
            tol_k = effective_tol(tol, A.dtype)
            A_new, sa = _unit(ups[k][0])
            G_new, sg = _unit(ups[k][1])
            if not bool(sa > 0) or not bool(sg > 0):
                done[k] = _finish(A, G, 0.0, it, 0.0, tol_k, True, "jacobi")
                continue
            da, dg = _change(A_new, A), _change(G_new, G)
            if da < tol_k and da <= dg:
                done[k] = _finish(A_new, G, float(sa), it, da, tol_k, True, "jacobi")
            elif dg < tol_k:
                done[k] = _finish(A, G_new, float(sg), it, dg, tol_k, True, "jacobi")
            elif it == max_iter:
                done[k] = _finish(A, G_new, float(sg), it, min(da, dg), tol_k, False, "jacobi")
            state[k] = (A_new, G_new)
        if on_iteration is not None:
            on_iteration(it, len(done))
    if warn:
        warn_unconverged([(k, r[2]) for k, r in done.items()])
    return done
