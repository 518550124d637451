"""The result of :func:`bayes_kfoc.fit_curvature`: one block per module, plus coverage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, Decomposition
from ..options import FisherType, Structure
from .coverage import full_param_name, note_decompositions
from .info import FitInfo


@dataclass
class Curvature:
    """Curvature blocks of a model, keyed by module name (in forward-call order).

    Attributes:
        blocks: ``{module_name: block}``; each block is the **summed** Fisher of that module's
            own parameters, in ``parameters_to_vector(module.parameters())`` order.
        structure: ``"kfoc"``, ``"kfac"``, ``"diag"`` or ``"full"``.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"``.
        num_data: number of data points summed over (all ranks).
        mode: ``"cached"`` or ``"streaming"`` (how K-FOC saw the data); ``"single-pass"`` else
            (``"loaded"`` for a posterior read from a file that did not record it).
        coverage: ``{parameter_name: how it is covered}`` for every trainable parameter of the
            model, so that nothing is silently dropped; after :meth:`decompose` (which
            ``Laplace`` runs) it also names every factor whose eigendecomposition needed a
            fallback.
        info: fit details (:class:`FitInfo`): ``log_likelihood`` (summed ``log p(y|x, θ)`` over
            the data, at the fitted weights), ``input_shape``, ``base_seed`` and the cache
            estimates.
    """

    blocks: dict[str, CurvatureBlock]
    structure: Structure
    fisher: FisherType
    num_data: int
    mode: str
    coverage: dict[str, str]
    info: FitInfo

    def __getitem__(self, name: str) -> CurvatureBlock:
        return self.blocks[name]

    @property
    def num_params(self) -> int:
        return sum(b.num_params for b in self.blocks.values())

    def param_names(self) -> list[str]:
        """Full parameter names covered by the blocks, in block order."""
        return [full_param_name(k, p) for k, b in self.blocks.items() for p in b.param_shapes]

    def to_dense(self) -> Tensor:
        """Block-diagonal ``[P, P]`` over all blocks, in :meth:`param_names` order."""
        return torch.block_diag(*[b.to_dense() for b in self.blocks.values()])

    def convergence(self) -> dict[str, dict[str, Any]]:
        """Per-block solver info (K-FOC only): iterations, residual, σ₁, converged, scheme."""
        return {k: dict(b.info) for k, b in self.blocks.items() if b.info}

    def decompose(self) -> dict[str, dict[str, Decomposition]]:
        """Eigendecompose every block now (each block caches it) and note in :attr:`coverage`
        every factor that needed a fallback (float64 or jitter, see
        :func:`~bayes_kfoc.blocks.robust_eigh`); returns ``{module: {factor: Decomposition}}``
        for the blocks that have factors to decompose (Kronecker and dense).

        Raises the block's error on a factor that is not PSD or not finite."""
        for b in self.blocks.values():
            b.eigenvalues()
        note_decompositions(self.coverage, self.blocks)
        return self.decompositions()

    def decompositions(self) -> dict[str, dict[str, Decomposition]]:
        """``{module: {factor: Decomposition}}`` of the blocks decomposed so far."""
        return {k: dict(b.decompositions) for k, b in self.blocks.items() if b.decompositions}

    def report(self) -> str:
        """A plain-text table: every trainable parameter and how it is covered."""
        width = max((len(k) for k in self.coverage), default=10)
        lines = [f"{'parameter':<{width}}  coverage", f"{'-' * width}  --------"]
        lines += [f"{k:<{width}}  {v}" for k, v in self.coverage.items()]
        return "\n".join(lines)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Curvature:
        return Curvature(
            {k: b.to(device, dtype) for k, b in self.blocks.items()},
            self.structure,
            self.fisher,
            self.num_data,
            self.mode,
            dict(self.coverage),
            self.info,
        )
