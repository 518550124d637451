"""The matched-prior sweep in the report: its markdown section and ``prior_sweep.png``.

Both read ``results["prior_sweep"]`` (see :class:`evaluation.study.sweep.PriorSweep`) alone, so
they can be rebuilt from ``results.json``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import seaborn as sns

__all__ = ["SWEEP_METRICS", "largest_differences", "sweep_figure", "sweep_section"]

SWEEP_METRICS: dict[str, tuple[str, str]] = {
    "nll": ("test NLL", "min"),
    "ece": ("test ECE", "min"),
    "auroc": ("AUROC, − entropy", "max"),
}
"""Metric key → (label, which way is better)."""
NAMES = {"diag": "diag", "kfac": "K-FAC", "kfoc": "K-FOC"}
COLORS = {"diag": "C0", "kfac": "C1", "kfoc": "C2"}
DPI = 110


def _metrics(sweep: dict[str, Any]) -> list[str]:
    return [k for k in SWEEP_METRICS if k != "auroc" or sweep["ood_set"] is not None]


def _fmt_s(s: float) -> str:
    return f"{s:.3g}"


def largest_differences(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """For each pair of structures and each metric: the largest ``|a − b|`` over the sweep, the
    scale where it occurs and its sign, and the difference at the scale where the pair's mean
    NLL is lowest.

    Returns:
        ``[{"a", "b", "metric", "max_abs", "at_scale", "value_a", "value_b", "diff",
        "best_scale", "diff_at_best"}]`` with ``diff = value_a − value_b`` at ``at_scale`` and
        ``diff_at_best`` the same difference at ``best_scale``, the scale of the lowest mean
        NLL of the pair.
    """
    curves = sweep["structures"]
    scales = sweep["scales"]
    out = []
    order = [s for s in ("kfoc", "kfac", "diag") if s in curves]
    for a, b in itertools.combinations(order, 2):
        mean_nll = [(x + y) / 2 for x, y in zip(curves[a]["nll"], curves[b]["nll"], strict=True)]
        best = min(range(len(scales)), key=mean_nll.__getitem__)
        for metric in _metrics(sweep):
            diffs = [x - y for x, y in zip(curves[a][metric], curves[b][metric], strict=True)]
            i = max(range(len(diffs)), key=lambda k: abs(diffs[k]))
            out.append(
                {
                    "a": a,
                    "b": b,
                    "metric": metric,
                    "max_abs": abs(diffs[i]),
                    "at_scale": scales[i],
                    "value_a": curves[a][metric][i],
                    "value_b": curves[b][metric][i],
                    "diff": diffs[i],
                    "diff_at_best": diffs[best],
                    "best_scale": scales[best],
                }
            )
    return out


def _finding(d: dict[str, Any]) -> str:
    label, better = SWEEP_METRICS[d["metric"]]
    a, b = NAMES[d["a"]], NAMES[d["b"]]
    at_best = (
        f"at the pair's best-NLL scale s = {_fmt_s(d['best_scale'])} the difference {a} − {b} "
        f"is {d['diff_at_best']:+.4f}"
    )
    if d["max_abs"] == 0:
        return f"{a} vs {b}, {label}: identical at every scale."
    winner = a if (d["diff"] < 0) == (better == "min") else b
    return (
        f"{a} vs {b}, {label}: largest |difference| {d['max_abs']:.4f} at s = "
        f"{_fmt_s(d['at_scale'])} ({d['value_a']:.4f} vs {d['value_b']:.4f}, {winner} better); "
        f"{at_best}."
    )


def _findings(sweep: dict[str, Any]) -> list[str]:
    diffs = largest_differences(sweep)
    if not diffs:
        only = ", ".join(NAMES.get(s, s) for s in sweep["structures"])
        return [
            f"Only {only} in this study: nothing to compare (add kfoc / kfac / diag to "
            "`--methods`).",
            "",
        ]
    return ["Largest differences over the sweep:", "", *(f"- {_finding(d)}" for d in diffs), ""]


def sweep_section(results: dict[str, Any]) -> list[str]:
    """The report's section ``Does curvature quality matter?`` (empty without a sweep)."""
    sweep = results.get("prior_sweep")
    if not sweep:
        return []
    curves = sweep["structures"]
    scales = sweep["scales"]
    metrics = _metrics(sweep)
    ood = sweep["ood_set"]
    ood_text = (
        f"AUROC of the − entropy score, the {sweep['n_test']} test points against the "
        f"{sweep['n_ood']} points of `{ood}`"
        if ood
        else "no AUROC (no OOD set in this study)"
    )
    refit = [NAMES[s] for s, c in curves.items() if c["refit"]]
    lines = [
        "## Does curvature quality matter? (matched priors, seed 0)",
        "",
        "Each structure's own tuning chooses its own prior scale and temperature, so the tables "
        "above compare posteriors at different priors. Here every structure's all-weights "
        f"posterior of the seed-0 network is evaluated at the same scaled priors "
        f"τ_b = s·P_b/‖θ*_b‖² for {len(scales)} log-spaced s from {_fmt_s(scales[0])} to "
        f"{_fmt_s(scales[-1])}, with T = 1 (GLM probit): test NLL, test ECE (15 bins) and "
        f"{ood_text}. The MAP (s → ∞) is the reference line; "
        "the circle marks each structure's tuned s (on its T = 1 curve), the star the tuned "
        "predictive itself (tuned s and T, the numbers of the tables above for seed 0)."
        + (f" Refitted on all weights for the sweep: {', '.join(refit)}." if refit else ""),
        "",
        "![Matched-prior sweep](figures/prior_sweep.png)",
        "",
        *_findings(sweep),
        "| structure | tuned s | tuned T | best sweep NLL (at s) | "
        + " | ".join(f"{SWEEP_METRICS[k][0]} at tuned s, T = 1" for k in metrics)
        + " | "
        + " | ".join(f"{SWEEP_METRICS[k][0]}, tuned" for k in metrics)
        + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * (2 * len(metrics)),
    ]
    for s, c in curves.items():
        ch, tu = c["chosen"], c["tuned"]
        i = min(range(len(scales)), key=c["nll"].__getitem__)
        cells = [
            NAMES[s],
            _fmt_s(ch["scale"]) if ch else "–",
            f"{ch['temperature']:.3f}" if ch else "–",
            f"{c['nll'][i]:.4f} ({_fmt_s(scales[i])})",
            *(f"{ch[k]:.4f}" if ch else "–" for k in metrics),
            *(f"{tu[k]:.4f}" for k in metrics),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m = sweep["map"]
    lines += [
        "",
        "MAP: " + ", ".join(f"{SWEEP_METRICS[k][0]} {m[k]:.4f}" for k in metrics) + ".",
        "",
        "<details><summary>Every point of the sweep</summary>",
        "",
        "| s | "
        + " | ".join(f"{SWEEP_METRICS[k][0]} {NAMES[s]}" for k in metrics for s in curves)
        + " |",
        "| ---: |" + " ---: |" * (len(metrics) * len(curves)),
    ]
    for i, sc in enumerate(scales):
        vals = [f"{curves[s][k][i]:.4f}" for k in metrics for s in curves]
        lines.append(f"| {_fmt_s(sc)} | " + " | ".join(vals) + " |")
    return [*lines, "", "</details>", ""]


def sweep_figure(results: dict[str, Any], path: Path) -> None:
    """One panel per metric against ``s`` (log axis), one line per structure, the MAP dashed, the
    tuned ``s`` (circle, ``T = 1``) and the tuned predictive (star) marked."""
    sweep = results["prior_sweep"]
    curves = sweep["structures"]
    scales = sweep["scales"]
    metrics = _metrics(sweep)
    cfg = results["config"]
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.7), squeeze=False)
        for ax, k in zip(axes[0], metrics, strict=True):
            label, better = SWEEP_METRICS[k]
            for s, c in curves.items():
                color = COLORS.get(s, "C4")
                ax.plot(scales, c[k], "-o", ms=3, lw=1.3, color=color, label=NAMES.get(s, s))
                if c["chosen"]:
                    x = c["chosen"]["scale"]
                    ax.plot(x, c["chosen"][k], "o", ms=9, mfc="none", mec=color, mew=1.5)
                    ax.plot(x, c["tuned"][k], "*", ms=10, color=color, mec="k", mew=0.4)
            ax.axhline(sweep["map"][k], color="0.4", ls="--", lw=1, label="MAP (s → ∞)")
            ax.set_xscale("log")
            if k != "auroc" and all(v > 0 for c in curves.values() for v in c[k]):
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(mticker.NullFormatter())
                label += " (log scale)"
            ax.set_xlabel("prior scale s  (τ_b = s·P_b/‖θ*_b‖², T = 1)")
            ax.set_ylabel(f"{label} {'↓' if better == 'min' else '↑'}")
            title = label.split(" (")[0]
            if k == "auroc":
                title = f"AUROC, test vs {sweep['ood_set']} (− entropy)"
            ax.set_title(title)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        handles += [
            plt.Line2D([], [], ls="none", marker="o", ms=8, mfc="none", mec="k"),
            plt.Line2D([], [], ls="none", marker="*", ms=9, color="0.6", mec="k", mew=0.4),
        ]
        labels += ["tuned s, T = 1", "tuned s and T"]
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
        n_ood = f", {sweep['n_ood']} {sweep['ood_set']} points" if sweep["ood_set"] else ""
        fig.suptitle(
            f"Matched priors: {cfg['dataset']} / {cfg['model']}, seed 0, all weights, "
            f"{sweep['n_test']} test points{n_ood}",
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0.07, 1, 0.97))
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
