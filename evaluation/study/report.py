"""``results.json`` (every number, per seed) and ``report.md`` (tables over seeds).

``report.md`` is rendered from the results dict alone, so it can be rebuilt from
``results.json``. ``results.json`` is written with ``allow_nan=False`` after a walk that names the
first non-finite entry: a NaN never reaches a report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evaluation.study.errors import StudyRunError
from evaluation.study.figures import SCORE_LABELS
from evaluation.study.marglik_report import marglik_section
from evaluation.study.sweep_report import sweep_section
from evaluation.study.tables import Column, format_geometric, format_mean_std, markdown_table

__all__ = ["check_finite", "render_report", "write_json"]

IN_DIST_COLUMNS = (
    Column("accuracy", "acc", "max"),
    Column("nll", "NLL", "min"),
    Column("brier", "Brier", "min"),
    Column("ece", "ECE", "min"),
    Column("mce", "MCE", "min"),
    Column("adaptive_ece", "adaptive ECE", "min"),
)
SHIFT_COLUMNS = (
    Column("accuracy", "acc", "max"),
    Column("nll", "NLL", "min"),
    Column("brier", "Brier", "min"),
    Column("ece", "ECE", "min"),
)
OOD_COLUMNS = (
    Column("auroc", "AUROC", "max"),
    Column("aupr_in", "AUPR-in", "max"),
    Column("aupr_out", "AUPR-out", "max"),
    Column("fpr95", "FPR@95", "min"),
)
SCORE_SHORT = {
    "max_prob": "maxprob",
    "entropy": "entropy",
    "mutual_info": "MI",
    "energy": "energy",
    "max_logit": "max-logit",
}
PREFERRED_ANGLES = (30, 60, 90, 180)
HYPERPARAMETER_ROWS = {
    "temperature": "T (mean ± sd)",
    "prior_scale": "prior scale s of τ_b = s·P_b/‖θ_b‖² (geometric mean ×/÷ sd)",
    "prior_precision": "prior precision τ, geometric mean over blocks (geometric mean ×/÷ sd)",
}
"""The chosen hyperparameters the report shows, in order (T arithmetic, scales geometric)."""


def check_finite(obj: Any, path: str = "results") -> None:
    """Raise :class:`StudyRunError` naming the first NaN/Inf number in a JSON-ready tree."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int | float):
        if not math.isfinite(obj):
            raise StudyRunError(f"non-finite number {obj!r} at {path}; refusing to write it")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{path}.{k}")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_finite(v, f"{path}[{i}]")
        return
    raise StudyRunError(f"unexpected {type(obj).__name__} at {path} in the results")


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON after :func:`check_finite`."""
    check_finite(obj)
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")


def _cells(
    results: dict[str, Any], section: str, keys: tuple[Column, ...]
) -> dict[tuple[str, str], list[float]]:
    cells: dict[tuple[str, str], list[float]] = {}
    for m in results["methods"]:
        for c in keys:
            cells[(m, c.key)] = [s["methods"][m][section][c.key] for s in results["seeds"]]
    return cells


def _selected_angles(angles: list[int]) -> list[int]:
    chosen = [a for a in PREFERRED_ANGLES if a in angles]
    if len(chosen) >= 2:
        return chosen
    nonzero = [a for a in angles if a != 0]
    if len(nonzero) <= 4:
        return nonzero
    idx = [round(i * (len(nonzero) - 1) / 3) for i in range(4)]
    return [nonzero[i] for i in sorted(set(idx))]


def _shift_section(results: dict[str, Any]) -> list[str]:
    angles: list[int] = results["angles"]
    methods = results["methods"]
    seeds = results["seeds"]
    lines = [
        "## Rotation shift",
        "",
        f"Test images rotated by {', '.join(f'{a}°' for a in angles)} (bilinear, zero padding).",
        "",
        f"### Mean over the {len(angles)} angles",
        "",
    ]
    cells = {
        (m, c.key): [sum(s["methods"][m]["shift"][c.key]) / len(angles) for s in seeds]
        for m in methods
        for c in SHIFT_COLUMNS
    }
    lines += [markdown_table(methods, SHIFT_COLUMNS, cells), ""]
    chosen = _selected_angles(angles)
    for metric, label, better in (
        ("nll", "NLL", "min"),
        ("ece", "ECE", "min"),
        ("accuracy", "Accuracy", "max"),
    ):
        cols = tuple(Column(str(a), f"{a}°", better) for a in chosen)
        cells = {
            (m, str(a)): [s["methods"][m]["shift"][metric][angles.index(a)] for s in seeds]
            for m in methods
            for a in chosen
        }
        lines += [f"### {label} at selected angles", "", markdown_table(methods, cols, cells), ""]
    lines += ["![NLL, ECE and accuracy against the rotation angle](figures/shift.png)", ""]
    return lines


def _ood_section(results: dict[str, Any]) -> list[str]:
    methods = results["methods"]
    seeds = results["seeds"]
    sets: list[str] = results["ood_sets"]
    lines = [
        "## OOD detection",
        "",
        "In-distribution = the test split (positives for AUROC / AUPR-in / FPR@95%TPR). Scores "
        "(larger = more in-distribution): maxprob = max predicted probability, entropy = − "
        f"predictive entropy, MI = − mutual information ({results['mi_samples']} GLM samples; "
        "Bayesian methods only), energy = − energy = logsumexp of the logits (energy "
        "temperature 1), max-logit = the largest logit. The logits are the network's for `map`, "
        "divided by the fitted T for `temp`, and for the Laplace methods the mean of the "
        "tempered GLM logits, which is the MAP's logits divided by the method's T: energy and "
        "max-logit do not see the posterior's variance (a Laplace method's max-logit AUROC "
        "equals the MAP's), only its temperature.",
        "",
        "### AUROC by score",
        "",
    ]
    for sc in SCORE_LABELS:
        present = [m for m in methods if sc in seeds[0]["methods"][m]["ood"][sets[0]]]
        if not present:
            continue
        cols = tuple(Column(o, o, "max") for o in sets)
        cells = {
            (m, o): [s["methods"][m]["ood"][o][sc]["auroc"] for s in seeds]
            for m in present
            for o in sets
        }
        lines += [
            f"#### {SCORE_SHORT[sc]} ({SCORE_LABELS[sc]})",
            "",
            markdown_table(present, cols, cells),
            "",
        ]
    for o in sets:
        rows: list[str] = []
        cells = {}
        for m in methods:
            for sc in SCORE_LABELS:
                if sc not in seeds[0]["methods"][m]["ood"][o]:
                    continue
                row = f"{m} ({SCORE_SHORT[sc]})"
                rows.append(row)
                for c in OOD_COLUMNS:
                    cells[(row, c.key)] = [s["methods"][m]["ood"][o][sc][c.key] for s in seeds]
        n_out = seeds[0]["data"]["n_ood"][o]
        lines += [
            f"### {o} ({n_out} inputs)",
            "",
            markdown_table(rows, OOD_COLUMNS, cells, first="method (score)"),
            "",
            f"![OOD score histograms, {o}](figures/ood_{o}.png)",
            f"![ROC curves, {o}](figures/roc_{o}.png)",
            "",
        ]
    return lines


def _fidelity_section(results: dict[str, Any]) -> list[str]:
    fid = results.get("fisher_fidelity")
    lines = ["## Fisher fidelity (seed 0)", ""]
    if not fid:
        return [*lines, "Not computed; see the notes.", ""]
    draws = fid.get("draws", 1)
    n_train = fid.get("n_train", fid["n_points"])
    lines += [
        f"Relative Frobenius error ‖F − K‖_F / ‖F‖_F of each structure against the exact "
        f"(type-2) Fisher block of the seed-0 network, float64, matrix-free "
        f"(`bayes_kfoc.diagnostics.fisher_fidelity`), on {draws} random subset(s) of "
        f"{fid['n_points']} of the {n_train} training points: mean ± sd over the subsets "
        "(each structure is fitted to the subset it is compared on). Lowest per layer in bold "
        "(none on a tie); the certificate is K-FOC's `sqrt(1 − σ₁²/‖F‖²)`.",
        "",
        "| layer | params | diag ↓ | K-FAC ↓ | K-FOC ↓ | K-FOC certificate |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for layer in fid["layers"]:
        errs = layer["errors"]
        sds = layer.get("errors_sd", {})
        shown = {s: round(v, 4) for s, v in errs.items()}
        best = min(shown.values())
        unique = list(shown.values()).count(best) == 1
        vals = []
        for s in ("diag", "kfac", "kfoc"):
            text = f"{errs[s]:.4f}" + (f" ± {sds[s]:.4f}" if s in sds and draws > 1 else "")
            vals.append(f"**{text}**" if unique and shown[s] == best else text)
        cert = layer.get("kfoc_certificate")
        cert_text = f"{cert:.4f}" if cert is not None else "–"
        name = layer.get("label", layer["module"])
        lines.append(f"| {name} | {layer['num_params']:,} | {' | '.join(vals)} | {cert_text} |")
    lines += ["", "![Per-layer Fisher fidelity](figures/fisher_fidelity.png)", ""]
    return lines


def _convergence_section(results: dict[str, Any]) -> list[str]:
    """K-FOC's solver record per method and block (seed 0; all seeds in results.json)."""
    rows = []
    for m in results["methods"]:
        record = results["seeds"][0]["methods"][m].get("convergence")
        for block, info in (record or {}).items():
            rows.append((m, block, info))
    if not rows:
        return []
    keys = sorted({k for _, _, info in rows for k in info})
    lines = [
        "## K-FOC convergence (seed 0)",
        "",
        "The solver's record per block (`Curvature.convergence()`); every seed is in "
        "`results.json` under `methods.<name>.convergence`.",
        "",
        "| method | block | " + " | ".join(keys) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for m, block, info in rows:
        cells = []
        for k in keys:
            v = info.get(k, "–")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {m} | {block} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _timing_section(results: dict[str, Any]) -> list[str]:
    methods = results["methods"]
    seeds = results["seeds"]
    cols = (
        Column("fit_seconds", "fit [s]", None, 2),
        Column("tune_seconds", "tuning [s]", None, 2),
        Column("predict_seconds", "test prediction [s]", None, 3),
        Column("eval_seconds", "full evaluation [s]", None, 1),
    )
    cells = {(m, c.key): [s["methods"][m][c.key] for s in seeds] for m in methods for c in cols}
    lines = [
        "## Timings and chosen hyperparameters",
        "",
        markdown_table(methods, cols, cells),
        "",
        "| method | hyperparameter | value over seeds |",
        "| --- | --- | ---: |",
    ]
    for m in methods:
        hps = [s["methods"][m]["hyperparameters"] for s in seeds]
        for k, label in HYPERPARAMETER_ROWS.items():
            vals = [hp[k] for hp in hps if k in hp]
            if not vals:
                continue
            text = format_mean_std(vals, 3) if k == "temperature" else format_geometric(vals, 3)
            if len(vals) < len(seeds):
                text += f" ({len(vals)} of {len(seeds)} seeds)"
            lines.append(f"| {m} | {label} | {text} |")
    train = [s["map"]["seconds"] for s in seeds]
    cached = sum(bool(s["map"]["cached"]) for s in seeds)
    lines += [
        "",
        f"MAP networks: {len(seeds) - cached} trained, {cached} loaded from the cache "
        f"(train/load time {format_mean_std(train, 2)} s per seed). Whole run: "
        f"{results['timings']['total_seconds']:.1f} s wall on {results['environment']['threads']}"
        " torch thread(s).",
        "",
    ]
    return lines


def render_report(results: dict[str, Any]) -> str:
    """The markdown report of a results dict."""
    cfg = results["config"]
    methods = results["methods"]
    n = len(results["seeds"])
    v = results["versions"]
    lines = [
        f"# Calibration study: {cfg['dataset']}, {cfg['model']}",
        "",
        f"{n} seed{'s' if n > 1 else ''} (values are mean ± sample sd over seeds; the best mean "
        "per column in **bold** when it is unique at the shown precision, ↑ higher is better, "
        "↓ lower is better). Every number is in `results.json`.",
        "",
        "## Configuration",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for k in (
        "dataset",
        "model",
        "expanded",
        "seeds",
        "epochs",
        "lr",
        "weight_decay",
        "batch_size",
        "quick",
    ):
        val = cfg[k]
        val = ", ".join(map(str, val)) if isinstance(val, list) else val
        lines.append(f"| {'methods' if k == 'expanded' else k} | {val} |")
    lines += [
        f"| MI samples | {results['mi_samples']} |",
        f"| OOD sets | {', '.join(results['ood_sets']) or '–'} |",
        f"| fingerprint | `{results['fingerprint']}` |",
        f"| started | {results['started_at']} |",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Methods:",
        "",
    ]
    lines += [f"- `{m}`: {results['method_descriptions'][m]}" for m in methods]
    lines.append("")
    if results["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in results["notes"]), ""]
    lines += [
        "## In distribution (test split)",
        "",
        markdown_table(
            methods, IN_DIST_COLUMNS, _cells(results, "in_distribution", IN_DIST_COLUMNS)
        ),
        "",
        "ECE / MCE: 15 equal-width bins, per seed, then averaged over seeds (the reliability "
        "figure pools the bins of all seeds but quotes this same per-seed mean); adaptive ECE: "
        "15 equal-mass bins; NLL in nats. MCE is the worst bin and is driven by sparse bins: "
        "see the per-bin counts under each diagram.",
        "",
        "![Reliability diagrams](figures/reliability.png)",
        "",
    ]
    if results["angles"]:
        lines += _shift_section(results)
    else:
        lines += ["## Rotation shift", "", "Not applicable (tabular data); see the notes.", ""]
    if results["ood_sets"]:
        lines += _ood_section(results)
    else:
        lines += ["## OOD detection", "", "No OOD sets; see the notes.", ""]
    lines += marglik_section(results)
    lines += sweep_section(results)
    lines += _fidelity_section(results)
    lines += _convergence_section(results)
    lines += _timing_section(results)
    lines += ["## Figures", "", *(f"- [{f}]({f})" for f in results["figures"]), ""]
    return "\n".join(lines)
