"""Typed records of a fit: per-block solver info and per-fit info.

Both are read-only mappings too (``info["sigma1"]``, ``dict(info)``), so code written against the
earlier plain dictionaries keeps working, while attribute access is typed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any


class _RecordMapping(Mapping[str, Any]):
    """Read-only mapping over a dataclass's fields, leaving out those that are ``None``."""

    def _present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if key in self._present():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())


@dataclass(frozen=True, eq=False)
class SolverInfo(_RecordMapping):
    """How K-FOC's solver ended for one block.

    Attributes:
        iterations: iterations (pairs of ``A`` / ``G`` updates) run.
        converged: whether the stopping rule was met before ``max_iter``.
        residual: the relative change one more power half-step would make (power iteration:
            the measured change; Lanczos: its bound, the relative residual of the Ritz pair).
        sigma1: ``σ₁``, the top singular value of the rearranged block (``||G ⊗ A||_F``).
        tol: the tolerance used (after the dtype floor).
        scheme: ``"lanczos"``, ``"gauss-seidel"`` (cached power iteration) or ``"jacobi"``
            (streaming power iteration).
        mode: ``"cached"`` or ``"streaming"`` (``None`` outside a fit).
        half_steps: Lanczos only: operator applications (``A`` and ``G`` half-steps).
        psd_clamped: Lanczos only: relative Frobenius norm removed by the PSD projection.
    """

    iterations: int
    converged: bool
    residual: float
    sigma1: float
    tol: float
    scheme: str
    mode: str | None = None
    half_steps: int | None = None
    psd_clamped: float | None = None


@dataclass(frozen=True, eq=False)
class FitInfo(_RecordMapping):
    """Details of one fit that the posterior and the diagnostics need.

    Attributes:
        log_likelihood: ``Σ_n log p(y_n | x_n, θ)`` over the data (all ranks), at the fitted
            weights (the Laplace evidence's data term).
        input_shape: the shape of one input (``x.shape[1:]`` of the first batch).
        base_seed: the seed every pass drew its MC labels from (``None`` for a loaded posterior).
        cache_bytes_estimate: K-FOC's estimated statistics cache for the whole loader (bytes).
        peak_bytes_estimate: that cache plus the per-layer solver work (bytes).
    """

    log_likelihood: float
    input_shape: tuple[int, ...]
    base_seed: int | None
    cache_bytes_estimate: int | None = None
    peak_bytes_estimate: int | None = None
