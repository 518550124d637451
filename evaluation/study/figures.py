"""The study's PNG figures (matplotlib's Agg backend, seaborn styling).

- ``reliability.png``: a reliability diagram per method (bins pooled over seeds);
- ``shift.png``: NLL, ECE and accuracy against the rotation angle (mean ± sd over seeds);
- ``ood_<set>.png``: histograms of each OOD score, test split against the OOD set (seed 0);
- ``roc_<set>.png``: ROC curves per score, one line per method (seed 0; in-distribution is the
  positive class, as in :mod:`evaluation.metrics.ood`);
- ``fisher_fidelity.png``: per-layer relative Frobenius error of diag / K-FAC / K-FOC.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from sklearn.metrics import roc_curve

__all__ = ["SCORE_LABELS", "write_figures"]

SCORE_LABELS = {
    "max_prob": "max probability",
    "entropy": "− predictive entropy",
    "mutual_info": "− mutual information",
}
DPI = 110


@contextmanager
def _style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        yield


def _palette(methods: Sequence[str]) -> dict[str, Any]:
    colors = sns.color_palette("tab10", max(len(methods), 1))
    return dict(zip(methods, colors, strict=False))


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    cols = min(n, ncols)
    return math.ceil(n / cols), cols


def reliability_figure(results: dict[str, Any], path: Path) -> None:
    """One reliability diagram per method, bins pooled over seeds."""
    methods: list[str] = results["methods"]
    rows, cols = _grid(len(methods))
    with _style():
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
        for ax, m in zip(axes.flat, methods, strict=False):
            rel = [s["methods"][m]["reliability"] for s in results["seeds"]]
            edges = np.asarray(rel[0]["bin_edges"])
            counts = np.sum([r["counts"] for r in rel], axis=0)
            conf = np.sum([r["confidence_sum"] for r in rel], axis=0)
            corr = np.sum([r["correct_sum"] for r in rel], axis=0)
            nz = counts > 0
            centers = 0.5 * (edges[:-1] + edges[1:])
            width = np.diff(edges)
            acc = np.divide(corr, counts, out=np.zeros_like(corr), where=nz)
            mean_conf = np.divide(conf, counts, out=np.zeros_like(conf), where=nz)
            ax.bar(
                centers[nz], acc[nz], width[nz], color="C0", edgecolor="k", lw=0.4, label="accuracy"
            )
            gap = mean_conf[nz] - acc[nz]
            ax.bar(
                centers[nz],
                np.abs(gap),
                width[nz],
                bottom=np.minimum(acc[nz], mean_conf[nz]),
                facecolor="none",
                edgecolor="C3",
                hatch="///",
                lw=0.6,
                label="gap to confidence",
            )
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ece = np.sum(np.abs(corr - conf)) / counts.sum()
            ax.set_title(f"{m}  (pooled ECE {ece:.3f})")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
        for ax in list(axes.flat)[len(methods) :]:
            ax.set_visible(False)
        axes.flat[0].legend(loc="upper left")
        fig.suptitle(f"Reliability diagrams, {_title(results)}")
        _save(fig, path)


def _title(results: dict[str, Any]) -> str:
    cfg = results["config"]
    n = len(results["seeds"])
    return f"{cfg['dataset']} / {cfg['model']} ({n} seed{'s' if n > 1 else ''})"


def shift_figure(results: dict[str, Any], path: Path) -> None:
    """NLL, ECE and accuracy against the rotation angle, mean ± sd over seeds."""
    records = []
    for s in results["seeds"]:
        for m in results["methods"]:
            sh = s["methods"][m]["shift"]
            for i, a in enumerate(results["angles"]):
                for metric in ("nll", "ece", "accuracy"):
                    records.append(
                        {
                            "method": m,
                            "seed": s["seed"],
                            "angle": a,
                            "metric": metric,
                            "value": sh[metric][i],
                        }
                    )
    df = pd.DataFrame.from_records(records)
    palette = _palette(results["methods"])
    with _style():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, metric, label in zip(
            axes, ("nll", "ece", "accuracy"), ("NLL ↓", "ECE ↓", "accuracy ↑"), strict=True
        ):
            sns.lineplot(
                df[df.metric == metric],
                x="angle",
                y="value",
                hue="method",
                palette=palette,
                errorbar="sd",
                marker="o",
                markersize=4,
                ax=ax,
                legend=metric == "nll",
            )
            ax.set_xlabel("rotation angle (degrees)")
            ax.set_ylabel(label)
            ax.set_xticks(results["angles"][:: max(1, len(results["angles"]) // 7)])
        if axes[0].get_legend() is not None:
            sns.move_legend(axes[0], "upper left", fontsize=7, title=None)
        fig.suptitle(f"Rotation shift, {_title(results)}")
        _save(fig, path)


def _score_names(
    methods: list[str], scores: dict[str, dict[str, dict[str, np.ndarray]]]
) -> list[str]:
    """The OOD scores that at least one method produced, in ``SCORE_LABELS`` order."""
    return [s for s in SCORE_LABELS if any(s in scores[m]["test"] for m in methods)]


def ood_histogram_figure(
    results: dict[str, Any],
    scores: dict[str, dict[str, dict[str, np.ndarray]]],
    ood_set: str,
    path: Path,
) -> None:
    """Rows: methods; columns: scores; test split vs ``ood_set`` (seed 0)."""
    methods = results["methods"]
    score_names = _score_names(methods, scores)
    rows, cols = len(methods), len(score_names)
    with _style():
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 1.9 * rows), squeeze=False)
        for i, m in enumerate(methods):
            for j, sc in enumerate(score_names):
                ax = axes[i, j]
                if sc not in scores[m]["test"]:
                    ax.set_visible(False)
                    continue
                s_in, s_out = scores[m]["test"][sc], scores[m][ood_set][sc]
                lo = float(min(s_in.min(), s_out.min()))
                hi = float(max(s_in.max(), s_out.max()))
                bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
                ax.hist(s_in, bins=bins, density=True, alpha=0.55, color="C0", label="test (in)")
                ax.hist(
                    s_out, bins=bins, density=True, alpha=0.55, color="C3", label=f"{ood_set} (out)"
                )
                auroc = results["seeds"][0]["methods"][m]["ood"][ood_set][sc]["auroc"]
                ax.set_title(f"{m}: AUROC {auroc:.3f}", fontsize=8)
                ax.set_yscale("log")
                ax.set_yticks([], minor=True)
                ax.set_yticks([])
                if i == rows - 1:
                    ax.set_xlabel(SCORE_LABELS[sc])
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"OOD scores (larger = more in-distribution; log density), {ood_set}, seed 0")
        _save(fig, path)


def roc_figure(
    results: dict[str, Any],
    scores: dict[str, dict[str, dict[str, np.ndarray]]],
    ood_set: str,
    path: Path,
) -> None:
    """One panel per score, one ROC curve per method (seed 0)."""
    methods = results["methods"]
    score_names = _score_names(methods, scores)
    palette = _palette(methods)
    with _style():
        fig, axes = plt.subplots(
            1, len(score_names), figsize=(4.0 * len(score_names), 3.8), squeeze=False
        )
        for ax, sc in zip(axes[0], score_names, strict=True):
            for m in methods:
                if sc not in scores[m]["test"]:
                    continue
                s_in, s_out = scores[m]["test"][sc], scores[m][ood_set][sc]
                y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
                fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out])
                auroc = results["seeds"][0]["methods"][m]["ood"][ood_set][sc]["auroc"]
                ax.plot(fpr, tpr, color=palette[m], lw=1.2, label=f"{m} ({auroc:.3f})")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_title(SCORE_LABELS[sc])
            ax.set_xlabel(f"FPR ({ood_set} accepted)")
            ax.set_ylabel("TPR (test accepted)")
            ax.legend(fontsize=6, loc="lower right")
        fig.suptitle(f"ROC, test split vs {ood_set}, seed 0 (AUROC in brackets)")
        _save(fig, path)


def fidelity_figure(section: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars: per layer, the relative Frobenius error of each structure."""
    records = [
        {"layer": f"{layer['module']}\n({layer['num_params']} params)", "structure": s, "error": e}
        for layer in section["layers"]
        for s, e in layer["errors"].items()
    ]
    df = pd.DataFrame.from_records(records)
    with _style():
        fig, ax = plt.subplots(figsize=(1.9 * len(section["layers"]) + 2.5, 3.6))
        sns.barplot(df, x="layer", y="error", hue="structure", ax=ax)
        for c in ax.containers:
            ax.bar_label(c, fmt="%.2f", fontsize=7)  # type: ignore[arg-type]
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("‖F − K‖_F / ‖F‖_F")
        ax.set_xlabel("layer")
        ax.set_title(f"Fisher fidelity vs the exact block, {title}")
        _save(fig, path)


def write_figures(
    results: dict[str, Any],
    scores: dict[str, dict[str, dict[str, np.ndarray]]],
    directory: Path,
) -> list[str]:
    """Write every figure into ``directory / "figures"``; return their paths relative to it.

    Args:
        results: The results dict (as in results.json).
        scores: Seed-0 raw OOD scores ``{method: {"test" | ood_set: {score: array}}}``.
        directory: The report directory.
    """
    fig_dir = directory / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def out(name: str) -> Path:
        written.append(f"figures/{name}")
        return fig_dir / name

    reliability_figure(results, out("reliability.png"))
    if results["angles"]:
        shift_figure(results, out("shift.png"))
    for ood_set in results["ood_sets"]:
        ood_histogram_figure(results, scores, ood_set, out(f"ood_{ood_set}.png"))
        roc_figure(results, scores, ood_set, out(f"roc_{ood_set}.png"))
    if results.get("fisher_fidelity"):
        fid = results["fisher_fidelity"]
        fidelity_figure(
            fid,
            out("fisher_fidelity.png"),
            f"{_title(results).split(' (')[0]}, seed 0, {fid['n_points']} points",
        )
    return written
