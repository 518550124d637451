"""Evaluate one fitted method: in distribution, along the rotation shift, and on OOD sets.

- **In distribution** (test split): accuracy, NLL, Brier, ECE, MCE and adaptive ECE (15 bins),
  plus the reliability-diagram sums (per equal-width bin: count, summed confidence, summed
  correctness; every entry finite, empty bins are zeros).
- **Rotation shift** (image data only): the test images rotated by every angle of
  :func:`datasets.rotation_angles`; accuracy, NLL, Brier and ECE per angle.
- **OOD**: the test split is in distribution, each OOD set out; scores follow the metrics'
  convention *larger = more in-distribution*: ``max_prob`` (max predicted probability),
  ``entropy`` (negative predictive entropy) and, for Bayesian methods, ``mutual_info``
  (negative mutual information from ``mi_samples`` predictive samples); AUROC, AUPR-in,
  AUPR-out and FPR@95%TPR for each.

Any invalid probability (NaN, Inf, rows off the simplex) raises :class:`StudyRunError` naming the
method, seed and step; nothing is silently reported as NaN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from datasets import rotate
from evaluation import metrics as M
from evaluation.study.errors import StudyRunError
from evaluation.study.methods import FittedMethod

__all__ = [
    "IN_DISTRIBUTION_METRICS",
    "OOD_METRICS",
    "OOD_SCORES",
    "SHIFT_METRICS",
    "MethodEvaluation",
    "evaluate_method",
]

PREDICT_CHUNK = 2048

IN_DISTRIBUTION_METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "accuracy": M.accuracy,
    "nll": M.nll,
    "brier": M.brier_score,
    "ece": M.ece,
    "mce": M.mce,
    "adaptive_ece": M.adaptive_ece,
}
SHIFT_METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "accuracy": M.accuracy,
    "nll": M.nll,
    "brier": M.brier_score,
    "ece": M.ece,
}
OOD_SCORES: tuple[str, ...] = ("max_prob", "entropy", "mutual_info")
OOD_METRICS: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr95")


@dataclass
class MethodEvaluation:
    """The numbers of one method on one seed, and the raw OOD scores for the figures.

    Attributes:
        in_distribution: ``{metric: value}``.
        reliability: ``{"bin_edges", "counts", "confidence_sum", "correct_sum"}`` lists.
        shift: ``{metric: [value per angle]}`` (empty without rotation).
        ood: ``{ood_set: {score: {metric: value}}}``.
        predict_seconds: Wall time of the test-set prediction.
        scores: ``{"test" | ood_set: {score: array}}`` (kept in memory, not in results.json).
    """

    in_distribution: dict[str, float]
    reliability: dict[str, list[float]]
    shift: dict[str, list[float]]
    ood: dict[str, dict[str, dict[str, float]]]
    predict_seconds: float
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, object]:
        """Everything except the raw scores."""
        out = asdict(self)
        del out["scores"]
        return out


@contextmanager
def _step(method: str, seed: int, step: str) -> Iterator[None]:
    """Re-raise metric errors (NaN probabilities, ...) with the method, seed and step."""
    try:
        yield
    except ValueError as err:
        raise StudyRunError(f"method {method!r}, seed {seed}, {step}: {err}") from err


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int = 0) -> Tensor:
    return torch.cat([fn(xb).detach() for xb in torch.split(x, PREDICT_CHUNK)], dim=dim)


def _reliability(probs: Tensor, labels: Tensor) -> dict[str, list[float]]:
    curve = M.reliability_curve(probs, labels)
    counts = curve.counts.astype(np.float64)
    conf = np.where(curve.nonempty, curve.confidence, 0.0) * counts
    acc = np.where(curve.nonempty, curve.accuracy, 0.0) * counts
    return {
        "bin_edges": curve.bin_edges.tolist(),
        "counts": counts.tolist(),
        "confidence_sum": conf.tolist(),
        "correct_sum": acc.tolist(),
    }


def _scores(probs: Tensor, samples: Tensor | None) -> dict[str, np.ndarray]:
    out = {
        "max_prob": M.max_probability(probs),
        "entropy": -M.predictive_entropy(probs),
    }
    if samples is not None:
        out["mutual_info"] = -M.mutual_information(samples)
    return out


def evaluate_method(
    fitted: FittedMethod,
    seed: int,
    test: tuple[Tensor, Tensor],
    ood: dict[str, Tensor],
    angles: tuple[int, ...],
    image_shape: tuple[int, int, int] | None,
    mi_samples: int,
) -> MethodEvaluation:
    """All numbers of ``fitted`` on one seed's data.

    Args:
        fitted: The fitted method.
        seed: The seed (for messages and the predictive samples' generator).
        test: Test inputs and labels.
        ood: OOD inputs by name.
        angles: Rotation angles in degrees; empty skips the shift.
        image_shape: ``(C, H, W)`` for flat image inputs (``rotate`` needs it).
        mi_samples: Predictive samples per input for mutual information.
    """
    name = fitted.name
    x, y = test
    start = time.perf_counter()
    probs = _chunked(fitted.predict, x)
    predict_seconds = time.perf_counter() - start
    with _step(name, seed, "in-distribution metrics"):
        ind = {k: fn(probs, y) for k, fn in IN_DISTRIBUTION_METRICS.items()}
        reliability = _reliability(probs, y)

    shift: dict[str, list[float]] = {k: [] for k in SHIFT_METRICS} if angles else {}
    for angle in angles:
        xr = rotate(x, float(angle), image_shape=image_shape)
        pr = _chunked(fitted.predict, xr)
        with _step(name, seed, f"rotation shift at {angle}°"):
            for k, fn in SHIFT_METRICS.items():
                shift[k].append(fn(pr, y))

    def samples(inputs: Tensor) -> Tensor | None:
        if fitted.samples is None:
            return None
        fn = fitted.samples
        return _chunked(lambda xb: fn(xb, mi_samples, seed), inputs, dim=1)

    with _step(name, seed, "OOD scores of the test split"):
        scores = {"test": _scores(probs, samples(x))}
    ood_numbers: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, x_out in ood.items():
        p_out = _chunked(fitted.predict, x_out)
        with _step(name, seed, f"OOD set {set_name!r}"):
            s_out = _scores(p_out, samples(x_out))
            scores[set_name] = s_out
            ood_numbers[set_name] = {
                score: asdict(M.ood_metrics(scores["test"][score], s_out[score])) for score in s_out
            }
    return MethodEvaluation(ind, reliability, shift, ood_numbers, predict_seconds, scores)
