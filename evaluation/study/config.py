"""The study's configuration, validated before any data is read or any network trained."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import available_datasets, available_ood
from evaluation.models import MODELS
from evaluation.study.errors import StudyError
from evaluation.study.methods import (
    METHODS,
    SUBSETS,
    expand_methods,
    laplace_torch_available,
)

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_TAU_RANGE",
    "FILE_DATASETS",
    "PARTS",
    "StudyConfig",
    "default_threads",
    "validate_config",
]

DEFAULT_METHODS: tuple[str, ...] = ("map", "temp", "diag", "kfac", "kfoc")
FILE_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "kmnist", "cifar10", "svhn")
"""Data sets read from local files (``--data-dir``); everything else is bundled."""

DEFAULT_TAU_RANGE: tuple[float, float, int] = (1e-2, 1e5, 29)
"""Prior-precision grid: ``(lowest, highest, points)``, log-spaced (the library's default grid)."""
PARTS: tuple[str, ...] = ("shift", "ood", "fidelity", "sweep")
"""Parts of the study that ``--no-<part>`` skips."""

# Fields that do not change the numbers of a study (they are left out of its fingerprint).
_NOT_FINGERPRINTED = frozenset(
    {"out", "cache_dir", "overwrite", "progress", "threads", "use_cache", "data_dir"}
)


def default_threads() -> int:
    """The CPU cores this process may use (``--threads`` default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines one study run.

    Attributes:
        dataset: In-distribution data set (see :func:`datasets.available_datasets`).
        model: ``"mlp"`` or ``"cnn"``.
        methods: Requested method names (base Laplace names expand to both subsets).
        subsets: Subsets a base Laplace name expands to: ``"all"`` and/or ``"last_layer"``.
        seeds: Number of seeds; seed ``s`` in ``0..seeds-1`` sets the split, the network's
            initialisation and the training order.
        epochs: MAP training epochs (Adam, ``lr``, ``weight_decay``, ``batch_size``).
        ood: OOD set names, or ``None`` for the data set's default list.
        out: Output directory of the report.
        cache_dir: MAP checkpoint cache (default: ``<out>/../.cache``).
        data_dir: Directory with local data files (file-based data sets).
        overwrite: Replace an output directory that holds a different study.
        quick: Small configuration for tests: coarse rotation grid, fewer MI samples,
            Fisher fidelity on 256 training points.
        threads: ``torch.set_num_threads`` for the run (default: every core available).
        mi_samples: Predictive samples per input for mutual information.
        use_cache: Read and write MAP checkpoints.
        progress: Show progress bars.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (on the mean loss).
        batch_size: Training batch size.
        tau_range: Prior-precision grid ``(lowest, highest, points)``, log-spaced, searched on
            the validation NLL (then refined between the best point's neighbours).
        angles: Rotation angles in degrees, or ``None`` for ``0, 15, ..., 180`` (every 45° with
            ``quick``).
        skip: Parts left out, from :data:`PARTS`.
        shift_points: Test points evaluated under rotation (a seeded subset), ``None`` for all.
        ood_points: Points per OOD set (and of the test split as its in-distribution side), a
            seeded subset, ``None`` for all.
        fidelity_points: Training points of the Fisher-fidelity estimate (a seeded subset).
        fidelity_draws: Independent subsets for the fidelity estimate's error bar.
        expanded: The expanded method names (set by :func:`validate_config`).
        data_digest: Content hash of the data (every split and OOD set of seed 0, set by
            :func:`evaluation.study.data.plan_data`); part of the fingerprint, so a study on other
            data is a different study.
    """

    dataset: str = "digits"
    model: str = "mlp"
    methods: tuple[str, ...] = DEFAULT_METHODS
    subsets: tuple[str, ...] = SUBSETS
    seeds: int = 3
    epochs: int = 100
    ood: tuple[str, ...] | None = None
    out: Path = Path("reports/digits")
    cache_dir: Path | None = None
    data_dir: Path | None = None
    overwrite: bool = False
    quick: bool = False
    threads: int = field(default_factory=default_threads)
    mi_samples: int = 30
    use_cache: bool = True
    progress: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    tau_range: tuple[float, float, int] = DEFAULT_TAU_RANGE
    angles: tuple[int, ...] | None = None
    skip: tuple[str, ...] = ()
    shift_points: int | None = None
    ood_points: int | None = None
    fidelity_points: int = 2000
    fidelity_draws: int = 3
    expanded: tuple[str, ...] = field(default=(), init=False)
    data_digest: str = field(default="", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))

    @property
    def checkpoint_dir(self) -> Path:
        """Where MAP checkpoints are cached."""
        if self.cache_dir is not None:
            return self.cache_dir
        return self.out.resolve().parent / ".cache"

    @property
    def tau_grid(self) -> list[float]:
        """The log-spaced prior-precision grid of :attr:`tau_range`."""
        lo, hi, n = self.tau_range
        if n == 1:
            return [float(lo)]
        step = (math.log10(hi) - math.log10(lo)) / (n - 1)
        return [10 ** (math.log10(lo) + i * step) for i in range(n)]

    def runs(self, part: str) -> bool:
        """Whether the part ``part`` (see :data:`PARTS`) is evaluated."""
        return part not in self.skip

    @property
    def seed_list(self) -> list[int]:
        """The seeds ``0..seeds-1``."""
        return list(range(self.seeds))

    @property
    def method_list(self) -> tuple[str, ...]:
        """The expanded registry names, in report order."""
        return self.expanded or expand_methods(self.methods, self.subsets)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (paths as strings)."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        out["expanded"] = list(self.method_list)
        return out

    def fingerprint(self) -> str:
        """A hash of the fields that determine the study's numbers (not paths or display).

        It covers the data's content through :attr:`data_digest` once the data is planned.
        """
        key = {k: v for k, v in self.to_json().items() if k not in _NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _check_names(kind: str, given: tuple[str, ...] | list[str], valid: tuple[str, ...]) -> None:
    bad = [g for g in given if g not in valid]
    if bad:
        raise StudyError(
            f"unknown {kind} {', '.join(map(repr, bad))}; valid {kind}s: " + ", ".join(valid)
        )


def validate_config(config: StudyConfig) -> StudyConfig:
    """Check every name and number of ``config``; return it with the methods expanded.

    Raises:
        StudyError: Naming the bad value and listing the valid ones.
    """
    _check_names("dataset", [config.dataset], available_datasets())
    _check_names("model", [config.model], MODELS)
    if not config.methods:
        raise StudyError("no methods given; valid methods: " + ", ".join(METHODS))
    try:
        expanded = expand_methods(config.methods, config.subsets)
    except ValueError as err:
        raise StudyError(str(err)) from None
    needs_peer = [m for m in expanded if METHODS[m].optional]
    if needs_peer and not laplace_torch_available():
        raise StudyError(
            f"method(s) {', '.join(needs_peer)} need the optional package laplace-torch "
            "(module 'laplace'), which is not importable here; drop them or install it."
        )
    if config.ood is not None:
        _check_names("OOD set", list(config.ood), available_ood())
    for name, value, low in [
        ("--seeds", config.seeds, 1),
        ("--epochs", config.epochs, 1),
        ("--threads", config.threads, 1),
        ("--mi-samples", config.mi_samples, 2),
        ("--batch-size", config.batch_size, 1),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StudyError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, opt, low in [
        ("--shift-points", config.shift_points, 1),
        ("--ood-points", config.ood_points, 1),
        ("--fidelity-points", config.fidelity_points, 2),
        ("--fidelity-draws", config.fidelity_draws, 1),
    ]:
        if opt is not None and (isinstance(opt, bool) or not isinstance(opt, int) or opt < low):
            raise StudyError(f"{name} must be an integer >= {low}, got {opt!r}")
    _check_names("part", list(config.skip), PARTS)
    lo, hi, n = config.tau_range
    if not (0 < lo <= hi and math.isfinite(hi) and isinstance(n, int) and n >= 1):
        raise StudyError(
            f"--tau-range needs 0 < lowest <= highest and an integer number of points >= 1, got "
            f"{lo!r},{hi!r},{n!r} (e.g. --tau-range 1e-2,1e5,29)"
        )
    if config.angles is not None:
        bad = [a for a in config.angles if isinstance(a, bool) or not isinstance(a, int)]
        if bad or not config.angles or not all(-360 <= a <= 360 for a in config.angles):
            raise StudyError(
                f"--angles needs integers in [-360, 360] degrees, e.g. 0,30,90; got {config.angles}"
            )
    if not (config.lr > 0 and config.weight_decay >= 0):
        raise StudyError(
            f"need lr > 0 and weight_decay >= 0, got {config.lr}, {config.weight_decay}"
        )
    if config.dataset in FILE_DATASETS and config.data_dir is None:
        raise StudyError(
            f"data set {config.dataset!r} is read from local files and never downloaded; pass "
            "--data-dir <directory holding its files>"
        )
    if config.data_dir is not None and not config.data_dir.is_dir():
        raise StudyError(f"--data-dir '{config.data_dir}' does not exist or is not a directory")
    object.__setattr__(config, "expanded", expanded)
    return config
