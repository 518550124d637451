"""The interface every curvature block implements.

A block represents one module's curvature ``B`` (a summed Fisher block, ``P x P``) in the order of
``torch.nn.utils.parameters_to_vector(module.parameters())``: weight row-major, then bias.
All powers are taken with *exact* damping, ``(B + δI)^p``, through the block's eigenbasis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..options import BlockKind
from ._eigh import Decomposition


def clamp_psd(evals: Tensor, name: str, eps: float | None = None) -> Tensor:
    """Clamp round-off negatives of a PSD spectrum to zero; raise on a truly negative one.

    ``eps`` is the unit round-off of the dtype the matrix was *computed* in (a float32 factor
    decomposed in float64 carries float32 round-off); default: that of ``evals``.
    """
    if not bool(torch.isfinite(evals).all()):
        raise FloatingPointError(f"{name}: non-finite eigenvalues; the curvature has NaN or Inf.")
    eps = torch.finfo(evals.dtype).eps if eps is None else max(eps, torch.finfo(evals.dtype).eps)
    scale = evals.abs().max().clamp_min(torch.finfo(evals.dtype).tiny)
    tol = 100 * evals.numel() * eps * scale
    low = evals.min()
    if bool(low < -tol):
        raise ValueError(
            f"{name}: the factor is not positive semi-definite (smallest eigenvalue "
            f"{low.item():.3e}, largest {scale.item():.3e}); curvature factors must be PSD. Refit "
            "in float64 (fit_curvature(..., dtype=torch.float64)), decompose in float64 "
            "(Laplace(..., eig_dtype=torch.float64)), or check the model for non-finite outputs."
        )
    return evals.clamp_min(0.0)


def as_damping(damping: float | Tensor, like: Tensor) -> Tensor:
    d = torch.as_tensor(damping, dtype=like.dtype, device=like.device)
    if d.ndim != 0:
        raise ValueError(f"damping must be a scalar, got shape {tuple(d.shape)}.")
    return d


class CurvatureBlock(ABC):
    """One module's curvature block; subclasses hold a structured representation."""

    kind: BlockKind  # kron, diag or full: set by each subclass

    @property
    def structure(self) -> str:
        """The block's kind as a string (an alias of :attr:`kind`)."""
        return self.kind.value

    def __init__(self, name: str, param_shapes: dict[str, torch.Size]):
        self.name = name
        self.param_shapes = dict(param_shapes)
        self.info: Mapping[str, Any] = {}  # how the fit ended (K-FOC: a SolverInfo)
        self.round_off: float | None = None  # unit round-off of the dtype the block was fit in
        # how each factor's eigendecomposition was obtained, once it has been ({"A", "G"} for
        # a Kronecker block, {"matrix"} for a dense one; a diagonal block needs none)
        self.decompositions: dict[str, Decomposition] = {}

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes.values())

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The block as a dense ``[P, P]`` matrix in ``parameters_to_vector`` order."""

    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        """``B v`` for ``v`` of shape ``[..., P]``."""

    @abstractmethod
    def frobenius_norm(self) -> Tensor: ...

    @abstractmethod
    def trace(self) -> Tensor: ...

    @abstractmethod
    def diagonal(self) -> Tensor:
        """The diagonal of ``B`` as ``[P]`` in ``parameters_to_vector`` order."""

    @abstractmethod
    def eigenvalues(self) -> Tensor:
        """All ``P`` eigenvalues of ``B`` (undamped, clamped PSD), in no particular order."""

    @abstractmethod
    def matpow(self, v: Tensor, power: float, damping: float | Tensor = 0.0) -> Tensor:
        """``(B + δI)^p v`` for ``v`` of shape ``[..., P]``, with exact damping ``δ``."""

    @abstractmethod
    def _to(self, device: torch.device | None, dtype: torch.dtype | None) -> CurvatureBlock: ...

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define the block (for ``state_dict``)."""

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CurvatureBlock:
        """A copy on ``device`` / in ``dtype`` (PyTorch's ``.to`` habit)."""
        out = self._to(torch.device(device) if device is not None else None, dtype)
        out.info = self.info
        out.round_off = max(self.round_off or 0.0, torch.finfo(self.dtype).eps)
        return out

    def sample(
        self, n: int, damping: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """``[n, P]`` draws from ``N(0, (B + δI)^{-1})``; subclasses avoid the full ``matpow``."""
        eps = torch.randn(
            n, self.num_params, generator=generator, dtype=self.dtype, device=self.device
        )
        return self.matpow(eps, -0.5, damping)

    def logdet(self, damping: float | Tensor = 0.0) -> Tensor:
        """``log det (B + δI)``, exact."""
        lam = self.eigenvalues() + as_damping(damping, self.eigenvalues())
        if bool((lam <= 0).any()):
            raise ValueError(
                f"{self.name}: log-determinant of a singular matrix; pass a positive damping."
            )
        return torch.log(lam).sum()

    def inverse(self, damping: float | Tensor = 0.0) -> Tensor:
        """``(B + δI)^{-1}`` as a dense ``[P, P]`` matrix (small blocks only)."""
        return self.power(-1.0, damping)

    def power(self, power: float, damping: float | Tensor = 0.0) -> Tensor:
        """``(B + δI)^p`` as a dense ``[P, P]`` matrix (small blocks only)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self.matpow(eye, power, damping)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_params={self.num_params})"
