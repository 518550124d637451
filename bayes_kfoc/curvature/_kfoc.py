"""K-FOC power iteration on the Van Loan–Pitsianis rearrangement, without forming the Fisher.

``min_{A,G} ||F − G ⊗ A||_F`` is the top singular pair of ``R(F) = Σ_n vec(B_n) vec(ā_n ā_n^T)^T``.
The iteration alternates ``A ← Σ ā ā^T ⟨G, B_n⟩`` and ``G ← Σ B_n (ā^T A ā)``, normalising each
update; both maps send PSD matrices to PSD matrices, so a PSD start (K-FAC) keeps the factors PSD.
At convergence ``||A||_F = 1`` and ``G' = R(A)`` (unnormalised) give ``σ₁ = ||G'||_F`` and the
optimum ``G' ⊗ A``; the scale is then split evenly, ``||A||_F = ||G||_F = √σ₁``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class ConvergenceWarning(UserWarning):
    """A K-FOC power iteration stopped at ``max_iter`` before reaching ``tol``."""


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol``, floored at what the dtype can resolve (50 ulp) so float32 fits can converge."""
    return max(tol, 50 * torch.finfo(dtype).eps)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.matrix_norm(x)
    return (x / norm if bool(norm > 0) else x), norm


def _change(new: Tensor, old: Tensor) -> float:
    return float(torch.linalg.matrix_norm(new - old))


def _finish(
    name: str,
    A: Tensor,
    G: Tensor,
    sigma: float,
    it: int,
    change: float,
    tol: float,
    converged: bool,
    scheme: str,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Balanced factors ``(√σ A, √σ G)`` from unit-norm ``A``, ``G`` and ``σ₁``, plus info."""
    if not converged:
        warnings.warn(
            f"K-FOC power iteration for module {name!r} did not converge: relative factor change "
            f"{change:.3e} > tol {tol:.1e} after {it} iterations. Raise max_iter, or loosen tol.",
            ConvergenceWarning,
            stacklevel=6,  # the caller of fit_curvature
        )
    info = {
        "iterations": it,
        "converged": converged,
        "residual": change,
        "sigma1": sigma,
        "tol": tol,
        "scheme": scheme,
    }
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
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Gauss–Seidel power iteration for one layer (cached statistics): ``A`` then ``G``.

    ``a_update(G)`` must return ``Σ ā ā^T ⟨G, B_n⟩`` summed over all data (and ranks);
    ``g_update(A)`` returns ``Σ B_n (ā^T A ā)``. ``(A0, G0)`` is the warm start (K-FAC).

    Convergence is tested after every half-step: when the factor just updated changed by less
    than ``tol`` (relative Frobenius), the pair (that factor, the other one) is returned. That
    factor is then the exact optimum given the other, so ``||F − G⊗A||² = ||F||² − σ₁²`` holds
    with ``σ₁`` the norm of its unnormalised update. Returns balanced ``(A, G, info)``.
    """
    tol = effective_tol(tol, G0.dtype)
    A, G = _unit(A0)[0], _unit(G0)[0]
    change = math.inf
    for it in range(1, max_iter + 1):
        A_new, s = _unit(a_update(G))
        if not bool(s > 0):
            return _finish(name, A, G, 0.0, it, 0.0, tol, True, "gauss-seidel")
        change = _change(A_new, A)
        A = A_new
        if change < tol:
            return _finish(name, A, G, float(s), it, change, tol, True, "gauss-seidel")
        G_new, s = _unit(g_update(A))
        change = _change(G_new, G)
        G = G_new
        if change < tol:
            return _finish(name, A, G, float(s), it, change, tol, True, "gauss-seidel")
    return _finish(name, A, G, float(s), max_iter, change, tol, False, "gauss-seidel")


def power_iteration_jacobi(
    names: list[str],
    updates: Callable[[dict[str, tuple[Tensor, Tensor]]], dict[str, tuple[Tensor, Tensor]]],
    init: dict[str, tuple[Tensor, Tensor]],
    tol: float,
    max_iter: int,
    on_iteration: Callable[[int, int], None] | None = None,
) -> dict[str, tuple[Tensor, Tensor, dict[str, Any]]]:
    """Jacobi power iteration for several layers at once (streaming: one data pass per step).

    ``updates({name: (A, G)})`` returns ``{name: (Σ ā ā^T ⟨G, B_n⟩, Σ B_n (ā^T A ā))}`` for the
    layers still iterating, from one pass over the data. A layer stops when either factor changed
    by less than ``tol``; it returns that factor with the one it was computed from (the same
    fixed point and certificate as :func:`power_iteration`).
    """
    state = {k: (_unit(a)[0], _unit(g)[0]) for k, (a, g) in init.items()}
    done: dict[str, tuple[Tensor, Tensor, dict[str, Any]]] = {}
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
                done[k] = _finish(k, A, G, 0.0, it, 0.0, tol_k, True, "jacobi")
                continue
            da, dg = _change(A_new, A), _change(G_new, G)
            if da < tol_k and da <= dg:
                done[k] = _finish(k, A_new, G, float(sa), it, da, tol_k, True, "jacobi")
            elif dg < tol_k:
                done[k] = _finish(k, A, G_new, float(sg), it, dg, tol_k, True, "jacobi")
            elif it == max_iter:
                done[k] = _finish(k, A, G_new, float(sg), it, min(da, dg), tol_k, False, "jacobi")
            state[k] = (A_new, G_new)
        if on_iteration is not None:
            on_iteration(it, len(done))
    return done
