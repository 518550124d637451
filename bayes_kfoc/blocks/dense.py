"""A dense curvature block (small modules and dense references)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import BlockKind
from ._base import CurvatureBlock, as_damping, clamp_psd
from ._eigh import robust_eigh


class DenseBlock(CurvatureBlock):
    """A dense symmetric PSD block ``B`` (``[P, P]``) in ``parameters_to_vector`` order."""

    kind = BlockKind.FULL

    def __init__(self, name: str, param_shapes: dict[str, torch.Size], matrix: Tensor):
        super().__init__(name, param_shapes)
        if matrix.shape != (self.num_params, self.num_params):
            raise ValueError(
                f"{name}: dense block must be [{self.num_params}, {self.num_params}], "
                f"got {tuple(matrix.shape)}."
            )
        self.matrix = 0.5 * (matrix + matrix.T)
        self._eig: tuple[Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (clamped PSD) and eigenvectors, cached; a decomposition that fails to
        converge is redone in float64 or with a reported jitter (``decompositions["matrix"]``)."""
        if self._eig is None:
            evals, evecs, self.decompositions["matrix"] = robust_eigh(self.matrix, self.name)
            self._eig = (clamp_psd(evals, self.name, self.round_off), evecs)
        return self._eig

    def to_dense(self) -> Tensor:
        return self.matrix.clone()

    def matvec(self, v: Tensor) -> Tensor:
        return v @ self.matrix

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.matrix)

    def trace(self) -> Tensor:
        return torch.trace(self.matrix)

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.matrix).clone()

    def eigenvalues(self) -> Tensor:
        return self.eigh()[0]

    def matpow(self, v: Tensor, power: float, damping: float | Tensor = 0.0) -> Tensor:
        evals, evecs = self.eigh()
        lam = evals + as_damping(damping, evals)
        return ((v @ evecs) * lam.pow(power)) @ evecs.T

    def sample(
        self, n: int, damping: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        evals, evecs = self.eigh()
        eps = torch.randn(
            n, self.num_params, generator=generator, dtype=self.dtype, device=self.device
        )
        return (eps * (evals + as_damping(damping, evals)).rsqrt()) @ evecs.T

    def _to(self, device: torch.device | None, dtype: torch.dtype | None) -> DenseBlock:
        return DenseBlock(self.name, self.param_shapes, self.matrix.to(device=device, dtype=dtype))

    def tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}
