"""Run a study end to end: validate, train / load, fit, evaluate, write the report atomically."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
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
from torch import Tensor

from datasets import rotation_angles
from evaluation.study.checkpoints import get_map_model
from evaluation.study.config import StudyConfig, validate_config
from evaluation.study.data import plan_data
from evaluation.study.errors import StudyRunError
from evaluation.study.evaluate import evaluate_method, rotated_inputs, seeded_subset
from evaluation.study.fidelity import fidelity_section
from evaluation.study.figures import write_figures
from evaluation.study.methods import METHODS, FitOptions, fit_method
from evaluation.study.outdir import atomic_output, check_output_dir, study_stamp
from evaluation.study.progress import Progress
from evaluation.study.report import render_report, write_json
from evaluation.study.sweep import PriorSweep, sweep_structures

__all__ = ["RESULTS_FORMAT", "prepare", "run_study"]

RESULTS_FORMAT = "bayes-kfoc-study-results"
QUICK_ANGLE_STEP = 45
QUICK_MI_SAMPLES = 8
QUICK_FIDELITY_POINTS = 256
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

    Names (data set, model, methods, OOD sets), then the data files (seed 0 is loaded here, so
    missing or corrupt files fail now, and its content hash joins the fingerprint), then the
    output directory (which must be empty, this tool's report of the same study, or
    ``--overwrite``).

    Returns:
        The validated config and the :class:`~evaluation.study.data.DataPlan`.
    """
    config = validate_config(config)
    plan = plan_data(config)
    check_output_dir(config)
    return config, plan


def run_study(config: StudyConfig) -> Path:
    """Run the study described by ``config`` and return the report directory.

    Raises:
        StudyError: Bad input, before any long work.
        StudyRunError: A method produced invalid probabilities (names method, seed and step).
    """
    config = validate_config(config)  # e.g. --threads 0: a one-line error, not a traceback
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(previous_threads)


def _angles(config: StudyConfig, image: bool) -> tuple[int, ...]:
    if not image or not config.runs("shift"):
        return ()
    if config.angles is not None:
        return tuple(config.angles)
    return rotation_angles(step=QUICK_ANGLE_STEP if config.quick else 15)


def _subset(x: Tensor, size: int | None, seed: int) -> Tensor:
    idx = seeded_subset(len(x), size, seed)
    return x if idx is None else x[idx]


def _prefixed_step(show: Progress, prefix: str, what: str) -> None:
    show.step(prefix + what)


def _refit(
    structure: str, model: torch.nn.Module, splits: Any, options: FitOptions, show: Progress
) -> Any:
    """A tuned all-weights posterior of ``structure`` (the sweep of a last-layer-only request)."""
    show.step(f"{structure}: fitting on all weights for the sweep")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already reported for the methods the study ran
        fitted = fit_method(structure, model, splits, options)
    assert fitted.posterior is not None
    return fitted.posterior


def _run(config: StudyConfig) -> Path:
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    show = Progress(config.progress)
    show.line(f"study: checking the configuration and loading {config.dataset} (seed 0)")
    config, plan = prepare(config)
    methods = config.method_list
    mi_samples = min(config.mi_samples, QUICK_MI_SAMPLES) if config.quick else config.mi_samples
    angles = _angles(config, plan.image)
    options = FitOptions(
        tau_grid=tuple(config.tau_grid),
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
    )
    notes = list(plan.notes)
    if not config.runs("shift") and plan.image:
        notes.append("Rotation shift skipped (--no-shift).")
    if not config.runs("ood"):
        notes.append("OOD detection skipped (--no-ood).")
    seeds_out: list[dict[str, Any]] = []
    scores0: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    model0 = splits0 = None
    warned: dict[str, list[int]] = {}
    swept = sweep_structures(methods) if config.runs("sweep") else ()
    sweep: PriorSweep | None = None
    for seed in show.bar(config.seed_list, "seeds"):
        data = plan.load(seed)
        map_model = get_map_model(config, data.splits, seed, show)
        if seed == 0:
            model0, splits0 = map_model.model, data.splits
        x_test, y_test = data.splits.test.tensors
        idx = seeded_subset(len(x_test), config.shift_points, seed)
        shift_x, shift_y = (x_test, y_test) if idx is None else (x_test[idx], y_test[idx])
        shift = (rotated_inputs(shift_x, angles, data.splits.image_shape), shift_y)
        ood = (
            {k: _subset(v, config.ood_points, seed) for k, v in data.ood.items()}
            if config.runs("ood")
            else {}
        )
        if seed == 0 and swept:
            sweep = PriorSweep(swept, map_model.model, (x_test, y_test), ood)
        per_method: dict[str, Any] = {}
        for name in show.bar(methods, f"seed {seed}", leave=False):
            show.step(f"{name}: fitting")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    seeded = dataclasses.replace(options, seed=seed)
                    fitted = fit_method(name, map_model.model, data.splits, seeded)
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
                ood,
                angles,
                data.splits.image_shape,
                mi_samples,
                shift=shift,
                step=lambda what, name=name: show.step(f"{name}: {what}"),
            )
            per_method[name] = {
                "fit_seconds": fitted.fit_seconds,
                "tune_seconds": fitted.tune_seconds,
                "eval_seconds": time.perf_counter() - start,
                "hyperparameters": fitted.hyperparameters,
                **ev.to_json(),
            }
            if fitted.convergence is not None:
                per_method[name]["convergence"] = fitted.convergence
            if fitted.marglik is not None:
                per_method[name]["marglik"] = fitted.marglik
            if seed == 0:
                scores0[name] = ev.scores
                if sweep is not None and name in swept and fitted.posterior is not None:
                    step = functools.partial(_prefixed_step, show, f"{name}: sweep, ")
                    sweep.add(name, fitted.posterior, step=step)
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
                    "n_shift": len(shift_y) if angles else 0,
                    "num_classes": data.splits.num_classes,
                    "n_ood": {k: len(v) for k, v in ood.items()},
                },
                "methods": per_method,
            }
        )
        acc = per_method[methods[0]]["in_distribution"]["accuracy"]
        show.line(f"seed {seed} done: {methods[0]} accuracy {acc:.3f}")
    assert model0 is not None and splits0 is not None
    for text, seen in warned.items():
        notes.append(f"{text} (seed{'s' if len(seen) > 1 else ''} {', '.join(map(str, seen))}).")
    if config.shift_points is not None and angles:
        notes.append(f"Rotation shift on a seeded subset of {config.shift_points} test points.")
    if config.ood_points is not None and config.runs("ood"):
        notes.append(f"OOD sets subsampled to at most {config.ood_points} points (seeded).")

    prior_sweep: dict[str, Any] | None = None
    if sweep is not None:
        show.line("matched-prior sweep of the seed-0 network")
        prior_sweep = sweep.finish(
            lambda structure: _refit(structure, model0, splits0, options, show), step=show.step
        )
    elif sweep_structures(methods):
        notes.append("Matched-prior sweep of diag / K-FAC / K-FOC skipped (--no-sweep).")

    fidelity: dict[str, Any] | None = None
    if config.runs("fidelity"):
        show.line("Fisher fidelity of the seed-0 network")
        fidelity, skip_note = fidelity_section(
            model0,
            splits0,
            points=QUICK_FIDELITY_POINTS if config.quick else config.fidelity_points,
            draws=config.fidelity_draws,
            step=show.line,
        )
        if skip_note:
            notes.append(skip_note)
    else:
        notes.append("Fisher fidelity skipped (--no-fidelity).")
    if config.quick:
        notes.append(
            f"--quick: rotation every {QUICK_ANGLE_STEP}°, {mi_samples} MI samples, Fisher "
            f"fidelity on {QUICK_FIDELITY_POINTS} training points; a smoke configuration, not a "
            "result."
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
        "tau_grid": list(config.tau_grid),
        "notes": notes,
        "seeds": seeds_out,
        "fisher_fidelity": fidelity,
        "prior_sweep": prior_sweep,
        "figures": [],
        "timings": {},
    }
    with atomic_output(config.out, study_stamp(config)) as tmp:
        fig_start = time.perf_counter()
        show.line("writing the figures and the report")
        results["figures"] = write_figures(results, scores0, tmp, step=show.step)
        results["timings"] = {
            "figures_seconds": time.perf_counter() - fig_start,
            "total_seconds": time.perf_counter() - t0,
        }
        results["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_json(results, tmp / "results.json")
        (tmp / "report.md").write_text(render_report(results))
    return config.out
