"""Tests for ``evaluation.metrics``: closed forms, netcal / scikit-learn cross-checks, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from netcal.metrics import ACE, ECE, MCE
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)

import evaluation.metrics as M

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def random_problem(
    seed: int, n: int, n_classes: int, scale: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels drawn from a *miscalibrated* model of them.

    Labels are sampled from ``softmax(logits / T_i)`` with a per-sample temperature that is < 1
    for some samples and > 1 for others, so that ``acc - conf`` changes sign across confidence
    bins. (With uniformly random labels every bin is over-confident and all binnings give the
    same ECE, which would make the cross-checks unable to tell binnings apart.)
    """
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_classes)) * scale
    probs = softmax(logits)
    temp = np.where(probs.max(axis=1) > 0.6, 0.5, 2.0)
    true_p = softmax(logits / temp[:, None])
    u = rng.random(n)
    labels = np.minimum((np.cumsum(true_p, axis=1) < u[:, None]).sum(axis=1), n_classes - 1)
    return probs, labels.astype(np.int64)


def is_py_float(x: object) -> bool:
    return type(x) is float


# --------------------------------------------------------------------------------------------
# Classification: closed forms
# --------------------------------------------------------------------------------------------


def test_perfect_confident_predictions() -> None:
    labels = np.array([0, 2, 1, 3, 2])
    probs = np.eye(4)[labels]
    assert M.accuracy(probs, labels) == 1.0
    assert M.nll(probs, labels) == 0.0
    assert M.brier_score(probs, labels) == 0.0
    assert M.ece(probs, labels) == 0.0
    assert M.mce(probs, labels) == 0.0
    assert M.adaptive_ece(probs, labels) == 0.0


def test_confidently_wrong_predictions() -> None:
    labels = np.array([0, 1, 2])
    probs = np.eye(3)[[1, 2, 0]]
    assert M.accuracy(probs, labels) == 0.0
    assert M.nll(probs, labels) == pytest.approx(-math.log(M.NLL_EPS))
    assert M.brier_score(probs, labels) == pytest.approx(2.0)
    assert M.ece(probs, labels) == pytest.approx(1.0)
    assert M.mce(probs, labels) == pytest.approx(1.0)


@pytest.mark.parametrize("n_classes", [2, 4, 10])
def test_uniform_predictions(n_classes: int) -> None:
    labels = np.array([0, 1, 1, 0, n_classes - 1, 0])
    probs = np.full((labels.size, n_classes), 1.0 / n_classes)
    acc = float(np.mean(labels == 0))  # arg-max ties resolve to class 0
    assert M.accuracy(probs, labels) == pytest.approx(acc)
    assert M.nll(probs, labels) == pytest.approx(math.log(n_classes))
    assert M.brier_score(probs, labels) == pytest.approx(1.0 - 1.0 / n_classes)
    assert M.ece(probs, labels) == pytest.approx(abs(acc - 1.0 / n_classes))
    assert M.mce(probs, labels) == pytest.approx(abs(acc - 1.0 / n_classes))


def test_nll_and_brier_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    labels = np.array([0, 2])
    assert M.nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    bs0 = 0.3**2 + 0.2**2 + 0.1**2
    bs1 = 0.1**2 + 0.6**2 + 0.7**2
    assert M.brier_score(probs, labels) == pytest.approx((bs0 + bs1) / 2)
    assert M.accuracy(probs, labels) == 0.5


def test_nll_clamps_zero_probability() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    labels = np.array([1, 0])
    expected = (-math.log(M.NLL_EPS) - math.log(0.5)) / 2
    assert M.nll(probs, labels) == pytest.approx(expected)
    assert math.isfinite(M.nll(probs, labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_classes", [2, 3, 10])
def test_classification_matches_sklearn(seed: int, n_classes: int) -> None:
    probs, labels = random_problem(seed, 500, n_classes)
    classes = list(range(n_classes))
    assert M.accuracy(probs, labels) == pytest.approx(
        accuracy_score(labels, probs.argmax(axis=1)), abs=1e-12
    )
    assert M.nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=classes), rel=1e-10)
    assert M.brier_score(probs, labels) == pytest.approx(
        brier_score_loss(labels, probs, labels=classes, scale_by_half=False), rel=1e-10
    )


# --------------------------------------------------------------------------------------------
# Calibration: closed forms
# --------------------------------------------------------------------------------------------

# Four samples, C = 4, two bins [0, 0.5) and [0.5, 1]:
#   conf 0.4 correct, conf 0.4 wrong       -> bin 0: acc 0.5, conf 0.40, gap 0.10
#   conf 0.9 correct, conf 0.8 correct     -> bin 1: acc 1.0, conf 0.85, gap 0.15
# ECE = 0.5 * 0.10 + 0.5 * 0.15 = 0.125, MCE = 0.15.
TWO_BIN_PROBS = np.array(
    [
        [0.4, 0.3, 0.2, 0.1],
        [0.4, 0.3, 0.2, 0.1],
        [0.9, 0.05, 0.03, 0.02],
        [0.05, 0.8, 0.1, 0.05],
    ]
)
TWO_BIN_LABELS = np.array([0, 1, 0, 1])


def test_two_bin_hand_computed() -> None:
    assert M.ece(TWO_BIN_PROBS, TWO_BIN_LABELS, n_bins=2) == pytest.approx(0.125)
    assert M.mce(TWO_BIN_PROBS, TWO_BIN_LABELS, n_bins=2) == pytest.approx(0.15)
    # Equal-mass bins of two samples each are the same groups here.
    assert M.adaptive_ece(TWO_BIN_PROBS, TWO_BIN_LABELS, n_bins=2) == pytest.approx(0.125)
    curve = M.reliability_curve(TWO_BIN_PROBS, TWO_BIN_LABELS, n_bins=2)
    np.testing.assert_allclose(curve.bin_edges, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(curve.confidence, [0.4, 0.85])
    np.testing.assert_allclose(curve.accuracy, [0.5, 1.0])
    np.testing.assert_array_equal(curve.counts, [2, 2])
    np.testing.assert_allclose(curve.bin_centers, [0.25, 0.75])


def test_adaptive_differs_from_equal_width_hand_computed() -> None:
    # conf 0.4 correct, 0.8 wrong, 0.9 correct; 2 bins.
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.8, 0.1, 0.05, 0.05], [0.9, 0.05, 0.03, 0.02]])
    labels = np.array([0, 1, 0])
    # Equal width: {0.4} gap 0.6 (w 1/3), {0.8, 0.9} acc 0.5 conf 0.85 gap 0.35 (w 2/3).
    assert M.ece(probs, labels, n_bins=2) == pytest.approx(0.6 / 3 + 0.35 * 2 / 3)
    # Equal mass (sizes 2, 1): {0.4, 0.8} acc 0.5 conf 0.6 gap 0.1 (w 2/3), {0.9} gap 0.1 (w 1/3).
    assert M.adaptive_ece(probs, labels, n_bins=2) == pytest.approx(0.1)


def test_adaptive_ece_ties_split_in_input_order() -> None:
    probs = np.tile([0.5, 0.2, 0.2, 0.1], (4, 1))
    labels = np.array([0, 0, 1, 1])  # correct, correct, wrong, wrong; all confidences 0.5
    assert M.ece(probs, labels, n_bins=2) == pytest.approx(0.0)
    assert M.adaptive_ece(probs, labels, n_bins=2) == pytest.approx(0.5)
    # Unequal sizes (2, 1): correct, wrong | wrong -> 2/3 * 0 + 1/3 * 0.5.
    assert M.adaptive_ece(probs[:3], np.array([0, 1, 1]), n_bins=2) == pytest.approx(1 / 6)


def test_adaptive_ece_fewer_samples_than_bins() -> None:
    probs = np.array([[0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 1])
    # Singleton bins: (|1 - 0.7| + |0 - 0.6|) / 2
    assert M.adaptive_ece(probs, labels, n_bins=15) == pytest.approx(0.45)


def test_bin_edge_convention() -> None:
    # conf exactly 0.5 goes to the right bin; conf 1.0 to the (closed) last bin.
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    labels = np.array([0, 0, 1])
    curve = M.reliability_curve(probs, labels, n_bins=2)
    np.testing.assert_array_equal(curve.counts, [0, 3])
    assert np.isnan(curve.confidence[0]) and np.isnan(curve.accuracy[0])
    np.testing.assert_array_equal(curve.nonempty, [False, True])
    curve4 = M.reliability_curve(probs, labels, n_bins=4)
    np.testing.assert_array_equal(curve4.counts, [0, 0, 1, 2])


def test_reliability_curve_consistent_with_ece_mce() -> None:
    probs, labels = random_problem(3, 400, 5)
    curve = M.reliability_curve(probs, labels)
    assert curve.counts.sum() == 400
    assert curve.counts.dtype == np.int64
    nz = curve.nonempty
    gaps = np.abs(curve.accuracy - curve.confidence)[nz]
    weights = curve.counts[nz] / 400
    assert M.ece(probs, labels) == pytest.approx(float(np.sum(weights * gaps)), rel=1e-12)
    assert M.mce(probs, labels) == pytest.approx(float(gaps.max()), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Calibration: netcal cross-checks
# --------------------------------------------------------------------------------------------
# netcal conventions (netcal 1.4): ECE/MCE use np.histogramdd on linspace(0, 1, B + 1) edges
# (same half-open convention as ours) after clipping confidences to [eps, 1 - eps]. netcal's
# ACE is the *Average* Calibration Error: the unweighted mean of |acc - conf| over non-empty
# bins, on equal-width bins by default (equal_intervals=False: interpolated quantile edges).
# It is not the count-weighted adaptive ECE. Note also that netcal switches to a binary mode
# when labels take at most two distinct values, so the cross-checks use >= 3 classes.


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_classes", [3, 10])
@pytest.mark.parametrize("n_bins", [5, 15, 20])
def test_ece_mce_match_netcal(seed: int, n_classes: int, n_bins: int) -> None:
    probs, labels = random_problem(seed, 777, n_classes)
    assert M.ece(probs, labels, n_bins) == pytest.approx(
        ECE(n_bins).measure(probs, labels), abs=1e-12
    )
    assert M.mce(probs, labels, n_bins) == pytest.approx(
        MCE(n_bins).measure(probs, labels), abs=1e-12
    )
    # The data has over- and under-confident bins, so binning matters (no global-gap shortcut).
    gap = abs(M.accuracy(probs, labels) - float(probs.max(axis=1).mean()))
    assert M.ece(probs, labels, n_bins) > gap + 1e-3


def test_ece_matches_netcal_on_bin_edges() -> None:
    rng = np.random.default_rng(7)
    n, n_classes, n_bins = 600, 4, 10
    conf = rng.choice(np.linspace(0.0, 1.0, n_bins + 1)[3:], size=n)  # ~0.3, 0.4, ..., 1.0
    probs = np.empty((n, n_classes))
    probs[:] = ((1.0 - conf) / (n_classes - 1))[:, None]
    top = rng.integers(0, n_classes, size=n)
    probs[np.arange(n), top] = conf
    labels = np.where(rng.random(n) < conf, top, (top + 1) % n_classes)
    assert len(np.unique(labels)) == n_classes
    ours = M.ece(probs, labels, n_bins)
    assert ours == pytest.approx(ECE(n_bins).measure(probs, labels), abs=1e-12)
    assert M.mce(probs, labels, n_bins) == pytest.approx(
        MCE(n_bins).measure(probs, labels), abs=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [10, 15])
def test_netcal_ace_is_unweighted_mean_over_nonempty_bins(seed: int, n_bins: int) -> None:
    probs, labels = random_problem(seed, 500, 6)
    curve = M.reliability_curve(probs, labels, n_bins)
    nz = curve.nonempty
    unweighted = float(np.mean(np.abs(curve.accuracy - curve.confidence)[nz]))
    assert unweighted == pytest.approx(ACE(n_bins).measure(probs, labels), abs=1e-12)
    # ... which is a different number from the (weighted) ECE on the same bins.
    assert abs(unweighted - M.ece(probs, labels, n_bins)) > 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "n_bins"), [(600, 15), (1000, 10), (420, 20)])
def test_adaptive_ece_matches_netcal_quantile_ace(seed: int, n: int, n_bins: int) -> None:
    # With distinct confidences and n divisible by n_bins, netcal's interpolated quantile edges
    # separate exactly our equal-mass groups, all of equal size, so unweighted == weighted.
    probs, labels = random_problem(seed, n, 5)
    assert n % n_bins == 0 and np.unique(probs.max(axis=1)).size == n
    netcal_ace = ACE(n_bins, equal_intervals=False).measure(probs, labels)
    ours = M.adaptive_ece(probs, labels, n_bins)
    assert ours == pytest.approx(netcal_ace, abs=1e-12)
    assert abs(ours - M.ece(probs, labels, n_bins)) > 1e-4  # the binning matters on this data


def test_adaptive_ece_hand_computed_unequal_bins() -> None:
    # n not divisible by n_bins: bins of sizes 4, 3, 3 (numpy.array_split), count-weighted.
    probs, labels = random_problem(11, 10, 4)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    order = np.argsort(conf)
    groups = [order[:4], order[4:7], order[7:]]
    expected = sum(len(g) / 10 * abs(correct[g].mean() - conf[g].mean()) for g in groups)
    assert M.adaptive_ece(probs, labels, n_bins=3) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# OOD detection metrics
# --------------------------------------------------------------------------------------------


def sk_reference(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def ood_cases() -> list[Any]:
    rng = np.random.default_rng(123)
    cases = [
        ("continuous", rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)),
        (
            "rounded_ties",
            np.round(rng.normal(1.0, 1.0, 250), 1),
            np.round(rng.normal(0, 1, 400), 1),
        ),
        ("heavy_ties", rng.integers(0, 4, 100).astype(float), rng.integers(0, 3, 80).astype(float)),
        ("unbalanced", rng.normal(2.0, 1.0, 20), rng.normal(0.0, 1.0, 1000)),
        ("reversed", rng.normal(-1.0, 1.0, 150), rng.normal(0.0, 1.0, 150)),
        ("probabilities", rng.beta(5, 1, 300), rng.beta(2, 2, 300)),
        ("tiny", np.array([0.3]), np.array([0.3, 0.1])),
    ]
    return [pytest.param(name, a, b, id=name) for name, a, b in cases]


@pytest.mark.parametrize(("name", "s_in", "s_out"), ood_cases())
def test_ood_metrics_match_sklearn(name: str, s_in: np.ndarray, s_out: np.ndarray) -> None:
    ref = sk_reference(s_in, s_out)
    assert M.auroc(s_in, s_out) == pytest.approx(ref["auroc"], abs=1e-12)
    assert M.aupr_in(s_in, s_out) == pytest.approx(ref["aupr_in"], abs=1e-12)
    assert M.aupr_out(s_in, s_out) == pytest.approx(ref["aupr_out"], abs=1e-12)
    assert M.fpr_at_95_tpr(s_in, s_out) == pytest.approx(ref["fpr95"], abs=1e-12)
    res = M.ood_metrics(s_in, s_out)
    assert res == M.OODMetrics(
        auroc=M.auroc(s_in, s_out),
        aupr_in=M.aupr_in(s_in, s_out),
        aupr_out=M.aupr_out(s_in, s_out),
        fpr95=M.fpr_at_95_tpr(s_in, s_out),
    )


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_fpr_at_tpr_matches_sklearn_other_targets(target: float) -> None:
    rng = np.random.default_rng(5)
    s_in = np.round(rng.normal(1.0, 1.0, 333), 1)
    s_out = np.round(rng.normal(0.0, 1.0, 222), 1)
    y = np.r_[np.ones(333), np.zeros(222)]
    fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
    expected = fpr[np.searchsorted(tpr, target, side="left")]
    assert M.fpr_at_tpr(s_in, s_out, target) == pytest.approx(expected, abs=1e-12)


def test_ood_closed_forms() -> None:
    s_in = np.array([2.0, 3.0, 4.0])
    s_out = np.array([0.0, 1.0])
    assert M.auroc(s_in, s_out) == 1.0
    assert M.aupr_in(s_in, s_out) == 1.0
    assert M.aupr_out(s_in, s_out) == 1.0
    assert M.fpr_at_95_tpr(s_in, s_out) == 0.0
    assert M.auroc(s_out, s_in) == 0.0
    # All scores tied: chance-level ranking.
    same_in, same_out = np.full(30, 0.7), np.full(10, 0.7)
    assert M.auroc(same_in, same_out) == 0.5
    assert M.aupr_in(same_in, same_out) == pytest.approx(30 / 40)
    assert M.aupr_out(same_in, same_out) == pytest.approx(10 / 40)
    assert M.fpr_at_95_tpr(same_in, same_out) == 1.0
    # One tie between in and out counts 1/2: pairs (1>0, 1=1, 2>0, 2>1) -> 3.5 / 4.
    assert M.auroc([1.0, 2.0], [0.0, 1.0]) == pytest.approx(0.875)


def test_fpr95_threshold_hand_computed() -> None:
    s_in = np.arange(1.0, 21.0)  # 20 samples; TPR reaches 19/20 = 0.95 at threshold 2
    s_out = np.array([0.0, 1.5, 2.0, 3.0])
    assert M.fpr_at_95_tpr(s_in, s_out) == 0.5
    assert M.fpr_at_tpr(s_in, s_out, 1.0) == 0.75  # threshold 1


def test_auroc_rank_based_against_pairwise_count() -> None:
    rng = np.random.default_rng(9)
    s_in = rng.integers(0, 10, 57).astype(float)
    s_out = rng.integers(0, 8, 43).astype(float)
    diff = s_in[:, None] - s_out[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert M.auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Scoring functions
# --------------------------------------------------------------------------------------------


def test_scoring_closed_forms() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.1, 0.7, 0.1, 0.1]])
    np.testing.assert_allclose(M.max_probability(probs), [0.25, 1.0, 0.7])
    np.testing.assert_allclose(
        M.predictive_entropy(probs), [math.log(4), 0.0, scipy_entropy(probs[2])], atol=1e-12
    )
    # Two confident samples that disagree: H(mean) = log 2, mean H = 0.
    samples = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(M.mutual_information(samples), [math.log(2)], atol=1e-12)
    np.testing.assert_allclose(M.predictive_entropy(samples), [math.log(2)], atol=1e-12)
    np.testing.assert_allclose(M.max_probability(samples), [0.5])
    # Identical samples carry no epistemic uncertainty.
    same = np.stack([probs, probs, probs])
    np.testing.assert_allclose(M.mutual_information(same), 0.0, atol=1e-12)
    assert np.all(M.mutual_information(same) >= 0.0)


def test_scoring_random_samples() -> None:
    rng = np.random.default_rng(4)
    samples = softmax(rng.normal(size=(8, 50, 6)) * 2)
    mean = samples.mean(axis=0)
    h_mean = scipy_entropy(mean, axis=1)
    mean_h = scipy_entropy(samples, axis=2).mean(axis=0)
    np.testing.assert_allclose(M.predictive_entropy(samples), h_mean, rtol=1e-10)
    np.testing.assert_allclose(M.mutual_information(samples), h_mean - mean_h, rtol=1e-8)
    assert np.all(M.mutual_information(samples) >= 0.0)
    np.testing.assert_allclose(M.max_probability(samples), mean.max(axis=1))
    out = M.predictive_entropy(torch.as_tensor(samples, dtype=torch.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (50,)


def test_scores_plug_into_ood_metrics() -> None:
    rng = np.random.default_rng(8)
    p_in = softmax(rng.normal(size=(200, 5)) * 4)  # confident
    p_out = softmax(rng.normal(size=(200, 5)) * 0.5)  # diffuse
    s_in, s_out = M.max_probability(p_in), M.max_probability(p_out)
    assert M.auroc(s_in, s_out) > 0.9
    h_in, h_out = M.predictive_entropy(p_in), M.predictive_entropy(p_out)
    assert M.auroc(-h_in, -h_out) > 0.9


def test_logit_scores_closed_forms() -> None:
    # Equal logits a: E = -log(C e^a) = -(a + log C); max logit = a.
    logits = np.array([[2.0, 2.0, 2.0, 2.0], [0.0, math.log(3.0), 0.0, 0.0]])
    np.testing.assert_allclose(M.energy(logits[:1]), [-(2.0 + math.log(4))], atol=1e-12)
    # Row [0, log 3, 0, 0]: sum of exps = 1 + 3 + 1 + 1 = 6.
    np.testing.assert_allclose(M.energy(logits[1:]), [-math.log(6.0)], atol=1e-12)
    np.testing.assert_allclose(M.max_logit(logits), [2.0, math.log(3.0)])
    # Temperature: E_T(f) = T * E_1(f / T); two classes (0, 2T): -T log(1 + e^2).
    t = 0.5
    np.testing.assert_allclose(
        M.energy(np.array([[0.0, 2 * t]]), temperature=t), [-t * math.log(1 + math.e**2)]
    )
    # Huge logits stay finite (stable logsumexp): -E -> max logit as the gap grows.
    big = np.array([[1000.0, 0.0], [1000.0, 1000.0]])
    np.testing.assert_allclose(M.energy(big), [-1000.0, -(1000.0 + math.log(2))], atol=1e-9)
    # Bounds: max f <= -E <= max f + log C.
    rng = np.random.default_rng(3)
    f = rng.normal(size=(100, 7)) * 5
    neg_e = -M.energy(f)
    assert np.all(neg_e >= M.max_logit(f) - 1e-12)
    assert np.all(neg_e <= M.max_logit(f) + math.log(7) + 1e-12)
    out = M.energy(torch.as_tensor(f, dtype=torch.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (100,)
    # Shifting every logit by c shifts -E and the max logit by c; softmax scores are unchanged.
    np.testing.assert_allclose(-M.energy(f + 3.0), neg_e + 3.0, atol=1e-10)
    np.testing.assert_allclose(M.max_logit(f + 3.0), M.max_logit(f) + 3.0)


def test_logit_scores_plug_into_ood_metrics() -> None:
    """One dominant logit in, flat logits out: both logit scores separate them (negated energy)."""
    rng = np.random.default_rng(5)
    f_in = rng.normal(size=(200, 5)) * 0.5 + 4.0 * np.eye(5)[rng.integers(0, 5, 200)]
    f_out = rng.normal(size=(200, 5)) * 0.5
    assert M.auroc(-M.energy(f_in), -M.energy(f_out)) > 0.9
    assert M.auroc(M.max_logit(f_in), M.max_logit(f_out)) > 0.9


def test_invalid_logits_raise() -> None:
    with pytest.raises(ValueError, match=r"^energy: .*NaN or Inf"):
        M.energy(np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match=r"^max_logit: .*\[N, C\]"):
        M.max_logit(np.zeros(3))
    with pytest.raises(ValueError, match=r"^max_logit: .*empty"):
        M.max_logit(np.zeros((0, 3)))
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"^energy: temperature"):
            M.energy(np.zeros((2, 3)), temperature=bad)


# --------------------------------------------------------------------------------------------
# Input types and return types
# --------------------------------------------------------------------------------------------

PAIR_METRICS: list[Callable[..., Any]] = [
    M.accuracy,
    M.nll,
    M.brier_score,
    M.ece,
    M.mce,
    M.adaptive_ece,
]
SCORE_METRICS: list[Callable[..., Any]] = [
    M.auroc,
    M.aupr_in,
    M.aupr_out,
    M.fpr_at_95_tpr,
]


@pytest.mark.parametrize("metric", PAIR_METRICS, ids=lambda f: f.__name__)
def test_torch_and_numpy_agree_and_return_float(metric: Callable[..., Any]) -> None:
    probs, labels = random_problem(0, 300, 7)
    ref = metric(probs, labels)
    assert is_py_float(ref)
    t_probs = torch.tensor(probs, dtype=torch.float64, requires_grad=True)
    assert metric(t_probs, torch.as_tensor(labels)) == pytest.approx(ref, abs=1e-12)
    got32 = metric(t_probs.float(), torch.as_tensor(labels, dtype=torch.int32))
    assert is_py_float(got32)
    assert got32 == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("metric", SCORE_METRICS, ids=lambda f: f.__name__)
def test_ood_torch_inputs(metric: Callable[..., Any]) -> None:
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(1, 1, 100), rng.normal(0, 1, 90)
    ref = metric(s_in, s_out)
    assert is_py_float(ref)
    assert metric(torch.as_tensor(s_in), torch.as_tensor(s_out)) == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Error cases
# --------------------------------------------------------------------------------------------

GOOD_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
GOOD_LABELS = np.array([0, 2])


def _with(value: float) -> np.ndarray:
    p = GOOD_PROBS.copy()
    p[1, 0] = value
    return p


BAD_PAIRS: list[tuple[str, Any, Any, str]] = [
    ("nan", _with(np.nan), GOOD_LABELS, "NaN or Inf"),
    ("inf", _with(np.inf), GOOD_LABELS, "NaN or Inf"),
    ("neg_inf", _with(-np.inf), GOOD_LABELS, "NaN or Inf"),
    ("rows_not_normalised", GOOD_PROBS * 1.1, GOOD_LABELS, "sum to 1"),
    ("logits", np.array([[2.0, -1.0, 0.0], [0.0, 1.0, 3.0]]), GOOD_LABELS, "lie in"),
    ("negative_prob", np.array([[1.2, -0.2, 0.0], [0.1, 0.6, 0.3]]), GOOD_LABELS, "lie in"),
    ("probs_1d", GOOD_PROBS[0], GOOD_LABELS[:1], r"\[N, C\]"),
    ("probs_3d", GOOD_PROBS[None], GOOD_LABELS, r"\[N, C\]"),
    ("empty", np.zeros((0, 3)), np.zeros(0, dtype=np.int64), "empty"),
    ("label_too_big", GOOD_PROBS, np.array([0, 3]), "labels must lie in"),
    ("label_negative", GOOD_PROBS, np.array([-1, 0]), "labels must lie in"),
    ("float_labels", GOOD_PROBS, np.array([0.0, 2.0]), "integer dtype"),
    ("labels_2d", GOOD_PROBS, GOOD_LABELS[:, None], r"shape \[N\]"),
    ("length_mismatch", GOOD_PROBS, np.array([0, 1, 2]), "rows of probs"),
    ("string_probs", np.array([["a", "b"]]), np.array([0]), "numeric"),
]


@pytest.mark.parametrize("metric", [*PAIR_METRICS, M.reliability_curve], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("case", "probs", "labels", "msg"), [pytest.param(*c, id=c[0]) for c in BAD_PAIRS]
)
def test_invalid_probs_labels_raise(
    metric: Callable[..., Any], case: str, probs: Any, labels: Any, msg: str
) -> None:
    with pytest.raises(ValueError, match=msg) as info:
        metric(probs, labels)
    assert str(info.value).startswith(f"{metric.__name__}:")


def test_nan_in_torch_tensor_raises() -> None:
    t = torch.tensor(_with(float("nan")), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^ece: probs contains NaN or Inf"):
        M.ece(t, torch.as_tensor(GOOD_LABELS))


@pytest.mark.parametrize("metric", [M.ece, M.mce, M.adaptive_ece, M.reliability_curve])
@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_invalid_n_bins_raise(metric: Callable[..., Any], n_bins: Any) -> None:
    with pytest.raises(ValueError, match="n_bins"):
        metric(GOOD_PROBS, GOOD_LABELS, n_bins=n_bins)


BAD_SCORES: list[tuple[str, Any, Any, str]] = [
    ("nan_in", np.array([0.1, np.nan]), np.array([0.2]), "scores_in contains NaN or Inf"),
    ("inf_out", np.array([0.1, 0.2]), np.array([np.inf]), "scores_out contains NaN or Inf"),
    ("empty_in", np.array([]), np.array([0.2]), "scores_in is empty"),
    ("empty_out", np.array([0.1]), torch.zeros(0), "scores_out is empty"),
    ("2d", np.ones((2, 2)), np.array([0.2]), r"shape \[N\]"),
]


@pytest.mark.parametrize("metric", [*SCORE_METRICS, M.ood_metrics], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("case", "s_in", "s_out", "msg"), [pytest.param(*c, id=c[0]) for c in BAD_SCORES]
)
def test_invalid_scores_raise(
    metric: Callable[..., Any], case: str, s_in: Any, s_out: Any, msg: str
) -> None:
    with pytest.raises(ValueError, match=msg):
        metric(s_in, s_out)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_invalid_tpr_target_raises(target: float) -> None:
    with pytest.raises(ValueError, match="tpr must lie in"):
        M.fpr_at_tpr([1.0, 2.0], [0.0], target)


def test_invalid_scoring_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"^mutual_information: .*\[S, N, C\]"):
        M.mutual_information(GOOD_PROBS)
    with pytest.raises(ValueError, match=r"^max_probability: .*\[N, C\] or \[S, N, C\]"):
        M.max_probability(GOOD_PROBS[0])
    with pytest.raises(ValueError, match=r"^predictive_entropy: .*NaN or Inf"):
        M.predictive_entropy(_with(np.nan))
    with pytest.raises(ValueError, match=r"^mutual_information: .*sum to 1"):
        M.mutual_information(np.stack([GOOD_PROBS, GOOD_PROBS * 0.5]))
