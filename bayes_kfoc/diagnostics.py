"""Fisher-fidelity diagnostics: how well each structure approximates the exact Fisher block.

Everything here is matrix-free: for a block ``K`` of module ``m`` and the exact summed block ``F``,

- ``||F||_F² = Σ_{k,l} ⟨g_k, g_l⟩²`` over per-direction gradients ``g``; for Linear layers this is
  ``Σ_{n,m} (ā_n·ā_m)² ||Δ_n Δ_m^T||_F²`` (``docs/math.md``, "Certificate"), computed batch pair by
  batch pair;
- ``⟨F, K⟩_F = Σ_k g_k^T K g_k`` (for ``G ⊗ A`` and ``T = 1``: ``Σ_n (ā^T A ā) Σ_v δ^T G δ``);
- ``||F − K||_F² = ||F||² − 2⟨F, K⟩ + ||K||²``.

The **K-FOC certificate** uses only ``σ₁`` from the fit: ``||F − G⊗A||_F² = ||F||² − σ₁²``, so the
captured fraction is ``σ₁² / ||F||²`` and the relative error ``sqrt(1 − σ₁²/||F||²)``.
Cost is quadratic in the number of data points: meant for small data sets such as digits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .curvature import Curvature, FitOptions, fit_curvature, prepare
from .stats import Collector, Stats


@dataclass
class Fidelity:
    """Per-module fidelity: relative Frobenius errors against the exact block, and the certificate.

    Attributes:
        module: module name.
        num_params: parameters in the block.
        fisher_norm: ``||F||_F`` of the exact summed block.
        errors: ``{structure: ||F − K||_F / ||F||_F}``.
        kfoc_captured: ``σ₁² / ||F||_F²`` (Kronecker modules under K-FOC only).
        kfoc_certificate: ``sqrt(1 − σ₁²/||F||_F²)``, equal to ``errors["kfoc"]`` at convergence.
    """

    module: str
    num_params: int
    fisher_norm: float
    errors: dict[str, float]
    kfoc_captured: float | None = None
    kfoc_certificate: float | None = None


def _collect(
    model: nn.Module,
    loader: Iterable[Any],
    fisher: str,
    modules: str | Sequence[str],
    mc_samples: int,
    seed: int,
    progress: bool,
) -> tuple[list[str], list[dict[str, Stats]]]:
    opts = FitOptions.parse(
        "full",
        fisher,
        modules,
        mc_samples=mc_samples,
        seed=seed,
        progress=progress,
        distributed=False,
    )
    setup = prepare(model, loader, opts)
    batches: list[dict[str, Stats]] = []
    gen = setup.passes.generator()
    with Collector(model, setup.targets, opts.fisher, mc_samples) as col:
        for x, y in setup.passes.batches("fidelity"):
            batches.append(col.batch(x, y, gen)[0])
    return [t.name for t in setup.targets], batches


def fisher_sq_norms(batches: list[dict[str, Stats]], names: list[str]) -> dict[str, Tensor]:
    """``||F_m||_F²`` per module from cached per-batch statistics (pairs of batches, chunked)."""
    out: dict[str, Tensor] = {}
    for name in names:
        total: Tensor | None = None
        for i, bi in enumerate(batches):
            for j in range(i, len(batches)):
                term = bi[name].gram_cross(batches[j][name])  # type: ignore[arg-type]
                term = term if i == j else 2 * term
                total = term if total is None else total + term
        assert total is not None
        out[name] = total
    return out


def fisher_fidelity(
    model: nn.Module,
    loader: Iterable[Any],
    fisher: str = "exact",
    structures: Sequence[str] = ("diag", "kfac", "kfoc"),
    modules: str | Sequence[str] = "all",
    *,
    curvatures: dict[str, Curvature] | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
    **fit_kwargs: Any,
) -> list[Fidelity]:
    """Relative Frobenius error of each structure against the exact summed Fisher, per module.

    Args:
        model, loader, fisher, modules, mc_samples, seed: as in :func:`fit_curvature`; the same
            ``seed`` draws the same MC labels as the fits.
        structures: structures to fit and compare (ignored for those in ``curvatures``).
        curvatures: already fitted ``{structure: Curvature}`` to evaluate instead of refitting.
        fit_kwargs: forwarded to :func:`fit_curvature` (e.g. ``tol``).

    Returns:
        One :class:`Fidelity` per module, in forward order.
    """
    names, batches = _collect(model, loader, fisher, modules, mc_samples, seed, progress)
    curvatures = dict(curvatures or {})
    for s in structures:
        if s not in curvatures:
            curvatures[s] = fit_curvature(
                model,
                loader,
                s,
                fisher,
                modules,
                mc_samples=mc_samples,
                seed=seed,
                progress=progress,
                **fit_kwargs,
            )
    norms = fisher_sq_norms(batches, names)
    rows = []
    for name in names:
        f2 = norms[name]
        errors: dict[str, float] = {}
        captured = certificate = None
        for s, curv in curvatures.items():
            block = curv.blocks[name]
            inner = sum((b[name].inner(block) for b in batches), torch.zeros_like(f2))
            err2 = f2 - 2 * inner + block.frobenius_norm().square()
            errors[s] = math.sqrt(max(float(err2 / f2), 0.0)) if f2 > 0 else 0.0
            if s == "kfoc" and "sigma1" in block.info:
                captured = float(block.info["sigma1"] ** 2 / f2) if f2 > 0 else 1.0
                certificate = math.sqrt(max(1.0 - captured, 0.0))
        num = next(iter(curvatures.values())).blocks[name].num_params
        rows.append(Fidelity(name, num, float(f2.sqrt()), errors, captured, certificate))
    return rows
