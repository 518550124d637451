"""A symmetric eigendecomposition that does not fail on rank-deficient curvature factors.

LAPACK's float32 ``syevd`` (MKL's in particular) can fail to converge on PSD factors with many
repeated (zero) eigenvalues: the input factor ``A`` of a convolution whose padding reaches past a
``1 x 1`` feature map (ResNet-18's ``layer4`` at 32 x 32 inputs: 8 of every 9 unfolded columns
are exactly zero) makes ``torch.linalg.eigh`` raise. :func:`robust_eigh` then

1. redoes the decomposition in float64 and casts the eigenpairs back to the factor's dtype
   (:attr:`EighMethod.FLOAT64`);
2. if float64 fails too, decomposes ``F + δI`` in float64 for an increasing tiny ``δ``
   (:data:`JITTERS`, relative to the largest diagonal entry) and subtracts ``δ`` from the
   eigenvalues again (:attr:`EighMethod.JITTER`): ``F`` and ``F + δI`` have the same
   eigenvectors, so the result is ``F``'s eigendecomposition up to round-off of order ``δ``;
3. otherwise raises an error that names the factor and every fix.

Each call returns a :class:`Decomposition` saying which of these was done; blocks keep one per
factor (``block.decompositions``) and :meth:`bayes_kfoc.Curvature.decompose` writes them into the
coverage report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import StrEnum

JITTERS = (1e-12, 1e-9, 1e-6)
"""Diagonal shifts tried in float64 when a plain float64 ``eigh`` fails, relative to the factor's
largest diagonal entry (a PSD matrix's largest entry)."""


class EighMethod(StrEnum):
    """How a factor's eigendecomposition was obtained.

    - ``native``: ``torch.linalg.eigh`` in the factor's own dtype.
    - ``float64``: the factor's dtype failed to converge; redone in float64, cast back.
    - ``jitter``: float64 failed too; ``F + δI`` decomposed in float64, ``δ`` subtracted from the
      eigenvalues, cast back.
    """

    NATIVE = "native"
    FLOAT64 = "float64"
    JITTER = "jitter"


@dataclass(frozen=True)
class Decomposition:
    """The record of one factor's eigendecomposition.

    Attributes:
        method: what was done (:class:`EighMethod`).
        dtype: the factor's dtype (the eigenpairs are returned in it).
        jitter: ``δ``, the absolute diagonal shift used (``0`` unless ``method`` is ``jitter``).
        relative_jitter: ``δ`` over the factor's largest diagonal entry.
    """

    method: EighMethod
    dtype: torch.dtype
    jitter: float = 0.0
    relative_jitter: float = 0.0

    @property
    def fallback(self) -> bool:
        """Whether the plain decomposition in the factor's dtype failed."""
        return self.method is not EighMethod.NATIVE

    def describe(self) -> str:
        """A short phrase for the coverage report."""
        short = str(self.dtype).removeprefix("torch.")
        if self.method is EighMethod.NATIVE:
            return f"eigh in {short}"
        if self.method is EighMethod.FLOAT64:
            return f"{short} eigh failed to converge, redone in float64"
        return (
            f"{short} and float64 eigh failed to converge, redone in float64 with jitter "
            f"δ = {self.jitter:.2e} ({self.relative_jitter:.0e} of the largest diagonal entry, "
            "subtracted again)"
        )


def _try(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """``torch.linalg.eigh`` of ``matrix`` (batched allowed), or ``None`` if it did not converge
    or returned non-finite values."""
    try:
        evals, evecs = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        return None
    if not bool(torch.isfinite(evals).all()):
        return None
    return evals, evecs


def robust_eigh(matrix: Tensor, name: str) -> tuple[Tensor, Tensor, Decomposition]:
    """``(eigenvalues, eigenvectors, record)`` of the symmetric ``matrix`` (``[..., n, n]``),
    in its dtype, with the fallbacks of the module docstring.

    Raises:
        FloatingPointError: ``matrix`` has NaN or Inf entries.
        torch.linalg.LinAlgError: no fallback converged.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(
            f"{name}: non-finite entries (NaN or Inf) in a {tuple(matrix.shape)} curvature "
            "factor; the model produced non-finite outputs or gradients on the fit data. Check "
            "the model and data, or fit in float64 (fit_curvature(..., dtype=torch.float64))."
        )
    dtype = matrix.dtype
    out = _try(matrix)
    if out is not None:
        return out[0], out[1], Decomposition(EighMethod.NATIVE, dtype)
    wide = matrix.to(torch.float64)
    if dtype != torch.float64:
        out = _try(wide)
        if out is not None:
            return out[0].to(dtype), out[1].to(dtype), Decomposition(EighMethod.FLOAT64, dtype)
    scale = float(torch.diagonal(wide, dim1=-2, dim2=-1).abs().max()) if wide.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(wide.shape[-1], dtype=torch.float64, device=wide.device)
    for rel in JITTERS:
        delta = rel * scale
        out = _try(wide + delta * eye)
        if out is not None:
            record = Decomposition(EighMethod.JITTER, dtype, delta, rel)
            return (out[0] - delta).to(dtype), out[1].to(dtype), record
    raise torch.linalg.LinAlgError(
        f"{name}: the symmetric eigendecomposition of this {tuple(matrix.shape)} {dtype} "
        f"curvature factor failed to converge in {dtype}, in float64, and in float64 with a "
        f"diagonal jitter of up to {JITTERS[-1]:.0e} of its largest entry. Fixes: fit the "
        "curvature in float64 (fit_curvature(..., dtype=torch.float64)); decompose in float64 "
        "(Laplace(..., eig_dtype=torch.float64)); or check the model and data for extreme "
        "values (the factor's largest diagonal entry is "
        f"{scale:.3e})."
    )
