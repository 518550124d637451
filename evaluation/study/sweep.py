"""Does curvature quality matter? diag, K-FAC and K-FOC compared at *matched* priors.

Each structure's own tuning picks its own prior scale ``s`` and temperature ``T``, so the main
tables compare posteriors at different priors: a gap between structures there may come from the
prior rather than from the curvature. The sweep removes that freedom: for the seed-0 network it
evaluates every structure (all weights) at the same scaled priors ``τ_b = s · P_b / ||θ*_b||²``
for a log grid of ``s`` (:data:`SWEEP_SCALES`), with ``T = 1``, and records the test NLL, the
test ECE and the AUROC of the entropy score against one far-OOD set (uniform noise when the
study has it). At each structure's chosen ``s`` it also records the same numbers at ``T = 1``,
so the figure's marker sits on the curve.

It re-evaluates the posteriors the study already fitted, without changing them: one Jacobian pass
over the test split and the OOD set computes the GLM's τ-independent terms (squared Jacobian
coordinates in each block's eigenbasis), and every scale is then a contraction with the damped
spectrum and a probit, numerically the predictive ``Laplace.predict`` gives at that prior.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from bayes_kfoc import Laplace
from evaluation import metrics as M
from evaluation.structures import STRUCTURES

__all__ = [
    "SWEEP_OOD_PREFERENCE",
    "SWEEP_SCALES",
    "PriorSweep",
    "SweepPoint",
    "map_point",
    "prior_base",
    "sweep_ood_set",
    "sweep_posterior",
    "sweep_structures",
]

SWEEP_SCALES: tuple[float, ...] = tuple(10 ** (-2 + 7 * i / 14) for i in range(15))
"""15 log-spaced prior scales ``s`` from ``1e-2`` to ``1e5`` (the tuning grid's range)."""
SWEEP_OOD_PREFERENCE: tuple[str, ...] = ("uniform", "gaussian")
"""Far-OOD sets the sweep's AUROC prefers, in order (else the study's first OOD set)."""


@dataclass(frozen=True)
class SweepPoint:
    """The numbers of one predictive: test NLL and ECE, and the entropy score's AUROC (test split
    against the sweep's OOD set; ``None`` without one)."""

    nll: float
    ece: float
    auroc: float | None


def sweep_structures(methods: Sequence[str]) -> tuple[str, ...]:
    """The structures the sweep compares: those among ``methods`` on either subset."""
    return tuple(s for s in STRUCTURES if s in methods or f"{s}-ll" in methods)


def sweep_ood_set(ood_sets: Sequence[str]) -> str | None:
    """The OOD set of the sweep's AUROC (see :data:`SWEEP_OOD_PREFERENCE`), ``None`` if none."""
    for name in SWEEP_OOD_PREFERENCE:
        if name in ood_sets:
            return name
    return ood_sets[0] if ood_sets else None


def prior_base(la: Laplace) -> Tensor:
    """``P_b / ||θ*_b||²`` per block of ``la`` (block order): ``τ = s · prior_base(la)``."""
    return la.scaled_prior_base()


def _point(probs: Tensor, labels: Tensor, n_test: int) -> SweepPoint:
    p_test, p_out = probs[:n_test], probs[n_test:]
    auroc = None
    if len(p_out):
        auroc = M.auroc(-M.predictive_entropy(p_test), -M.predictive_entropy(p_out))
    return SweepPoint(M.nll(p_test, labels), M.ece(p_test, labels), auroc)


TERMS_CHUNK = 2048
"""Points whose τ-independent GLM terms are held at once (memory: ``C`` squared Jacobian
coordinates per parameter of a shared-weight block, per point)."""


def _probit_probs(
    la: Laplace, x_all: Tensor, settings: Sequence[tuple[Tensor, float]]
) -> list[Tensor]:
    """The GLM probit predictive (``Laplace.predict``'s default) at every ``(τ, T)`` of
    ``settings``, from one Jacobian pass: per chunk of points the τ-independent terms, then a
    contraction with each damped spectrum."""
    parts: list[list[Tensor]] = [[] for _ in settings]
    for xb in torch.split(x_all, TERMS_CHUNK):
        terms = la.glm_terms(xb)
        for out, (tau, temperature) in zip(parts, settings, strict=True):
            out.append(terms.probs(tau, temperature=temperature))
    return [torch.cat(p) for p in parts]


def map_point(
    model: torch.nn.Module, test: tuple[Tensor, Tensor], x_ood: Tensor | None
) -> SweepPoint:
    """The MAP network's softmax (the limit ``s → ∞`` of every structure at ``T = 1``)."""
    x, y = test
    x_all = x if x_ood is None else torch.cat([x, x_ood])
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(xb), -1) for xb in torch.split(x_all, 2048)])
    return _point(probs, y, len(x))


def sweep_posterior(
    la: Laplace,
    test: tuple[Tensor, Tensor],
    x_ood: Tensor | None,
    scales: Sequence[float] = SWEEP_SCALES,
    *,
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``la`` at ``τ = s · P_b / ||θ*_b||²`` for every ``s`` in ``scales`` (and at its
    tuned scale), ``T = 1``, from one Jacobian pass; ``la`` itself is not changed.

    Args:
        la: A fitted (and tuned) posterior.
        test: Test inputs and labels.
        x_ood: The OOD set of the AUROC, or ``None``.
        scales: The prior scales ``s``.
        step: Called before the Jacobian pass (progress display).

    Returns:
        JSON-ready ``{"nll": [...], "ece": [...], "auroc": [...] or None, "chosen": {"scale",
        "temperature", "nll", "ece", "auroc"} or None, "tuned": {"nll", "ece", "auroc"},
        "seconds"}``: per scale of ``scales``; ``chosen`` holds the tuned ``s`` and ``T`` and
        the numbers at that ``s`` with ``T = 1``; ``tuned`` the numbers of the tuned predictive
        (its ``s`` and ``T``, the numbers of the main evaluation).
    """
    start = time.perf_counter()
    x, y = test
    x_all = x if x_ood is None else torch.cat([x, x_ood])
    base = prior_base(la).to(la.prior_precision)
    saved_tau, saved_t = la.prior_precision.clone(), la.temperature
    tuned = la.tuning.scale if la.tuning is not None else None
    note = step or (lambda _: None)
    todo = [*scales, *([tuned] if tuned is not None else [])]
    note(f"{len(todo)} prior scales from one Jacobian pass over {len(x_all)} points")
    settings = [(s * base, 1.0) for s in todo] + [(saved_tau, float(saved_t))]  # + as tuned
    probs = _probit_probs(la, x_all, settings)
    points = [_point(p, y, len(x)) for p in probs[:-1]]
    tuned_point = _point(probs[-1], y, len(x))
    curve = points[: len(scales)]
    out: dict[str, Any] = {
        "nll": [p.nll for p in curve],
        "ece": [p.ece for p in curve],
        "auroc": [p.auroc for p in curve] if x_ood is not None else None,
        "chosen": None,
    }
    if tuned is not None:
        out["chosen"] = {"scale": float(tuned), "temperature": float(saved_t), **asdict(points[-1])}
    out["tuned"] = asdict(tuned_point)
    out["seconds"] = time.perf_counter() - start
    return out


class PriorSweep:
    """Collects the sweep of each structure while the study runs seed 0.

    The study hands over each all-weights posterior right after evaluating it (:meth:`add`), so
    no posterior is kept; a structure requested on the last layer only is refitted on all weights
    once, at the end (:meth:`finish`).

    Args:
        structures: The structures to sweep (:func:`sweep_structures`).
        model: The seed-0 MAP network.
        test: Its test inputs and labels.
        ood: The seed-0 OOD sets by name (the sweep uses one, :func:`sweep_ood_set`).
        scales: The prior scales ``s``.
    """

    def __init__(
        self,
        structures: Sequence[str],
        model: torch.nn.Module,
        test: tuple[Tensor, Tensor],
        ood: dict[str, Tensor],
        scales: Sequence[float] = SWEEP_SCALES,
    ):
        self.structures = tuple(structures)
        self.test = test
        self.ood_set = sweep_ood_set(list(ood))
        self.x_ood = ood[self.ood_set] if self.ood_set is not None else None
        self.scales = tuple(float(s) for s in scales)
        self.map = map_point(model, test, self.x_ood)
        self.curves: dict[str, dict[str, Any]] = {}

    def add(
        self,
        structure: str,
        la: Laplace,
        *,
        refit: bool = False,
        step: Callable[[str], None] | None = None,
    ) -> None:
        """Sweep the all-weights posterior ``la`` of ``structure``."""
        curve = sweep_posterior(la, self.test, self.x_ood, self.scales, step=step)
        self.curves[structure] = {"refit": refit, **curve}

    def finish(
        self,
        refit: Callable[[str], Laplace],
        step: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Refit (``refit(structure)``: a tuned all-weights posterior) and sweep the structures
        not handed over yet; return the JSON-ready section."""
        for s in self.structures:
            if s not in self.curves:
                self.add(s, refit(s), refit=True, step=step)
        return {
            "seed": 0,
            "scales": list(self.scales),
            "temperature": 1.0,
            "prior": "scaled",
            "score": "entropy",
            "ood_set": self.ood_set,
            "n_test": len(self.test[1]),
            "n_ood": 0 if self.x_ood is None else len(self.x_ood),
            "map": asdict(self.map),
            "structures": {s: self.curves[s] for s in self.structures},
        }
