"""Point-prediction and proper-scoring metrics: accuracy, NLL, Brier score.

All functions take class probabilities ``probs`` of shape ``[N, C]`` (rows summing to one) and
integer ``labels`` of shape ``[N]`` with values in ``[0, C)``, as torch tensors or NumPy arrays,
and return a Python ``float``. Invalid input raises :class:`ValueError` naming the metric.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics._validation import ArrayLike, as_probs_and_labels

NLL_EPS: float = 1e-12
"""Probabilities of the true label are clamped to ``[NLL_EPS, 1]`` before taking the log.

A single zero probability therefore contributes ``-log(1e-12) ≈ 27.6`` instead of ``inf``.
"""


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Top-1 accuracy.

    .. math::
        \mathrm{acc} = \frac{1}{N} \sum_{i=1}^N \mathbb{1}[\arg\max_c p_{ic} = y_i]

    Ties in the arg-max are resolved towards the lowest class index (NumPy/PyTorch convention).

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.

    Returns:
        Fraction of correctly classified samples, in ``[0, 1]``.

    Raises:
        ValueError: On invalid input (see module docstring).
    """
    p, y = as_probs_and_labels(probs, labels, "accuracy")
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Mean negative log-likelihood of the true label (natural log).

    .. math::
        \mathrm{NLL} = -\frac{1}{N} \sum_{i=1}^N \log \max(p_{i y_i}, \varepsilon),
        \qquad \varepsilon = \texttt{NLL\_EPS} = 10^{-12}

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.

    Returns:
        The mean NLL in nats, in ``[0, -log(NLL_EPS)]``.

    Raises:
        ValueError: On invalid input (see module docstring).
    """
    p, y = as_probs_and_labels(probs, labels, "nll")
    p_true = np.clip(p[np.arange(p.shape[0]), y], NLL_EPS, 1.0)
    return float(-np.mean(np.log(p_true)))


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Multi-class Brier score (Brier, 1950): squared error against the one-hot label.

    .. math::
        \mathrm{BS} = \frac{1}{N} \sum_{i=1}^N \sum_{c=1}^C (p_{ic} - \mathbb{1}[y_i = c])^2

    Convention: summed over classes and averaged over samples, so the range is ``[0, 2]`` and it
    is *not* halved for two classes. This equals scikit-learn's
    ``brier_score_loss(..., scale_by_half=False)``; for binary problems the customary
    positive-class-only Brier score (sklearn's default there) is half of this value.

    Args:
        probs: Class probabilities, shape ``[N, C]``.
        labels: True class indices, shape ``[N]``, integer dtype.

    Returns:
        The Brier score, in ``[0, 2]``.

    Raises:
        ValueError: On invalid input (see module docstring).
    """
    p, y = as_probs_and_labels(probs, labels, "brier_score")
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
