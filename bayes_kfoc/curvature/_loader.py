"""What a fit may assume about its loader, checked: re-iterable when a second pass is needed,
and the same points in every pass.

The first pass records a fingerprint of every batch (points, sums of ``x``, ``|x|``, ``x²``,
``y``, ``y²`` and position-weighted sums of ``x`` and ``y``, in float64); each later (streaming)
pass must reproduce the pass totals of the order-free sums (``fisher="exact"`` /
``"empirical"``: the summed statistics do not depend on the order), and with ``fisher="mc"``
every batch in order (the sampled labels are re-drawn batch by batch from one seed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..stats.inputs import Inputs

PASS_RTOL = 1e-9
"""Relative tolerance of a fingerprint match: far above float64 round-off of re-ordered sums,
far below any change of one point."""

_ORDER_FREE = [0, 1, 2, 3, 5, 6]  # every sum but the position-weighted ones


def is_one_shot(loader: Iterable[Any], started: Any) -> bool:
    """Whether ``loader`` is its own iterator (a generator, ``iter(...)``, a file-like stream):
    a second ``iter(loader)`` would resume it, not start over."""
    return started is loader


def one_shot_error(loader: Iterable[Any], reason: str) -> ValueError:
    return ValueError(
        f"fit_curvature: the loader is a one-shot iterator ({type(loader).__name__}; "
        f"iter(loader) is loader), but {reason} needs another pass over the data. Pass a "
        "re-iterable loader (a DataLoader, a list of batches, or an object whose __iter__ starts "
        "over), or fit from one pass: mode='cached' with a memory_budget that holds K-FOC's "
        "statistics, or structure='kfac' / 'diag'."
    )


def fingerprint(x: Inputs, y: Tensor) -> Tensor:
    """``[8]`` float64: points, ``Σx``, ``Σ|x|``, ``Σx²``, ``Σ_n n·Σx_n``, ``Σy``, ``Σy²``,
    ``Σ_n n·y_n`` (``n`` the position in the batch; a mapping's tensor values concatenated per
    point)."""
    n = y.shape[0]
    if isinstance(x, Tensor):
        xf = x.reshape(n, -1).to(torch.float64)
    else:
        parts = [v.reshape(n, -1).to(torch.float64) for v in x.values() if isinstance(v, Tensor)]
        xf = torch.cat(parts, dim=1) if parts else y.new_zeros(n, 1, dtype=torch.float64)
    per_point = xf.sum(1)
    yf = y.to(torch.float64)
    w = torch.arange(1, n + 1, dtype=torch.float64, device=y.device)
    count = torch.tensor(float(n), dtype=torch.float64, device=y.device)
    return torch.stack(
        [
            count,
            per_point.sum(),
            xf.abs().sum(),
            xf.square().sum(),
            (per_point * w).sum(),
            yf.sum(),
            yf.square().sum(),
            (yf * w).sum(),
        ]
    )


def same(a: Tensor, b: Tensor, entries: list[int] | None = None) -> bool:
    """Whether two fingerprints (or pass totals) match: the label sums and counts exactly (they
    are whole numbers below 2**53), the sums of ``x`` to :data:`PASS_RTOL` of ``Σ|x|``."""
    abs_x = torch.maximum(a[2], b[2])
    half = torch.full((), 0.5, dtype=a.dtype, device=a.device)
    x_scale = torch.stack([abs_x, abs_x, torch.maximum(a[3], b[3]), abs_x * a[0]])
    tol = torch.cat([half[None], PASS_RTOL * x_scale, half.expand(3)])
    idx = list(range(a.numel())) if entries is None else entries
    return bool(((a[idx] - b[idx]).abs() <= tol[idx]).all())


class PassRecord:
    """The fingerprints of one pass, batch by batch (see the module docstring)."""

    def __init__(self) -> None:
        self.prints: list[Tensor] = []

    def add(self, x: Inputs, y: Tensor) -> Tensor:
        self.prints.append(fingerprint(x, y))
        return self.prints[-1]

    def total(self) -> Tensor:
        if not self.prints:
            return torch.zeros(8, dtype=torch.float64)
        return torch.stack(self.prints).sum(0)


def mismatch_error(index: int, what: str, ordered: bool) -> RuntimeError:
    need = (
        "the same batches in the same order (fisher='mc' re-draws its labels batch by batch)"
        if ordered
        else "the same points"
    )
    return RuntimeError(
        f"fit_curvature: pass {index} over the loader saw different data than the first pass "
        f"({what}); streaming K-FOC needs a loader that yields {need} in every pass. Use "
        "shuffle=False (with fisher='mc') and no random augmentation, a loader that yields "
        "every batch on every pass, or mode='cached'."
    )


def check_batch(ref: PassRecord, got: PassRecord, index: int) -> None:
    """``fisher="mc"``: the latest batch of ``got`` must match the first pass's batch."""
    i = len(got.prints) - 1
    if i >= len(ref.prints):
        raise mismatch_error(index, f"more than the first pass's {len(ref.prints)} batches", True)
    if not same(ref.prints[i], got.prints[i]):
        n_ref, n_got = int(ref.prints[i][0]), int(got.prints[i][0])
        detail = f"{n_got} points, not {n_ref}" if n_ref != n_got else "other values of x or y"
        raise mismatch_error(index, f"batch {i} holds {detail}", True)


def check_pass(ref: PassRecord, got: PassRecord, index: int, ordered: bool) -> None:
    """At the end of a later pass: as many batches (ordered) / points, and matching totals."""
    a, b = ref.total(), got.total()
    if ordered and len(got.prints) != len(ref.prints):
        raise mismatch_error(
            index, f"{len(got.prints)} batches, the first pass {len(ref.prints)}", True
        )
    if int(a[0]) != int(b[0]):
        raise mismatch_error(index, f"{int(b[0])} points, the first pass {int(a[0])}", ordered)
    if not same(a, b, _ORDER_FREE):
        raise mismatch_error(index, "the sums of x and y differ", ordered)
