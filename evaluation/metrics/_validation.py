"""Input conversion and validation shared by all metrics.

Every public metric converts its inputs with the helpers below, so that the same rules apply
everywhere: inputs may be :class:`torch.Tensor` or :class:`numpy.ndarray` (or anything
:func:`numpy.asarray` accepts), are converted to ``float64``/``int64`` NumPy arrays, and invalid
input raises a :class:`ValueError` whose message starts with the metric's name.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch

ArrayLike: TypeAlias = torch.Tensor | npt.ArrayLike
"""Accepted input type: a torch tensor (any device; detached) or a NumPy array-like."""

ROW_SUM_ATOL: float = 1e-3
"""Absolute tolerance on ``|sum_c p_ic - 1|`` (and on ``p_ic`` leaving ``[0, 1]``).

Loose enough for float32/float16 softmax outputs and Monte-Carlo averages of them, tight enough
to reject logits or unnormalised scores.
"""


def _to_numpy(x: ArrayLike, name: str, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return np.asarray(t.numpy())
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:  # ragged lists etc.
        raise ValueError(f"{name}: cannot convert {what} to an array: {err}") from err


def as_float_array(x: ArrayLike, name: str, what: str) -> np.ndarray:
    """Convert to a finite ``float64`` array (any shape).

    Raises:
        ValueError: non-numeric dtype, empty input, or NaN/Inf entries.
    """
    arr = _to_numpy(x, name, what)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: {what} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.size == 0:
        raise ValueError(f"{name}: {what} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {what} contains NaN or Inf")
    return arr


def check_simplex(p: np.ndarray, name: str, what: str = "probs") -> None:
    """Check that the last axis of ``p`` holds probability vectors (within ``ROW_SUM_ATOL``)."""
    if p.shape[-1] < 1:
        raise ValueError(f"{name}: {what} has no classes")
    if p.min() < -ROW_SUM_ATOL or p.max() > 1.0 + ROW_SUM_ATOL:
        raise ValueError(
            f"{name}: {what} must lie in [0, 1]; got range [{p.min():.6g}, {p.max():.6g}]"
        )
    dev = np.abs(p.sum(axis=-1) - 1.0)
    worst = float(dev.max())
    if worst > ROW_SUM_ATOL:
        raise ValueError(
            f"{name}: rows of {what} must sum to 1 (atol {ROW_SUM_ATOL:g}); "
            f"worst deviation {worst:.6g}"
        )


def as_probs(probs: ArrayLike, name: str) -> np.ndarray:
    """Validate and convert class probabilities of shape ``[N, C]``."""
    p = as_float_array(probs, name, "probs")
    if p.ndim != 2:
        raise ValueError(f"{name}: probs must have shape [N, C], got {tuple(p.shape)}")
    check_simplex(p, name)
    return p


def as_sample_probs(probs: ArrayLike, name: str) -> np.ndarray:
    """Validate and convert predictive samples of shape ``[S, N, C]``."""
    p = as_float_array(probs, name, "probs")
    if p.ndim != 3:
        raise ValueError(f"{name}: probs must have shape [S, N, C], got {tuple(p.shape)}")
    check_simplex(p, name)
    return p


def as_labels(labels: ArrayLike, n: int, n_classes: int, name: str) -> np.ndarray:
    """Validate integer class labels of shape ``[N]`` with values in ``[0, n_classes)``."""
    y = _to_numpy(labels, name, "labels")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name}: labels must have an integer dtype, got {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must have shape [N], got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{name}: got {n} rows of probs but {y.shape[0]} labels")
    if y.size == 0:
        raise ValueError(f"{name}: labels is empty")
    y = y.astype(np.int64, copy=False)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {n_classes}); got range [{y.min()}, {y.max()}]"
        )
    return y


def as_probs_and_labels(
    probs: ArrayLike, labels: ArrayLike, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ``([N, C] probs, [N] labels)`` pair."""
    p = as_probs(probs, name)
    y = as_labels(labels, p.shape[0], p.shape[1], name)
    return p, y


def as_scores(scores: ArrayLike, name: str, what: str) -> np.ndarray:
    """Validate a non-empty, finite 1-D score vector."""
    s = as_float_array(scores, name, what)
    if s.ndim != 1:
        raise ValueError(f"{name}: {what} must have shape [N], got {tuple(s.shape)}")
    return s


def check_n_bins(n_bins: int, name: str) -> None:
    """Require a positive integer number of bins."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"{name}: n_bins must be a positive integer, got {n_bins!r}")
