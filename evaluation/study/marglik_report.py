"""The report's marginal-likelihood training section and its figure.

- a table per marglik method against the MAP and temperature scaling: test NLL / ECE /
  accuracy, the far-OOD AUROC of the entropy score (uniform noise when the study has it), the
  final log evidence per training point, the learned prior precisions and the training time
  against the MAP's;
- ``marglik.png``: the log evidence per training point and every block's prior precision
  against the epoch (seed 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from evaluation.study.marglik import MARGLIK_PREFIX
from evaluation.study.sweep import SWEEP_OOD_PREFERENCE
from evaluation.study.tables import Column, markdown_table

__all__ = ["marglik_figure", "marglik_methods", "marglik_section"]

FIGURE = "marglik.png"
_BASELINES = ("map", "temp")


def marglik_methods(results: dict[str, Any]) -> list[str]:
    return [m for m in results["methods"] if m.startswith(MARGLIK_PREFIX)]


def _far_ood(results: dict[str, Any]) -> str | None:
    sets: list[str] = results["ood_sets"]
    return next((o for o in SWEEP_OOD_PREFERENCE if o in sets), sets[0] if sets else None)


def marglik_section(results: dict[str, Any]) -> list[str]:
    """Markdown lines of the section (none when the study ran no marglik method)."""
    ours = marglik_methods(results)
    if not ours:
        return []
    seeds = results["seeds"]
    far = _far_ood(results)
    rows = [m for m in (*_BASELINES, *results["methods"]) if m in results["methods"]]
    rows = list(dict.fromkeys([m for m in _BASELINES if m in rows] + ours))
    cols = [
        Column("nll", "NLL", "min", 4),
        Column("ece", "ECE", "min", 4),
        Column("accuracy", "acc", "max", 4),
    ]
    cells: dict[tuple[str, str], list[float]] = {}
    for m in rows:
        for c in cols:
            cells[(m, c.key)] = [s["methods"][m]["in_distribution"][c.key] for s in seeds]
        if far is not None:
            cells[(m, "far")] = [s["methods"][m]["ood"][far]["entropy"]["auroc"] for s in seeds]
        if m in ours:
            n_train = [s["data"]["n_train"] for s in seeds]
            traces = [s["methods"][m]["marglik"] for s in seeds]
            cells[(m, "evidence")] = [
                t["log_evidence"][-1] / n if t["log_evidence"] else math.nan
                for t, n in zip(traces, n_train, strict=True)
            ]
            cells[(m, "tau")] = [
                s["methods"][m]["hyperparameters"]["prior_precision"] for s in seeds
            ]
            ratios = [  # only where the MAP was trained in this run (not loaded)
                sum(t["seconds"]) / max(s["map"]["seconds"], 1e-9)
                for t, s in zip(traces, seeds, strict=True)
                if not s["map"]["cached"]
            ]
            if ratios:
                cells[(m, "time")] = ratios
            cells[(m, "seconds")] = [sum(t["seconds"]) for t in traces]
    if far is not None:
        cols.append(Column("far", f"AUROC {far}", "max", 4))
    cols += [
        Column("evidence", "log evidence / N", None, 4),
        Column("tau", "τ (geo. mean)", None, 3),
        Column("seconds", "train s", None, 1),
        Column("time", "× MAP training", None, 2),
    ]
    return [
        "## Marginal-likelihood training",
        "",
        "Each `marglik-*` method trains a fresh network (the MAP's initialisation, data order, "
        "epochs, batch size and learning rate, no weight decay) with "
        "`bayes_kfoc.marglik_training` at its defaults (a refit every epoch, 100 Adam steps on "
        "log τ per refit at lr 0.1, τ0 = 1 per module), and predicts with the learned posterior "
        "(GLM probit, T = 1): no validation data. `temp` does use validation data. The far-OOD "
        "AUROC is the entropy score's. Log evidence per training point at the last epoch; "
        "`× MAP training`: marglik training time over the MAP's (– when the MAP was cached).",
        "",
        markdown_table(rows, cols, cells),
        "",
        f"![Evidence and prior precisions over the epochs (seed 0)](figures/{FIGURE})",
        "",
    ]


def marglik_figure(results: dict[str, Any], path: Path) -> None:
    """Log evidence per point and every block's τ against the epoch, one column per method."""
    ours = marglik_methods(results)
    seed0 = results["seeds"][0]
    n_train = seed0["data"]["n_train"]
    fig, axes = plt.subplots(2, len(ours), figsize=(4 * len(ours), 6), squeeze=False)
    for j, m in enumerate(ours):
        trace = seed0["methods"][m]["marglik"]
        ax = axes[0][j]
        ax.plot(trace["refit_epoch"], [e / n_train for e in trace["log_evidence"]])
        ax.set_title(m)
        ax.set_xlabel("epoch")
        ax.set_ylabel("log evidence / N")
        ax = axes[1][j]
        for block, taus in trace["prior_precision"].items():
            ax.plot(trace["refit_epoch"], taus, label=block or "(root)")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("prior precision τ (summed scale)")
        ax.legend(fontsize=6, title="module", title_fontsize=6)
    fig.suptitle(f"Marginal-likelihood training, seed 0 ({results['config']['model']})")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
