"""The study's PNG figures (matplotlib's Agg backend, seaborn styling).

- ``reliability.png``: a reliability diagram per method (bins pooled over seeds; the title's ECE
  is the per-seed mean, the number the table reports), with the share of test points per bin
  below it (so a bin of three points is visibly one);
- ``shift.png``: NLL, ECE and accuracy against the rotation angle (mean ± sd over seeds);
- ``ood_<set>.png``: histograms of each OOD score, test split against the OOD set (seed 0);
- ``roc_<set>.png``: ROC curves per score, one line per method (seed 0; in-distribution is the
  positive class, as in :mod:`evaluation.metrics.ood`);
- ``prior_sweep.png``: test NLL, ECE and far-OOD AUROC of diag / K-FAC / K-FOC against a shared
  prior scale (seed 0; :mod:`evaluation.study.sweep_report`);
- ``marglik.png``: the log evidence and prior precisions of marglik training over the epochs
  (:mod:`evaluation.study.marglik_report`);
- ``fisher_fidelity.png``: per-layer relative Frobenius error of diag / K-FAC / K-FOC (mean and
  sd over the random subsets), layers named by module and type.

Each method keeps one colour in every figure: a family hue per method (grey MAP, brown
temperature, blue / orange / green for diag / K-FAC / K-FOC, purple laplace-torch), dark for all
weights and light for the last layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
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

from evaluation.study.marglik_report import FIGURE as MARGLIK_FIGURE
from evaluation.study.marglik_report import marglik_figure, marglik_methods
from evaluation.study.sweep_report import sweep_figure

__all__ = ["SCORE_LABELS", "write_figures"]

SCORE_LABELS = {
    "max_prob": "max probability",
    "entropy": "− predictive entropy",
    "mutual_info": "− mutual information",
    "energy": "− energy (logsumexp of the logits)",
    "max_logit": "max logit",
}
DPI = 110


@contextmanager
def _style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        yield


_FAMILY = {"map": 7, "temp": 5, "diag": 0, "kfac": 1, "kfoc": 2, "laplace-torch": 4}


def _palette(methods: Sequence[str]) -> dict[str, Any]:
    """A colour per method: its family's hue (tab20: dark = all weights, light = last layer)."""
    tab20 = sns.color_palette("tab20", 20)
    out: dict[str, Any] = {}
    spare = iter(i for i in (3, 6, 8, 9) if i not in _FAMILY.values())
    for m in methods:
        base = m.removesuffix("-ll")
        family = _FAMILY.get(base)
        if family is None:
            family = next(spare, 9)
        out[m] = tab20[2 * family + (1 if m.endswith("-ll") else 0)]
    return out


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    cols = min(n, ncols)
    return math.ceil(n / cols), cols


def reliability_figure(results: dict[str, Any], path: Path) -> None:
    """One reliability diagram per method, bins pooled over seeds, with per-bin counts below."""
    methods: list[str] = results["methods"]
    rows, cols = _grid(len(methods))
    with _style():
        fig = plt.figure(figsize=(3.1 * cols, 3.9 * rows))
        outer = fig.add_gridspec(rows, cols, hspace=0.55, wspace=0.3)
        for k, m in enumerate(methods):
            inner = outer[k // cols, k % cols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
            ax, hx = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
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
            ece = float(
                np.mean([s["methods"][m]["in_distribution"]["ece"] for s in results["seeds"]])
            )
            ax.set_title(f"{m}  (ECE {ece:.3f})")
            ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
            ax.tick_params(labelbottom=False)
            share = counts / max(counts.sum(), 1)
            hx.bar(centers, share, width, color="0.45", edgecolor="k", lw=0.3)
            for c, n, h in zip(centers, counts, share, strict=True):
                if 0 < n < 20:  # a bin this small cannot be read as a rate
                    hx.annotate(f"{int(n)}", (c, h), ha="center", va="bottom", fontsize=6)
            hx.set(xlim=(0, 1), ylim=(0, 1.15), xlabel="confidence", ylabel="share")
            hx.set_yticks([0, 0.5, 1])
            if k == 0:
                ax.legend(loc="upper left", fontsize=7, frameon=True)
        fig.suptitle(
            f"Reliability diagrams, {_title(results)}: bins pooled over seeds; ECE = mean over "
            "seeds (as in the table); below: share of test points per bin (counts < 20 printed)",
            fontsize=9,
        )
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)


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
            ax.set_xticks(results["angles"][:: max(1, math.ceil(len(results["angles"]) / 7))])
        if axes[0].get_legend() is not None:  # outside the panels: it never covers a curve
            sns.move_legend(
                axes[0], "upper center", bbox_to_anchor=(1.75, -0.2), ncol=8, fontsize=7, title=None
            )
        fig.suptitle(f"Rotation shift, {_title(results)} (mean ± sd over seeds)")
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)


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
                if sc not in scores[m]["test"]:  # e.g. no mutual information: deterministic
                    ax.set_axis_off()
                    ax.text(
                        0.5,
                        0.5,
                        f"{m}: no {SCORE_LABELS[sc].lstrip('− ')}\n(deterministic predictive)",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="0.4",
                        transform=ax.transAxes,
                    )
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
                ax.tick_params(axis="y", labelsize=6)
                if j == 0:
                    ax.set_ylabel("density (log)", fontsize=7)
                if i == rows - 1:
                    ax.set_xlabel(SCORE_LABELS[sc])
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=2)
        fig.suptitle(
            f"OOD scores (larger = more in-distribution), test split vs {ood_set}, seed 0",
            x=0.02,
            ha="left",
        )
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
    """Grouped bars: per layer (module name and type), each structure's relative Frobenius error,
    mean ± sd over the random subsets."""
    layers = section["layers"]
    structures = list(layers[0]["errors"])
    colors = {"diag": "C0", "kfac": "C1", "kfoc": "C2"}
    width = 0.8 / len(structures)
    with _style():
        fig, ax = plt.subplots(figsize=(2.2 * len(layers) + 2.5, 3.8))
        xs = np.arange(len(layers))
        for k, st in enumerate(structures):
            means = [layer["errors"][st] for layer in layers]
            sds = [layer.get("errors_sd", {}).get(st, 0.0) for layer in layers]
            bars = ax.bar(
                xs + (k - (len(structures) - 1) / 2) * width,
                means,
                width,
                yerr=sds,
                capsize=2,
                color=colors.get(st, f"C{k + 3}"),
                label=st,
            )
            ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=2)
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [f"{la.get('label', la['module'])}\n({la['num_params']:,} params)" for la in layers],
            fontsize=7,
        )
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("‖F − K‖_F / ‖F‖_F  (↓)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        ax.set_title(f"Fisher fidelity vs the exact block, {title}", fontsize=9)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)


def write_figures(
    results: dict[str, Any],
    scores: dict[str, dict[str, dict[str, np.ndarray]]],
    directory: Path,
    step: Callable[[str], None] | None = None,
) -> list[str]:
    """Write every figure into ``directory / "figures"``; return their paths relative to it.

    Args:
        results: The results dict (as in results.json).
        scores: Seed-0 raw OOD scores ``{method: {"test" | ood_set: {score: array}}}``.
        directory: The report directory.
        step: Called with each figure's name before it is drawn (progress).
    """
    fig_dir = directory / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def out(name: str) -> Path:
        if step is not None:
            step(f"figure {name}")
        written.append(f"figures/{name}")
        return fig_dir / name

    reliability_figure(results, out("reliability.png"))
    if results["angles"]:
        shift_figure(results, out("shift.png"))
    for ood_set in results["ood_sets"]:
        ood_histogram_figure(results, scores, ood_set, out(f"ood_{ood_set}.png"))
        roc_figure(results, scores, ood_set, out(f"roc_{ood_set}.png"))
    if marglik_methods(results):
        marglik_figure(results, out(MARGLIK_FIGURE))
    if results.get("prior_sweep"):
        sweep_figure(results, out("prior_sweep.png"))
    if results.get("fisher_fidelity"):
        fid = results["fisher_fidelity"]
        fidelity_figure(
            fid,
            out("fisher_fidelity.png"),
            f"{_title(results).split(' (')[0]}, seed 0, {fid.get('draws', 1)} subset(s) of "
            f"{fid['n_points']} of {fid.get('n_train', fid['n_points'])} training points",
        )
    return written
