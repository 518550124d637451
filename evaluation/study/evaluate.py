"""Evaluate one fitted method: in distribution, along the rotation shift, and on OOD sets.

- **In distribution** (test split): accuracy, NLL, Brier, ECE, MCE and adaptive ECE (15 bins),
  plus the reliability-diagram sums (per equal-width bin: count, summed confidence, summed
  correctness; every entry finite, empty bins are zeros).
- **Rotation shift** (image data only): the test images rotated by every angle of
  :func:`datasets.rotation_angles`; accuracy, NLL, Brier and ECE per angle.
- **OOD**: the test split is in distribution, each OOD set out; scores follow the metrics'
  convention *larger = more in-distribution*: ``max_prob`` (max predicted probability),
  ``entropy`` (negative predictive entropy), for Bayesian methods ``mutual_info`` (negative
  mutual information from ``mi_samples`` predictive samples), and from the method's logits
  ``energy`` (negative free energy, ``logsumexp f``, i.e. energy temperature 1) and
  ``max_logit`` (``max_c f_c``); AUROC, AUPR-in, AUPR-out and FPR@95%TPR for each.

  Logits of the logit scores: the network's for ``map``, divided by the fitted ``T`` for
  ``temp``, and for a GLM Laplace method the *mean* of its tempered linearised logits
  (``glm_distribution(x)[0]``), which is the MAP's logits divided by the method's temperature:
  these two scores therefore do not see the posterior's variance (max-logit ranks the inputs
  exactly as the MAP's max-logit does), only its temperature.

Work shared rather than repeated: the rotated test images are made once per seed
(:func:`rotated_inputs`) for every method; for a GLM-probit Laplace method the linearised
logits' mean and covariance (the Jacobian pass and the per-block quadratic forms, independent of
the predictive that follows) are computed once per input chunk and give both the probit
probabilities and the mutual information's samples, which are otherwise two passes
(``predict`` and ``predictive_samples``) over the test split and every OOD set.

Any invalid probability (NaN, Inf, rows off the simplex) raises :class:`StudyRunError` naming the
method, seed and step; nothing is silently reported as NaN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from bayes_kfoc.laplace.predictive import probit, sample_logits
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
    "ood_scores",
    "predictive",
    "rotated_inputs",
    "seeded_subset",
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
OOD_SCORES: tuple[str, ...] = ("max_prob", "entropy", "mutual_info", "energy", "max_logit")
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


def _probit(mean: Tensor, cov: Tensor) -> Tensor:
    """:meth:`bayes_kfoc.Laplace.predict`'s default, from the GLM's mean and covariance."""
    return probit(mean, torch.diagonal(cov, dim1=-2, dim2=-1))


def _gaussian_samples(mean: Tensor, cov: Tensor, n: int, seed: int, chunk: int) -> Tensor:
    """``[n, B, C]`` softmax of ``f ~ N(mean, cov)``, drawn as
    :meth:`bayes_kfoc.Laplace.predictive_samples` does (the library's ``sample_logits``, one
    generator seeded with ``seed``, the draws of every ``chunk`` points in turn: the Laplace's
    ``chunk_size``), so the numbers equal that call's."""
    gen = torch.Generator(mean.device).manual_seed(seed)
    parts = zip(torch.split(mean, chunk), torch.split(cov, chunk), strict=True)
    draws = [sample_logits(m, c, n, gen) for m, c in parts]
    return torch.softmax(torch.cat(draws, dim=1), dim=-1)


def predictive(
    fitted: FittedMethod, x: Tensor, n_samples: int, seed: int, *, logits: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Probabilities ``[N, C]``, for Bayesian methods with ``n_samples > 0`` probability samples
    ``[n, N, C]``, and with ``logits`` the logits ``[N, C]`` of the logit scores (``None`` where
    the method has none) of ``fitted`` at ``x``, in chunks of :data:`PREDICT_CHUNK` (each chunk's
    samples from a generator seeded with ``seed``).

    For a method with ``glm`` all three come from one GLM pass per chunk (the logits are its
    mean).
    """
    probs: list[Tensor] = []
    draws: list[Tensor] = []
    means: list[Tensor] = []
    want = n_samples > 0 and fitted.samples is not None
    want_logits = logits and (fitted.glm is not None or fitted.logits is not None)
    for xb in torch.split(x, PREDICT_CHUNK):
        if fitted.glm is not None:
            with torch.no_grad():
                mean, cov = fitted.glm(xb)
            probs.append(_probit(mean, cov).detach())
            if want:
                la = fitted.posterior
                chunk = la.chunk_size if la is not None else len(xb)
                draws.append(_gaussian_samples(mean, cov, n_samples, seed, chunk).detach())
            if want_logits:
                means.append(mean.detach())
            continue
        probs.append(fitted.predict(xb).detach())
        if want:
            assert fitted.samples is not None
            draws.append(fitted.samples(xb, n_samples, seed).detach())
        if want_logits:
            assert fitted.logits is not None
            means.append(fitted.logits(xb).detach())
    return (
        torch.cat(probs),
        torch.cat(draws, dim=1) if want else None,
        torch.cat(means) if want_logits else None,
    )


def seeded_subset(n: int, size: int | None, seed: int) -> Tensor | None:
    """Sorted indices of a seeded random subset of ``size`` out of ``n`` (``None``: all)."""
    if size is None or size >= n:
        return None
    gen = torch.Generator().manual_seed(10_007 + seed)
    return torch.randperm(n, generator=gen)[:size].sort().values


def rotated_inputs(
    x: Tensor, angles: Sequence[int], image_shape: tuple[int, int, int] | None
) -> dict[int, Tensor]:
    """The inputs rotated by each angle (made once per seed, shared by every method)."""
    return {a: rotate(x, float(a), image_shape=image_shape) for a in angles}


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


def ood_scores(
    probs: Tensor, samples: Tensor | None, logits: Tensor | None
) -> dict[str, np.ndarray]:
    """Every OOD score (larger = more in-distribution) the inputs allow, in
    :data:`OOD_SCORES` order: ``mutual_info`` needs ``samples``, ``energy`` and ``max_logit``
    need ``logits``."""
    out = {
        "max_prob": M.max_probability(probs),
        "entropy": -M.predictive_entropy(probs),
    }
    if samples is not None:
        out["mutual_info"] = -M.mutual_information(samples)
    if logits is not None:
        out["energy"] = -M.energy(logits)
        out["max_logit"] = M.max_logit(logits)
    return out


def evaluate_method(
    fitted: FittedMethod,
    seed: int,
    test: tuple[Tensor, Tensor],
    ood: dict[str, Tensor],
    angles: tuple[int, ...],
    image_shape: tuple[int, int, int] | None,
    mi_samples: int,
    *,
    shift: tuple[dict[int, Tensor], Tensor] | None = None,
    step: Callable[[str], None] | None = None,
) -> MethodEvaluation:
    """All numbers of ``fitted`` on one seed's data.

    Args:
        fitted: The fitted method.
        seed: The seed (for messages and the predictive samples' generator).
        test: Test inputs and labels.
        ood: OOD inputs by name (empty: no OOD part).
        angles: Rotation angles in degrees; empty skips the shift.
        image_shape: ``(C, H, W)`` for flat image inputs (``rotate`` needs it).
        mi_samples: Predictive samples per input for mutual information.
        shift: Precomputed ``({angle: rotated inputs}, labels)`` (from :func:`rotated_inputs`,
            possibly of a subset of the test split); by default the whole test split is rotated
            here.
        step: Called with the name of each step before it runs (progress display).
    """
    name = fitted.name
    note = step or (lambda _: None)
    x, y = test
    note("test split")
    start = time.perf_counter()
    probs, test_samples, test_logits = predictive(
        fitted, x, mi_samples if ood else 0, seed, logits=bool(ood)
    )
    predict_seconds = time.perf_counter() - start
    with _step(name, seed, "in-distribution metrics"):
        ind = {k: fn(probs, y) for k, fn in IN_DISTRIBUTION_METRICS.items()}
        reliability = _reliability(probs, y)

    if angles and shift is None:
        shift = (rotated_inputs(x, angles, image_shape), y)
    shift_numbers: dict[str, list[float]] = {k: [] for k in SHIFT_METRICS} if angles else {}
    for angle in angles:
        assert shift is not None
        note(f"rotation {angle}°")
        pr, _, _ = predictive(fitted, shift[0][angle], 0, seed)
        with _step(name, seed, f"rotation shift at {angle}°"):
            for k, fn in SHIFT_METRICS.items():
                shift_numbers[k].append(fn(pr, shift[1]))

    scores: dict[str, dict[str, np.ndarray]] = {}
    ood_numbers: dict[str, dict[str, dict[str, float]]] = {}
    if ood:
        with _step(name, seed, "OOD scores of the test split"):
            scores["test"] = ood_scores(probs, test_samples, test_logits)
    for set_name, x_out in ood.items():
        note(f"OOD {set_name}")
        p_out, samples_out, logits_out = predictive(fitted, x_out, mi_samples, seed, logits=True)
        with _step(name, seed, f"OOD set {set_name!r}"):
            s_out = ood_scores(p_out, samples_out, logits_out)
            scores[set_name] = s_out
            ood_numbers[set_name] = {
                score: asdict(M.ood_metrics(scores["test"][score], s_out[score])) for score in s_out
            }
    return MethodEvaluation(ind, reliability, shift_numbers, ood_numbers, predict_seconds, scores)
