"""A diagonal curvature block."""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import BlockKind
from ._base import CurvatureBlock, as_damping, clamp_psd


class DiagBlock(CurvatureBlock):
    """A diagonal block ``diag(d)``, ``d`` of shape ``[P]`` in ``parameters_to_vector`` order."""

    kind = BlockKind.DIAG

    def __init__(self, name: str, param_shapes: dict[str, torch.Size], values: Tensor):
        super().__init__(name, param_shapes)
        if values.shape != (self.num_params,):
            raise ValueError(
                f"{name}: diagonal block must be [{self.num_params}], got {tuple(values.shape)}."
            )
        self.values = clamp_psd(values, name)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> Tensor:
        return torch.diag(self.values)

    def matvec(self, v: Tensor) -> Tensor:
        return v * self.values

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.values)

    def trace(self) -> Tensor:
        return self.values.sum()

    def diagonal(self) -> Tensor:
        return self.values.clone()

    def eigenvalues(self) -> Tensor:
        return self.values

    def matpow(self, v: Tensor, power: float, damping: float | Tensor = 0.0) -> Tensor:
        return v * (self.values + as_damping(damping, self.values)).pow(power)

    def sample(
        self, n: int, damping: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        eps = torch.randn(
            n, self.num_params, generator=generator, dtype=self.dtype, device=self.device
        )
        return eps * (self.values + as_damping(damping, self.values)).rsqrt()

    def _to(self, device: torch.device | None, dtype: torch.dtype | None) -> DiagBlock:
        return DiagBlock(self.name, self.param_shapes, self.values.to(device=device, dtype=dtype))

    def tensors(self) -> dict[str, Tensor]:
        return {"values": self.values}
