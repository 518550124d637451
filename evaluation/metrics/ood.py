"""Out-of-distribution (OOD) detection metrics and per-sample scoring functions.

Score convention: the detection metrics take one score per sample for the in-distribution set
(``scores_in``) and the OOD set (``scores_out``) where **larger scores mean "more
in-distribution"** (e.g. :func:`max_probability`, :func:`max_logit`). Uncertainty scores such as
:func:`predictive_entropy`, :func:`mutual_information` or :func:`energy` are larger for OOD
inputs, so pass their negation (``-predictive_entropy(p)``, ``-energy(logits)``).

Probability scores take ``[N, C]`` probabilities (or ``[S, N, C]`` samples); logit scores
(:func:`energy`, :func:`max_logit`) take ``[N, C]`` logits, which are unconstrained but must be
finite.

Positive class: AUROC, AUPR-in and FPR@95%TPR treat the **in-distribution** samples as positives
(TPR = fraction of in-distribution samples accepted, FPR = fraction of OOD samples accepted at a
threshold ``score >= t``). AUPR-out treats the OOD samples as positives and ranks by the negated
score.

All metrics are implemented in NumPy and return Python floats; inputs may be torch tensors or
NumPy arrays. Invalid input (empty, non-1-D, NaN/Inf) raises :class:`ValueError` naming the
metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evaluation.metrics._validation import (
    ArrayLike,
    as_float_array,
    as_sample_probs,
    as_scores,
    check_simplex,
)

# --------------------------------------------------------------------------------------------
# Detection metrics
# --------------------------------------------------------------------------------------------


def _in_out(
    scores_in: ArrayLike, scores_out: ArrayLike, name: str
) -> tuple[np.ndarray, np.ndarray]:
    return (
        as_scores(scores_in, name, "scores_in"),
        as_scores(scores_out, name, "scores_out"),
    )


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order; tied values get the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    group_id = np.cumsum(new_group) - 1
    starts = np.r_[
        np.flatnonzero(new_group), x.size
    ]  # group g spans sorted [starts[g], starts[g+1])
    mean_rank = 0.5 * (starts[:-1] + 1 + starts[1:])
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group_id]
    return ranks


def _threshold_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts at every distinct threshold ``t`` (predict positive iff s >= t).

    Thresholds are the distinct score values in decreasing order, as in
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` (without its extra ``+inf``).
    """
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    last_of_group = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1]
    tps = np.cumsum(y[order])[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps, fps


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    tps, fps = _threshold_counts(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""Area under the ROC curve with in-distribution as the positive class.

    Computed from ranks (Mann-Whitney U statistic), counting ties between an in-distribution and
    an OOD score as one half:

    .. math::
        \mathrm{AUROC} = \frac{1}{n_\mathrm{in} n_\mathrm{out}} \sum_{i, j}
        \Bigl(\mathbb{1}[s^\mathrm{in}_i > s^\mathrm{out}_j]
        + \tfrac12 \mathbb{1}[s^\mathrm{in}_i = s^\mathrm{out}_j]\Bigr)
        = \frac{R_\mathrm{in} - n_\mathrm{in}(n_\mathrm{in}+1)/2}{n_\mathrm{in} n_\mathrm{out}},

    where :math:`R_\mathrm{in}` is the sum of the mid-ranks of the in-distribution scores in the
    pooled sample. Equals ``sklearn.metrics.roc_auc_score`` with labels 1 for in-distribution.

    Args:
        scores_in: In-distribution scores, shape ``[N_in]`` (larger = more in-distribution).
        scores_out: OOD scores, shape ``[N_out]``.

    Returns:
        AUROC in ``[0, 1]``; 0.5 for indistinguishable scores.

    Raises:
        ValueError: If either input is empty, not 1-D, or contains NaN/Inf.
    """
    s_in, s_out = _in_out(scores_in, scores_out, "auroc")
    ranks = _average_ranks(np.concatenate([s_in, s_out]))
    n_in, n_out = s_in.size, s_out.size
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def aupr_in(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""Area under the precision-recall curve with in-distribution as positive (AUPR-in).

    Step-wise average precision over the distinct thresholds :math:`t_1 > t_2 > \dots`
    (predict "in" iff :math:`s \ge t_k`), with :math:`R_0 = 0`:

    .. math::
        \mathrm{AP} = \sum_k (R_k - R_{k-1})\, P_k

    No interpolation; identical to ``sklearn.metrics.average_precision_score``.

    Args:
        scores_in: In-distribution scores, shape ``[N_in]`` (larger = more in-distribution).
        scores_out: OOD scores, shape ``[N_out]``.

    Returns:
        Average precision in ``[0, 1]``.

    Raises:
        ValueError: If either input is empty, not 1-D, or contains NaN/Inf.
    """
    s_in, s_out = _in_out(scores_in, scores_out, "aupr_in")
    return _average_precision(s_in, s_out)


def aupr_out(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""Area under the precision-recall curve with OOD as positive (AUPR-out).

    The average precision of :func:`aupr_in` with the roles swapped: OOD samples are the
    positives and are ranked by the negated score :math:`-s`.

    Args:
        scores_in: In-distribution scores, shape ``[N_in]`` (larger = more in-distribution).
        scores_out: OOD scores, shape ``[N_out]``.

    Returns:
        Average precision in ``[0, 1]``.

    Raises:
        ValueError: If either input is empty, not 1-D, or contains NaN/Inf.
    """
    s_in, s_out = _in_out(scores_in, scores_out, "aupr_out")
    return _average_precision(-s_out, -s_in)


def fpr_at_tpr(scores_in: ArrayLike, scores_out: ArrayLike, tpr: float = 0.95) -> float:
    r"""False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    In-distribution is positive. Sweeping the distinct score values :math:`t` from high to low,
    with :math:`\mathrm{TPR}(t) = \#\{s^\mathrm{in} \ge t\} / n_\mathrm{in}` (a float division)
    and :math:`\mathrm{FPR}(t) = \#\{s^\mathrm{out} \ge t\} / n_\mathrm{out}`, return
    :math:`\mathrm{FPR}(t^*)` for the largest :math:`t^*` with :math:`\mathrm{TPR}(t^*) \ge`
    ``tpr``. No interpolation between ROC points. This equals
    ``fpr[np.searchsorted(tpr_, tpr)]`` on ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``; with sklearn's default ``drop_intermediate=True`` collinear ROC
    points can be removed and the result may differ.

    Args:
        scores_in: In-distribution scores, shape ``[N_in]`` (larger = more in-distribution).
        scores_out: OOD scores, shape ``[N_out]``.
        tpr: Target true-positive rate in ``(0, 1]``.

    Returns:
        The FPR in ``[0, 1]`` (lower is better).

    Raises:
        ValueError: On invalid scores or ``tpr`` outside ``(0, 1]``.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"fpr_at_tpr: tpr must lie in (0, 1], got {tpr!r}")
    s_in, s_out = _in_out(scores_in, scores_out, "fpr_at_tpr")
    tps, fps = _threshold_counts(s_in, s_out)
    k = int(np.argmax(tps / s_in.size >= tpr))  # reached at the last threshold at the latest
    return float(fps[k] / s_out.size)


def fpr_at_95_tpr(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """FPR at 95% TPR, in-distribution positive; see :func:`fpr_at_tpr`.

    Args:
        scores_in: In-distribution scores, shape ``[N_in]`` (larger = more in-distribution).
        scores_out: OOD scores, shape ``[N_out]``.

    Returns:
        The FPR in ``[0, 1]`` (lower is better).

    Raises:
        ValueError: If either input is empty, not 1-D, or contains NaN/Inf.
    """
    return fpr_at_tpr(scores_in, scores_out, 0.95)


@dataclass(frozen=True)
class OODMetrics:
    """All OOD detection metrics for one (in-distribution, OOD) pair of score vectors.

    Attributes:
        auroc: See :func:`auroc`.
        aupr_in: See :func:`aupr_in`.
        aupr_out: See :func:`aupr_out`.
        fpr95: See :func:`fpr_at_95_tpr`.
    """

    auroc: float
    aupr_in: float
    aupr_out: float
    fpr95: float


def ood_metrics(scores_in: ArrayLike, scores_out: ArrayLike) -> OODMetrics:
    """Compute AUROC, AUPR-in, AUPR-out and FPR@95%TPR at once.

    Args:
        scores_in: In-distribution scores, shape ``[N_in]`` (larger = more in-distribution).
        scores_out: OOD scores, shape ``[N_out]``.

    Returns:
        An :class:`OODMetrics`.

    Raises:
        ValueError: If either input is empty, not 1-D, or contains NaN/Inf.
    """
    s_in, s_out = _in_out(scores_in, scores_out, "ood_metrics")
    return OODMetrics(
        auroc=auroc(s_in, s_out),
        aupr_in=aupr_in(s_in, s_out),
        aupr_out=aupr_out(s_in, s_out),
        fpr95=fpr_at_95_tpr(s_in, s_out),
    )


# --------------------------------------------------------------------------------------------
# Scoring functions
# --------------------------------------------------------------------------------------------


def _mean_probs(probs: ArrayLike, name: str) -> np.ndarray:
    """Accept ``[N, C]`` probabilities or ``[S, N, C]`` samples (averaged over ``S``)."""
    p = as_float_array(probs, name, "probs")
    if p.ndim not in (2, 3):
        raise ValueError(f"{name}: probs must have shape [N, C] or [S, N, C], got {p.shape}")
    check_simplex(p, name)
    return p if p.ndim == 2 else p.mean(axis=0)


def _entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) over the last axis with ``0 log 0 = 0``."""
    safe = np.where(p > 0.0, p, 1.0)
    return -np.sum(np.where(p > 0.0, p * np.log(safe), 0.0), axis=-1)


def max_probability(probs: ArrayLike) -> np.ndarray:
    r"""Maximum predicted probability :math:`\max_c \bar p_{ic}` (larger = more in-distribution).

    Args:
        probs: Probabilities ``[N, C]``, or predictive samples ``[S, N, C]`` which are first
            averaged over ``S`` (:math:`\bar p = \frac1S \sum_s p^{(s)}`).

    Returns:
        Scores, shape ``[N]``, ``float64``. Use directly as ``scores_in``/``scores_out``.

    Raises:
        ValueError: On invalid probabilities.
    """
    return _mean_probs(probs, "max_probability").max(axis=-1)


def predictive_entropy(probs: ArrayLike) -> np.ndarray:
    r"""Entropy of the (mean) predictive distribution, in nats (larger = more uncertain).

    .. math::
        H[\bar p_i] = -\sum_c \bar p_{ic} \log \bar p_{ic}, \qquad 0 \log 0 = 0

    Args:
        probs: Probabilities ``[N, C]``, or predictive samples ``[S, N, C]`` which are first
            averaged over ``S``.

    Returns:
        Entropies, shape ``[N]``, ``float64``, in ``[0, log C]``. Negate before passing to the
        detection metrics.

    Raises:
        ValueError: On invalid probabilities.
    """
    return _entropy(_mean_probs(probs, "predictive_entropy"))


def mutual_information(sample_probs: ArrayLike) -> np.ndarray:
    r"""Mutual information between prediction and parameters (BALD), in nats.

    .. math::
        I_i = H\Bigl[\frac1S \sum_s p^{(s)}_i\Bigr] - \frac1S \sum_s H\bigl[p^{(s)}_i\bigr]

    Non-negative by Jensen's inequality; round-off below zero is clamped to ``0``.

    Args:
        sample_probs: Predictive samples, shape ``[S, N, C]``.

    Returns:
        Mutual information, shape ``[N]``, ``float64`` (larger = more epistemic uncertainty).
        Negate before passing to the detection metrics.

    Raises:
        ValueError: On invalid probabilities or a shape other than ``[S, N, C]``.
    """
    p = as_sample_probs(sample_probs, "mutual_information")
    mi = _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)
    return np.maximum(mi, 0.0)


def _logits(logits: ArrayLike, name: str) -> np.ndarray:
    f = as_float_array(logits, name, "logits")
    if f.ndim != 2 or f.shape[1] < 1:
        raise ValueError(f"{name}: logits must have shape [N, C] with C >= 1, got {f.shape}")
    return f


def energy(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    r"""Free energy of the logits (Liu et al., 2020), larger = more OOD.

    .. math::
        E_i = -T \log \sum_c \exp(f_{ic} / T)

    computed stably (``logsumexp`` with the row maximum taken out). :math:`-E` is a smooth
    version of :func:`max_logit`: :math:`\max_c f_{ic} \le -E_i \le \max_c f_{ic} + T \log C`.

    Args:
        logits: Logits ``[N, C]`` (finite).
        temperature: :math:`T > 0` of the energy (the study uses ``1``; a predictive's own
            temperature belongs in the logits passed here, e.g. ``f / T_pred``).

    Returns:
        Energies, shape ``[N]``, ``float64``. Negate before passing to the detection metrics.

    Raises:
        ValueError: On non-finite or non-``[N, C]`` logits, or ``temperature <= 0``.
    """
    t = temperature
    if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"energy: temperature must be a finite number > 0, got {temperature!r}")
    z = _logits(logits, "energy") / temperature
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return -temperature * lse


def max_logit(logits: ArrayLike) -> np.ndarray:
    r"""Maximum logit :math:`\max_c f_{ic}` (Hendrycks et al., 2022), larger = more in-distribution.

    Args:
        logits: Logits ``[N, C]`` (finite).

    Returns:
        Scores, shape ``[N]``, ``float64``. Use directly as ``scores_in``/``scores_out``.

    Raises:
        ValueError: On non-finite or non-``[N, C]`` logits.
    """
    return _logits(logits, "max_logit").max(axis=1)
