"""A Kronecker-factored curvature block ``G ⊗ A`` for Linear and Conv2d weights.

Conventions (see ``docs/math.md``, "Notation"):

- The layer computes ``z = W̄ ā`` with ``W̄ = [W b]`` (``d_out x n``, ``n = d_in + 1`` with a bias)
  and ``ā = [a; 1]``. For Conv2d, ``d_in = C_in·k_h·k_w`` in ``F.unfold`` order, which matches
  ``weight.flatten(1)``.
- In the **row-major** vec of ``W̄`` the block is ``G ⊗ A``: the output factor ``G``
  (``d_out x d_out``) comes first, the input factor ``A`` (``n x n``) second, and the bias is the
  last homogeneous coordinate of ``A``. (The papers' column-major order writes the same block
  ``A ⊗ G``.)
- ``to_dense``, ``matvec`` and ``matpow`` use ``parameters_to_vector`` order: all of
  ``W.flatten()``, then ``b``.
- The block is whatever scale the factors carry; :func:`bayes_kfoc.fit_curvature` returns the
  **summed** Fisher.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..options import BlockKind
from ._base import CurvatureBlock, as_damping, clamp_psd
from ._eigh import robust_eigh


def vec_to_mat(v: Tensor, d_out: int, d_in: int, bias: bool, transposed: bool = False) -> Tensor:
    """``[..., P]`` in ``parameters_to_vector`` order to ``W̄`` of shape ``[..., d_out, n]``;
    ``transposed``: the weight is stored ``[d_in, d_out]`` (``y = x W + b``, e.g. the
    ``Conv1D`` of GPT-2)."""
    if transposed:
        w = v[..., : d_out * d_in].reshape(*v.shape[:-1], d_in, d_out).transpose(-1, -2)
    else:
        w = v[..., : d_out * d_in].reshape(*v.shape[:-1], d_out, d_in)
    if not bias:
        return w
    return torch.cat([w, v[..., d_out * d_in :].unsqueeze(-1)], dim=-1)


def mat_to_vec(x: Tensor, bias: bool, transposed: bool = False) -> Tensor:
    """``W̄`` of shape ``[..., d_out, n]`` to ``[..., P]`` in ``parameters_to_vector`` order
    (``transposed``: see :func:`vec_to_mat`)."""
    w = x[..., :-1] if bias else x
    w = w.transpose(-1, -2).flatten(-2) if transposed else w.flatten(-2)
    if not bias:
        return w
    return torch.cat([w, x[..., -1]], dim=-1)


def _left(q: Tensor, x: Tensor) -> Tensor:
    """``q @ x`` for ``x`` of shape ``[..., m, k]`` as one 2-D GEMM (no broadcast copies)."""
    if x.ndim == 2:
        return q @ x
    xt = x.transpose(-1, -2)
    out = xt.reshape(-1, xt.shape[-1]) @ q.T
    return out.reshape((*xt.shape[:-1], q.shape[0])).transpose(-1, -2)


class KronBlock(CurvatureBlock):
    """``B = G ⊗ A`` in the row-major vec of ``W̄``; see the module docstring for conventions.

    Args:
        name: the module's name in the model.
        param_shapes: the weight's and (optionally) the bias's shapes, in that order, by their
            names in the module (``{"weight": ..., "bias": ...}`` for Linear / Conv2d,
            ``{"in_proj_weight": ..., "in_proj_bias": ...}`` for an attention's packed
            in-projection).
        A: input factor, ``[n, n]`` symmetric PSD, bias as the last coordinate.
        G: output factor, ``[d_out, d_out]`` symmetric PSD.
    """

    kind = BlockKind.KRON

    def __init__(
        self,
        name: str,
        param_shapes: dict[str, torch.Size],
        A: Tensor,
        G: Tensor,
        transposed: bool | Tensor = False,
    ):
        super().__init__(name, param_shapes)
        self.transposed = bool(transposed)
        shapes = [torch.Size(s) for s in param_shapes.values()]
        if self.transposed:  # weight [d_in, d_out]: validated as its transpose
            shapes[0] = torch.Size(reversed(shapes[0])) if len(shapes[0]) == 2 else shapes[0][:1]
        if (
            not 1 <= len(shapes) <= 2
            or len(shapes[0]) < 2
            or (len(shapes) == 2 and (shapes[1] != shapes[0][:1]))
        ):
            raise ValueError(
                f"{name}: a Kronecker block needs a weight [d_out, ...] and optionally a bias "
                f"[d_out], in that order; got {dict(param_shapes)}."
            )
        wshape = shapes[0]
        self.bias = len(shapes) == 2
        self.d_out = int(wshape[0])
        self.d_in = int(math.prod(wshape[1:]))
        n = self.d_in + int(self.bias)
        if A.shape != (n, n) or G.shape != (self.d_out, self.d_out):
            raise ValueError(
                f"{name}: factors must be A [{n}, {n}] and G [{self.d_out}, {self.d_out}], "
                f"got A {tuple(A.shape)} and G {tuple(G.shape)}."
            )
        if A.device != G.device or A.dtype != G.dtype:
            raise ValueError(
                f"{name}: factors must share device and dtype, got A on {A.device}/{A.dtype} and "
                f"G on {G.device}/{G.dtype}."
            )
        self.A = 0.5 * (A + A.T)
        self.G = 0.5 * (G + G.T)
        self._eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.A.device

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_A, Q_A, λ_G, Q_G)``: eigen-decompositions of both factors (PSD-clamped), cached.

        A factor whose decomposition fails to converge in its dtype (rank-deficient conv
        factors in float32) is redone in float64, or with a reported jitter
        (:func:`~bayes_kfoc.blocks._eigh.robust_eigh`); ``decompositions["A"]`` / ``["G"]`` say
        which.
        """
        if self._eig is None:
            la, qa, self.decompositions["A"] = robust_eigh(self.A, f"{self.name}.A")
            lg, qg, self.decompositions["G"] = robust_eigh(self.G, f"{self.name}.G")
            eps = self.round_off
            self._eig = (
                clamp_psd(la, f"{self.name}.A", eps),
                qa,
                clamp_psd(lg, f"{self.name}.G", eps),
                qg,
            )
        return self._eig

    def _perm(self) -> Tensor:
        n = self.d_in + int(self.bias)
        idx = torch.arange(self.d_out * n, device=self.device).reshape(self.d_out, n)
        return self.to_vec(idx)

    def to_mat(self, v: Tensor) -> Tensor:
        return vec_to_mat(v, self.d_out, self.d_in, self.bias, self.transposed)

    def to_vec(self, x: Tensor) -> Tensor:
        return mat_to_vec(x, self.bias, self.transposed)

    def to_dense(self) -> Tensor:
        perm = self._perm()
        return torch.kron(self.G, self.A)[perm][:, perm]

    def matvec(self, v: Tensor) -> Tensor:
        return self.to_vec(self.G @ self.to_mat(v) @ self.A)

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.A) * torch.linalg.matrix_norm(self.G)

    def trace(self) -> Tensor:
        return torch.trace(self.A) * torch.trace(self.G)

    def diagonal(self) -> Tensor:
        return self.to_vec(torch.outer(torch.diagonal(self.G), torch.diagonal(self.A)))

    def eigenvalues(self) -> Tensor:
        la, _, lg, _ = self.eigh()
        return torch.outer(lg, la).flatten()

    def damped_eigenvalues(self, damping: float | Tensor = 0.0) -> Tensor:
        """``S = λ_G λ_A^T + δ`` of shape ``[d_out, n]``, the spectrum in the joint eigenbasis."""
        la, _, lg, _ = self.eigh()
        return torch.outer(lg, la) + as_damping(damping, la)

    def matpow(self, v: Tensor, power: float, damping: float | Tensor = 0.0) -> Tensor:
        """``(G ⊗ A + δI)^p v = vec(Q_G [(Q_G^T X Q_A) ⊙ S^p] Q_A^T)``; no Kronecker product."""
        _, qa, _, qg = self.eigh()
        s = self.damped_eigenvalues(damping)
        x = _left(qg.T, self.to_mat(v) @ qa)
        return self.to_vec(_left(qg, x * s.pow(power)) @ qa.T)

    def sample(
        self, n: int, damping: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """``W̄ − W̄* = Q_G (E ⊘ √S) Q_A^T`` with ``E`` standard normal ``[n, d_out, n_in]``.

        ``E`` is already white in the eigenbasis, so two GEMMs per draw suffice
        (``docs/math.md``, "Kronecker posterior with exact damping").
        """
        _, qa, _, qg = self.eigh()
        s = self.damped_eigenvalues(damping)
        eps = torch.randn((n, *s.shape), generator=generator, dtype=self.dtype, device=self.device)
        return self.to_vec(_left(qg, eps * s.rsqrt()) @ qa.T)

    def _to(self, device: torch.device | None, dtype: torch.dtype | None) -> KronBlock:
        return KronBlock(
            self.name,
            self.param_shapes,
            self.A.to(device=device, dtype=dtype),
            self.G.to(device=device, dtype=dtype),
            self.transposed,
        )

    def tensors(self) -> dict[str, Tensor]:
        if self.transposed:  # a flag that travels with the saved tensors
            return {"A": self.A, "G": self.G, "transposed": torch.tensor(True)}
        return {"A": self.A, "G": self.G}
