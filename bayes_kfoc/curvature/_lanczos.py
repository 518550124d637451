"""Golub–Kahan–Lanczos bidiagonalisation for K-FOC's top singular pair (see :mod:`._kfoc` for the
two matrix-free maps, and ``docs/math.md``, "K-FOC")."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator

import torch
from torch import Tensor

from ..blocks import robust_eigh
from ._kfoc import Result, _finish, _unit, effective_tol, warn_unconverged


class _Basis:
    """Orthonormal matrices kept as the rows of one ``[rows, m]`` buffer.

    The buffer starts with room for 4 matrices and doubles up to ``capacity`` as the basis grows,
    so a fast-converging layer holds only the few it used.
    """

    def __init__(self, like: Tensor, capacity: int):
        self.shape = like.shape
        self.capacity = capacity
        self.rows = like.new_empty(min(4, capacity), like.numel())
        self.k = 0

    def append(self, x: Tensor) -> None:
        if self.k == self.rows.shape[0]:
            grown = self.rows.new_empty(min(2 * self.k, self.capacity), self.rows.shape[1])
            grown[: self.k] = self.rows
            self.rows = grown
        self.rows[self.k] = x.flatten()
        self.k += 1

    def last(self) -> Tensor:
        return self.rows[self.k - 1].view(self.shape)

    def orthogonalise(self, x: Tensor) -> Tensor:
        """``x`` minus its projection on the basis: classical Gram–Schmidt, repeated once when
        the first pass cancelled more than ``1 − 1/√2`` of the norm ("twice is enough")."""
        if self.k == 0:
            return x
        basis, flat = self.rows[: self.k], x.flatten()
        before = torch.linalg.vector_norm(flat)
        flat = flat - (basis @ flat) @ basis
        if bool(torch.linalg.vector_norm(flat) < before / math.sqrt(2.0)):
            flat = flat - (basis @ flat) @ basis
        return flat.view(self.shape)

    def combine(self, coef: Tensor) -> Tensor:
        """``Σ_k coef_k basis_k``."""
        coef = coef.to(device=self.rows.device, dtype=self.rows.dtype)
        return (coef @ self.rows[: coef.numel()]).view(self.shape)


def _psd_part(x: Tensor) -> tuple[Tensor, float]:
    """The nearest PSD matrix (Frobenius) to the symmetric ``x``, and the relative norm removed.

    A Cholesky factorisation of ``x + s·I``, with ``s = 100·√n·ε·||x||_F`` inside the round-off
    allowance of :func:`~bayes_kfoc.blocks._base.clamp_psd`, first checks whether any negative
    eigenvalue exceeds round-off; only then is the (about ten times dearer) eigendecomposition
    run. Round-off negatives are left to the block's clamp, as for power-iteration factors.
    """
    x = 0.5 * (x + x.T)
    n = x.shape[0]
    shift = 100 * math.sqrt(n) * torch.finfo(x.dtype).eps * torch.linalg.matrix_norm(x)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    if int(torch.linalg.cholesky_ex(x + shift * eye).info) == 0:
        return x, 0.0
    evals, evecs, _ = robust_eigh(x, "K-FOC Ritz factor")  # float64 / jitter if float32 fails
    neg = evals.clamp_max(0.0)
    removed = float(torch.linalg.vector_norm(neg) / torch.linalg.vector_norm(evals))
    return (evecs * evals.clamp_min(0.0)) @ evecs.T, removed


Request = tuple[str, Tensor]  # ("g", A) asks for Rᵀ(A); ("a", G) asks for R(G)


def lanczos_bidiag(
    name: str,
    a_update: Callable[[Tensor], Tensor],
    g_update: Callable[[Tensor], Tensor],
    A0: Tensor,
    tol: float,
    max_iter: int,
    restart: int = 8,
    warn: bool = True,
) -> Result:
    """Golub–Kahan–Lanczos bidiagonalisation for one layer's top singular pair (cached statistics).

    Drives :func:`lanczos_steps` with the two maps; see there for the algorithm. Warns
    (``warn``) when ``max_iter`` is reached first.
    """
    steps = lanczos_steps(A0, tol, max_iter, restart)
    try:
        kind, x = next(steps)
        while True:
            kind, x = steps.send(g_update(x) if kind == "g" else a_update(x))
    except StopIteration as done:
        result: Result = done.value
    if warn:
        warn_unconverged([(name, result[2])])
    return result


def lanczos_steps(
    A0: Tensor, tol: float, max_iter: int, restart: int = 8
) -> Generator[Request, Tensor, Result]:
    """Golub–Kahan–Lanczos bidiagonalisation as a generator of operator requests.

    Yields ``("g", A)`` to ask for ``Rᵀ(A) = Σ B_n (ā^T A ā)`` and ``("a", G)`` to ask for
    ``R(G) = Σ ā ā^T ⟨G, B_n⟩`` (both summed over all data and ranks; they are adjoint for the
    Frobenius inner product), receives the result by ``send``, and returns ``(A, G, info)``.
    A cached fit answers each request from its statistics; a streaming fit answers the requests
    of every layer with one pass over the data.

    Starting from ``v₁ = A0/||A0||`` (K-FAC's ``A``), the half-steps alternate
    ``α_j u_j = Rᵀ(v_j) − β_{j−1} u_{j−1}`` and ``β_j v_{j+1} = R(u_j) − α_j v_j`` (fully
    re-orthogonalised); a ``G`` and an ``A`` half-step cost what one power iteration costs.

    Convergence is tested after every half-step, as in the power iteration. After an ``A``
    half-step the top triplet ``(σ, x, y)`` of the square upper-bidiagonal ``B_k`` gives
    ``A = V y``, ``G = U x`` with ``Rᵀ(A) = σG`` exactly and ``||R(G) − σA||_F = β_k |x_k|``;
    after a ``G`` half-step the ``(k+1) x k`` lower-bidiagonal ``[B_kᵀ; β_k e_kᵀ]`` gives a pair
    with ``R(G) = σA`` exactly and ``||Rᵀ(A) − σG||_F = α_{k+1} |y_{k+1}|``. The stopping rule is
    that relative residual ``< tol``: the relative change one more power half-step would make
    (one factor is then the exact optimum given the other, so the certificate holds). After
    ``restart`` steps the bidiagonalisation restarts from its Ritz vector (memory: up to
    ``restart + 1`` copies of each factor, grown as used). ``max_iter`` bounds the steps (pairs of
    half-steps).

    Returns balanced, PSD ``(A, G, info)`` (it does not warn; its driver does);
    ``info.psd_clamped`` is the relative Frobenius
    norm of the negative eigenvalues removed from the Ritz factors (``O(tol)``; eigenvalues
    within round-off of zero are left to the block's clamp, see :func:`_psd_part`).
    """
    tol = effective_tol(tol, A0.dtype)
    v, norm0 = _unit(0.5 * (A0 + A0.T))
    if not bool(norm0 > 0):
        return _finish(A0, torch.zeros_like(A0), 0.0, 0, 0.0, tol, True, "lanczos")
    half, residual, sigma = 0, math.inf, 0.0
    stop = False
    while True:
        V = _Basis(v, restart + 1)
        V.append(v)
        U: _Basis | None = None
        alphas: list[float] = []  # the bidiagonal lives on the host, in float64
        betas: list[float] = []
        ritz: tuple[Tensor, Tensor] | None = None  # coefficients (A in V, G in U) of the last test
        for _ in range(restart):
            u = yield ("g", V.last())  # G half-step
            half += 1
            if U is None:
                U = _Basis(u, restart)
            if betas:
                u = u - betas[-1] * U.last()
            u, alpha_t = _unit(U.orthogonalise(u))
            alpha = float(alpha_t)
            if U.k:  # test the pair of the lower-bidiagonal [B_kᵀ; β_k e_kᵀ]
                sigma, y, x = _top_pair(_bidiag(alphas, betas, lower=True))
                residual = alpha * abs(float(y[-1])) / sigma
                ritz = (y, x)
                if residual < tol or half >= 2 * max_iter:
                    stop = True
                    break
            elif not alpha > 0:  # Rᵀ(A0) = 0 on the data: the layer's Fisher is zero
                return _finish(v, torch.zeros_like(u), 0.0, 1, 0.0, tol, True, "lanczos")
            U.append(u)
            alphas.append(alpha)
            w = (yield ("a", u)) - alpha * V.last()  # A half-step
            half += 1
            w, beta_t = _unit(V.orthogonalise(w))
            beta = float(beta_t)
            sigma, x, y = _top_pair(_bidiag(alphas, betas, lower=False))
            residual = beta * abs(float(x[-1])) / sigma
            ritz = (y, x)
            if residual < tol or half >= 2 * max_iter or not beta > 0:
                stop = True  # converged, out of steps, or an invariant subspace (exact pair)
                break
            V.append(w)
            betas.append(beta)
        assert ritz is not None and U is not None
        A_out, G_out = V.combine(ritz[0]), U.combine(ritz[1])
        if stop:
            break
        v = _unit(A_out)[0]  # explicit restart from the Ritz vector
    if bool(torch.trace(A_out) < 0):  # the singular pair's sign is arbitrary
        A_out, G_out = -A_out, -G_out
    A_psd, clamped_a = _psd_part(A_out)
    G_psd, clamped_g = _psd_part(G_out)
    converged = residual < tol
    A, G, info = _finish(
        _unit(A_psd)[0],
        _unit(G_psd)[0],
        sigma,
        math.ceil(half / 2),
        residual,
        tol,
        converged,
        "lanczos",
    )
    info = dataclasses.replace(info, half_steps=half, psd_clamped=max(clamped_a, clamped_g))
    return A, G, info


def _bidiag(alphas: list[float], betas: list[float], lower: bool) -> Tensor:
    """``B_k`` (upper, ``k x k``: ``α`` on the diagonal, ``β_1..β_{k−1}`` above) or, with
    ``lower``, ``[B_kᵀ; β_k e_kᵀ]`` (``(k+1) x k``, ``β_1..β_k`` below the diagonal); a small
    float64 matrix on the host."""
    k = len(alphas)
    mat = torch.zeros(k + int(lower), k, dtype=torch.float64)
    for j in range(k):
        mat[j, j] = alphas[j]
        if lower:
            mat[j + 1, j] = betas[j]
        elif j + 1 < k:
            mat[j, j + 1] = betas[j]
    return mat


def _top_pair(mat: Tensor) -> tuple[float, Tensor, Tensor]:
    """``(σ₁, left, right)`` of a small host matrix (``mat @ right = σ₁ left``)."""
    left, s, right_h = torch.linalg.svd(mat)
    return float(s[0]), left[:, 0], right_h[0]
