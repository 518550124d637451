r"""Binned calibration metrics on the top-label (max-probability) confidence.

For each sample ``i`` the *confidence* is :math:`\hat p_i = \max_c p_{ic}` and the
*correctness* is :math:`a_i = \mathbb{1}[\arg\max_c p_{ic} = y_i]` (arg-max ties resolve to the
lowest class index). Samples are grouped into bins :math:`B_1, \dots, B_M`; per bin,
:math:`\mathrm{conf}(B_m)` and :math:`\mathrm{acc}(B_m)` are the mean confidence and mean
correctness of its samples.

Equal-width binning convention: edges ``np.linspace(0, 1, n_bins + 1)``; bin ``m`` is the
half-open interval ``[e_m, e_{m+1})`` except the last, which is closed ``[e_{M-1}, 1]`` (the
``numpy.histogram`` convention, also used by netcal). A confidence lying exactly on an inner edge
goes to the bin on its right.

All functions accept torch tensors or NumPy arrays: ``probs`` of shape ``[N, C]`` with rows summing
to one, integer ``labels`` of shape ``[N]`` in ``[0, C)``. Invalid input raises
:class:`ValueError` naming the metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.metrics._validation import ArrayLike, as_probs_and_labels, check_n_bins

DEFAULT_N_BINS: int = 15
"""Default number of bins (Guo et al., 2017)."""


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin statistics for a reliability diagram (equal-width bins).

    Attributes:
        bin_edges: Bin edges, shape ``[n_bins + 1]``, from 0 to 1.
        confidence: Mean confidence per bin, shape ``[n_bins]``; ``NaN`` for empty bins.
        accuracy: Mean correctness per bin, shape ``[n_bins]``; ``NaN`` for empty bins.
        counts: Number of samples per bin, shape ``[n_bins]``, integer.

    Empty bins are ``NaN`` (so matplotlib skips them); select with :attr:`nonempty` before doing
    arithmetic on ``confidence``/``accuracy``.
    """

    bin_edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def nonempty(self) -> np.ndarray:
        """Boolean mask of bins holding at least one sample, shape ``[n_bins]``."""
        return self.counts > 0

    @property
    def bin_centers(self) -> np.ndarray:
        """Midpoints of the bins, shape ``[n_bins]``."""
        return 0.5 * (self.bin_edges[:-1] + self.bin_edges[1:])


def _confidence_and_correct(
    probs: ArrayLike, labels: ArrayLike, name: str
) -> tuple[np.ndarray, np.ndarray]:
    p, y = as_probs_and_labels(probs, labels, name)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return conf, correct


def _equal_width_bins(
    conf: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(edges, conf_sum, acc_sum, counts)`` per equal-width bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return edges, conf_sum, acc_sum, counts


def reliability_curve(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS
) -> ReliabilityCurve:
    """Per-bin mean confidence, accuracy and counts on equal-width confidence bins.

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.
        n_bins: Number of equal-width bins on ``[0, 1]``.

    Returns:
        A :class:`ReliabilityCurve`; empty bins have ``NaN`` confidence and accuracy.

    Raises:
        ValueError: On invalid input or ``n_bins < 1``.
    """
    check_n_bins(n_bins, "reliability_curve")
    conf, correct = _confidence_and_correct(probs, labels, "reliability_curve")
    edges, conf_sum, acc_sum, counts = _equal_width_bins(conf, correct, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / counts, np.nan)
        mean_acc = np.where(counts > 0, acc_sum / counts, np.nan)
    return ReliabilityCurve(
        bin_edges=edges, confidence=mean_conf, accuracy=mean_acc, counts=counts.astype(np.int64)
    )


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    r"""Expected calibration error with equal-width bins (Naeini et al., 2015; Guo et al., 2017).

    .. math::
        \mathrm{ECE} = \sum_{m=1}^M \frac{|B_m|}{N}\,
        \bigl|\mathrm{acc}(B_m) - \mathrm{conf}(B_m)\bigr|

    Empty bins contribute zero. Matches ``netcal.metrics.ECE(n_bins).measure`` for multi-class
    input (netcal clips confidences to ``[eps, 1 - eps]``, a difference of ~1e-16).

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.
        n_bins: Number of equal-width bins on ``[0, 1]`` (default 15).

    Returns:
        The ECE, in ``[0, 1]``.

    Raises:
        ValueError: On invalid input or ``n_bins < 1``.
    """
    check_n_bins(n_bins, "ece")
    conf, correct = _confidence_and_correct(probs, labels, "ece")
    _, conf_sum, acc_sum, _ = _equal_width_bins(conf, correct, n_bins)
    # |B_m|/N * |acc_m - conf_m| = |acc_sum_m - conf_sum_m| / N; empty bins give 0.
    return float(np.sum(np.abs(acc_sum - conf_sum)) / conf.shape[0])


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    r"""Maximum calibration error with equal-width bins (Naeini et al., 2015).

    .. math::
        \mathrm{MCE} = \max_{m:\,|B_m| > 0} \bigl|\mathrm{acc}(B_m) - \mathrm{conf}(B_m)\bigr|

    Only non-empty bins are considered. Matches ``netcal.metrics.MCE(n_bins).measure``.

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.
        n_bins: Number of equal-width bins on ``[0, 1]`` (default 15).

    Returns:
        The MCE, in ``[0, 1]``.

    Raises:
        ValueError: On invalid input or ``n_bins < 1``.
    """
    check_n_bins(n_bins, "mce")
    conf, correct = _confidence_and_correct(probs, labels, "mce")
    _, conf_sum, acc_sum, counts = _equal_width_bins(conf, correct, n_bins)
    nz = counts > 0
    return float(np.max(np.abs(acc_sum[nz] - conf_sum[nz]) / counts[nz]))


def adaptive_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    r"""Adaptive ECE: the ECE formula on equal-mass bins (Nixon et al., 2019).

    Samples are sorted by confidence (stable sort, so ties keep input order) and split into
    ``n_bins`` contiguous groups whose sizes differ by at most one (``numpy.array_split``); tied
    confidences may therefore straddle two bins. With ``N < n_bins`` only ``N`` singleton bins
    are non-empty. Then

    .. math::
        \mathrm{AdaECE} = \sum_{m=1}^M \frac{|B_m|}{N}\,
        \bigl|\mathrm{acc}(B_m) - \mathrm{conf}(B_m)\bigr| .

    This is the top-label variant on max-probability confidence. It is *not*
    ``netcal.metrics.ACE``: netcal's "Average Calibration Error" is the *unweighted* mean of
    ``|acc - conf|`` over non-empty bins, with equal-width bins by default; with
    ``equal_intervals=False`` it uses interpolated quantile edges. Both coincide with this
    function only when every equal-mass bin has the same size and quantile edges separate the
    same groups (distinct confidences, ``N`` divisible by ``n_bins``).

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.
        n_bins: Number of equal-mass bins (default 15).

    Returns:
        The adaptive ECE, in ``[0, 1]``.

    Raises:
        ValueError: On invalid input or ``n_bins < 1``.
    """
    check_n_bins(n_bins, "adaptive_ece")
    conf, correct = _confidence_and_correct(probs, labels, "adaptive_ece")
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for group in np.array_split(order, n_bins):
        if group.size:
            total += abs(float(np.sum(correct[group]) - np.sum(conf[group])))
    return total / conf.shape[0]
