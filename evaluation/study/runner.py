"""Run a study end to end: validate, train / load, fit, evaluate, write the report atomically."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from datasets import rotation_angles
from evaluation.study.checkpoints import get_map_model
from evaluation.study.config import StudyConfig, validate_config
from evaluation.study.data import plan_data
from evaluation.study.errors import StudyRunError
from evaluation.study.evaluate import evaluate_method
from evaluation.study.fidelity import fidelity_section
from evaluation.study.figures import write_figures
from evaluation.study.methods import METHODS, fit_method
from evaluation.study.outdir import STUDY_FILE, atomic_output, check_output_dir, study_stamp
from evaluation.study.report import render_report, write_json

__all__ = ["RESULTS_FORMAT", "prepare", "run_study"]

RESULTS_FORMAT = "bayes-kfoc-study-results"
QUICK_ANGLE_STEP = 45
QUICK_MI_SAMPLES = 8
_PACKAGES = (
    "torch",
    "numpy",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "seaborn",
    "pandas",
    "bayes-kfoc",
)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        root = Path(__file__).resolve().parents[2]

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()

        dirty = git("status", "--porcelain", "--untracked-files=no")
        out["git"] = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def prepare(config: StudyConfig) -> tuple[StudyConfig, Any]:
    """Every check that can fail on bad input, in order, before any training.

    Names (data set, model, methods, OOD sets), the output directory, then the data files
    (seed 0 is loaded here, so missing or corrupt files fail now).

    Returns:
        The validated config and the :class:`~evaluation.study.data.DataPlan`.
    """
    config = validate_config(config)
    check_output_dir(config)
    return config, plan_data(config)


def run_study(config: StudyConfig) -> Path:
    """Run the study described by ``config`` and return the report directory.

    Raises:
        StudyError: Bad input, before any long work.
        StudyRunError: A method produced invalid probabilities (names method, seed and step).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: StudyConfig) -> Path:
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    config, plan = prepare(config)
    methods = config.method_list
    mi_samples = min(config.mi_samples, QUICK_MI_SAMPLES) if config.quick else config.mi_samples
    angles: tuple[int, ...] = ()
    if plan.image:
        angles = rotation_angles(step=QUICK_ANGLE_STEP if config.quick else 15)
    notes = list(plan.notes)
    seeds_out: list[dict[str, Any]] = []
    scores0: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    model0 = splits0 = None
    warned: dict[str, list[int]] = {}
    seed_bar = tqdm(config.seed_list, desc="seeds", disable=not config.progress)
    for seed in seed_bar:
        data = plan.load(seed)
        seed_bar.set_postfix_str("MAP")
        map_model = get_map_model(config, data.splits, seed)
        if seed == 0:
            model0, splits0 = map_model.model, data.splits
        x_test, y_test = data.splits.test.tensors
        per_method: dict[str, Any] = {}
        method_bar = tqdm(methods, desc=f"seed {seed}", leave=False, disable=not config.progress)
        for name in method_bar:
            method_bar.set_postfix_str(name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fitted = fit_method(name, map_model.model, data.splits)
                except ValueError as err:
                    raise StudyRunError(f"method {name!r}, seed {seed}, fitting: {err}") from err
            for w in caught:
                seeds_seen = warned.setdefault(f"`{name}`: {w.message}", [])
                if seed not in seeds_seen:
                    seeds_seen.append(seed)
            start = time.perf_counter()
            ev = evaluate_method(
                fitted,
                seed,
                (x_test, y_test),
                data.ood,
                angles,
                data.splits.image_shape,
                mi_samples,
            )
            per_method[name] = {
                "fit_seconds": fitted.fit_seconds,
                "tune_seconds": fitted.tune_seconds,
                "eval_seconds": time.perf_counter() - start,
                "hyperparameters": fitted.hyperparameters,
                **ev.to_json(),
            }
            if seed == 0:
                scores0[name] = ev.scores
        seeds_out.append(
            {
                "seed": seed,
                "map": {
                    "seconds": map_model.seconds,
                    "cached": map_model.cached,
                    "checkpoint": str(map_model.path) if map_model.path else "",
                },
                "data": {
                    "n_train": len(data.splits.train),
                    "n_val": len(data.splits.val),
                    "n_test": len(data.splits.test),
                    "num_classes": data.splits.num_classes,
                    "n_ood": {k: len(v) for k, v in data.ood.items()},
                },
                "methods": per_method,
            }
        )
        acc = per_method[methods[0]]["in_distribution"]["accuracy"]
        seed_bar.set_postfix_str(f"{methods[0]} acc {acc:.3f}")
    assert model0 is not None and splits0 is not None
    for text, seen in warned.items():
        notes.append(f"{text} (seed{'s' if len(seen) > 1 else ''} {', '.join(map(str, seen))}).")

    fidelity, skip_note = fidelity_section(model0, splits0, quick=config.quick)
    if skip_note:
        notes.append(skip_note)
    if config.quick:
        notes.append(
            f"--quick: rotation every {QUICK_ANGLE_STEP}°, {mi_samples} MI samples"
            + ("" if skip_note else ", Fisher fidelity on the first 256 training points")
            + "; a smoke configuration, not a result."
        )
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "fingerprint": config.fingerprint(),
        "config": config.to_json(),
        "versions": _versions(),
        "environment": {
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count() or 0,
            "platform": platform.platform(),
            "argv": sys.argv,
        },
        "started_at": started.isoformat(timespec="seconds"),
        "methods": list(methods),
        "method_descriptions": {m: METHODS[m].description for m in methods},
        "ood_sets": list(plan.ood_sets),
        "angles": list(angles),
        "mi_samples": mi_samples,
        "notes": notes,
        "seeds": seeds_out,
        "fisher_fidelity": fidelity,
        "figures": [],
        "timings": {},
    }
    with atomic_output(config.out) as tmp:
        fig_start = time.perf_counter()
        results["figures"] = write_figures(results, scores0, tmp)
        results["timings"] = {
            "figures_seconds": time.perf_counter() - fig_start,
            "total_seconds": time.perf_counter() - t0,
        }
        results["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_json(results, tmp / "results.json")
        (tmp / "report.md").write_text(render_report(results))
        write_json(study_stamp(config), tmp / STUDY_FILE)
    return config.out
