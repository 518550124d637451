"""The study's marginal-likelihood-trained methods: ``marglik-kfoc``, ``marglik-kfac``,
``marglik-diag`` (and ``marglik-full`` for networks small enough for dense blocks).

Each trains a fresh copy of the seed's network (the MAP's initialisation: the same seed, the
same data order, epochs, batch size and Adam learning rate, no weight decay) with
:func:`bayes_kfoc.marglik_training` at the library's defaults (laplace-torch's: ``τ0 = 1``,
Adam ``lr=0.1`` on ``log τ`` with 100 steps per refit, a refit every epoch, no burn-in), and
predicts with the resulting Laplace posterior (GLM probit, temperature 1). No validation data is
used.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bayes_kfoc import Laplace, MarglikEpoch, marglik_training

__all__ = ["MARGLIK_PREFIX", "MARGLIK_STRUCTURES", "MarglikRun", "fresh_copy", "run_marglik"]

MARGLIK_PREFIX = "marglik-"
MARGLIK_STRUCTURES: tuple[str, ...] = ("kfoc", "kfac", "diag", "full")


@dataclass(frozen=True)
class MarglikRun:
    """One marglik training run.

    Attributes:
        laplace: the fitted posterior at the learned prior.
        trace: per-epoch record, JSON-ready (:func:`trace_json`).
        seconds: wall time of the whole training (fits and hyper-steps included).
    """

    laplace: Laplace
    trace: dict[str, Any]
    seconds: float


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` re-initialised as :func:`evaluation.study.checkpoints` builds it
    (``torch.manual_seed(seed)``, then every module's ``reset_parameters`` in order)."""
    out = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in out.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return out


def trace_json(history: list[MarglikEpoch]) -> dict[str, Any]:
    """``{epoch, loss, log_evidence, seconds, fit_seconds, hyper_seconds: [...],
    prior_precision: {block: [...]}}``; epochs without a refit are left out of the evidence
    and prior lists (``refit_epoch`` names those with one)."""
    refits = [h for h in history if h.log_evidence is not None]
    blocks = list(refits[-1].prior_precision) if refits else []
    return {
        "epoch": [h.epoch for h in history],
        "loss": [h.loss for h in history],
        "seconds": [h.seconds for h in history],
        "fit_seconds": [h.fit_seconds for h in history],
        "hyper_seconds": [h.hyper_seconds for h in history],
        "refit_epoch": [h.epoch for h in refits],
        "log_evidence": [float(h.log_evidence or 0.0) for h in refits],
        "prior_precision": {b: [h.prior_precision[b] for h in refits] for b in blocks},
    }


def run_marglik(
    model: nn.Module,
    train: Dataset[Any],
    structure: str,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> MarglikRun:
    """Marglik-train a fresh copy of ``model`` (see the module docstring)."""
    net = fresh_copy(model, seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
    start = time.perf_counter()
    result = marglik_training(
        net, loader, structure, epochs=epochs, lr=lr, seed=seed, progress=False
    )
    return MarglikRun(result.laplace, trace_json(result.history), time.perf_counter() - start)
