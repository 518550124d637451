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
    g_prime: Tensor,
    sigma: float,
    it: int,
    change: float,
    tol: float,
    converged: bool,
    scheme: str,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    if not converged:
        warnings.warn(
            f"K-FOC power iteration for module {name!r} did not converge: relative factor change "
            f"{change:.3e} > tol {tol:.1e} after {it} iterations. Raise max_iter, or loosen tol.",
            ConvergenceWarning,
            stacklevel=3,
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
        return torch.zeros_like(A), torch.zeros_like(g_prime), info
    root = math.sqrt(sigma)
    return A * root, g_prime / root, info


def power_iteration(
    name: str,
    a_update: Callable[[Tensor], Tensor],
    g_update: Callable[[Tensor], Tensor],
    G0: Tensor,
    tol: float,
    max_iter: int,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Gauss–Seidel power iteration for one layer (cached statistics): ``A`` then ``G``.

    ``a_update(G)`` must return ``Σ ā ā^T ⟨G, B_n⟩`` summed over all data (and ranks);
    ``g_update(A)`` returns ``Σ B_n (ā^T A ā)``. Returns balanced ``(A, G, info)``.
    """
    tol = effective_tol(tol, G0.dtype)
    G, _ = _unit(G0)
    A: Tensor | None = None
    sigma, change, converged, it = 0.0, math.inf, False, 0
    for it in range(1, max_iter + 1):
        A_new, a_norm = _unit(a_update(G))
        if not bool(a_norm > 0):
            return _finish(name, A_new, G, 0.0, it, 0.0, tol, True, "gauss-seidel")
        g_prime = g_update(A_new)
        G_new, s = _unit(g_prime)
        sigma = float(s)
        change = max(_change(G_new, G), _change(A_new, A) if A is not None else math.inf)
        A, G = A_new, G_new
        if change < tol:
            converged = True
            break
    assert A is not None
    return _finish(name, A, sigma * G, sigma, it, change, tol, converged, "gauss-seidel")


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
    layers still iterating, from one pass over the data. Same fixed point as
    :func:`power_iteration`.
    """
    state = {k: (_unit(a)[0], _unit(g)[0]) for k, (a, g) in init.items()}
    done: dict[str, tuple[Tensor, Tensor, dict[str, Any]]] = {}
    last_change = {k: math.inf for k in names}
    for it in range(1, max_iter + 1):
        active = [k for k in names if k not in done]
        if not active:
            break
        ups = updates({k: state[k] for k in active})
        for k in active:
            A, G = state[k]
            tol_k = effective_tol(tol, A.dtype)
            a_up, g_prime = ups[k]
            A_new, a_norm = _unit(a_up)
            G_new, s = _unit(g_prime)
            sigma = float(s)
            if not bool(a_norm > 0) or sigma <= 0:
                done[k] = _finish(k, A, g_prime, 0.0, it, 0.0, tol_k, True, "jacobi")
                continue
            change = max(_change(A_new, A), _change(G_new, G))
            last_change[k] = change
            if change < tol_k:
                done[k] = _finish(k, A, g_prime, sigma, it, change, tol_k, True, "jacobi")
            elif it == max_iter:
                done[k] = _finish(k, A, g_prime, sigma, it, change, tol_k, False, "jacobi")
            state[k] = (A_new, G_new)
        if on_iteration is not None:
            on_iteration(it, len(done))
    return done
