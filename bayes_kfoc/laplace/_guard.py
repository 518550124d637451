"""Checks that a fitted posterior still describes the model it predicts with, and of sample
counts: eval mode, weights equal to the fitted ones, ``n_samples`` a positive integer."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from ..curvature import check_train_mode

WEIGHTS_RTOL = 1e-10
"""Relative tolerance of a weights fingerprint match (float64 sums of the same values agree to
round-off; any training step moves them by far more)."""


def _fingerprint(p: Tensor) -> Tensor:
    """``[2, 4]`` float64: ``Σp``, ``Σp²`` and the row- and column-index-weighted sums of ``p``
    (as ``[d0, rest]``), and below each its round-off scale (``Σ|p| ≤ sqrt(numel · Σp²)``)."""
    m = p.detach().reshape(p.shape[0] if p.ndim else 1, -1).to(torch.float64)
    rows = torch.arange(1, m.shape[0] + 1, dtype=torch.float64, device=m.device)
    cols = torch.arange(1, m.shape[1] + 1, dtype=torch.float64, device=m.device)
    sq = m.square().sum()
    l1 = (m.numel() * sq).sqrt()
    values = torch.stack([m.sum(), sq, rows @ m.sum(1), cols @ m.sum(0)])
    return torch.stack([values, torch.stack([l1, sq, m.shape[0] * l1, m.shape[1] * l1])])


def fingerprints(model: nn.Module) -> dict[str, Tensor]:
    """A cheap fingerprint of every parameter (``O(P)`` time, ``O(1)`` memory per parameter)."""
    return {k: _fingerprint(p).cpu() for k, p in model.named_parameters()}


def check_weights(model: nn.Module, fitted: dict[str, Tensor], what: str) -> None:
    """Raise ``RuntimeError`` when the model's parameters differ from those at the fit."""
    now = fingerprints(model)
    changed = [k for k in fitted if k not in now]
    for k, f in now.items():
        ref = fitted.get(k)
        if ref is None:
            changed.append(k)
            continue
        tol = WEIGHTS_RTOL * torch.maximum(f[1], ref[1]) + 1e-300
        if not bool(((f[0] - ref[0]).abs() <= tol).all()):
            changed.append(k)
    if changed:
        raise RuntimeError(
            f"{what}: the model's weights changed since the posterior was fitted (parameter(s) "
            f"{changed[:5]}); the GLM predictive would linearise at the new weights while "
            "method='mc' samples around the stored MAP. Refit (la.fit(train_loader)) for the new "
            "weights, or restore the fitted ones: torch.nn.utils.vector_to_parameters("
            "la.map_vector, model.parameters())."
        )


def check_model(model: nn.Module, fitted: dict[str, Tensor], what: str) -> None:
    """The model is in eval mode (no dropout / batch-norm updates) and has the fitted weights."""
    check_train_mode(
        model, what, "dropout makes the predictive vary between calls, and batch norm in train "
        "mode uses batch statistics the posterior was not fitted with"
    )  # fmt: skip
    check_weights(model, fitted, what)


def check_num_samples(n: object, what: str) -> int:
    """``n`` as an ``int``; raises unless it is a positive integer (``bool`` is rejected)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(
            f"{what}: n_samples must be a positive integer (the number of Monte-Carlo draws), "
            f"got {n!r} of type {type(n).__name__}; pass e.g. n_samples=100."
        )
    if int(n) < 1:
        raise ValueError(
            f"{what}: n_samples must be a positive integer (the number of Monte-Carlo draws), "
            f"got {int(n)}; pass e.g. n_samples=100"
            + (" (link='probit' needs none)." if what == "Laplace.predict" else ".")
        )
    return int(n)
