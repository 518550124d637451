"""Splits and OOD sets per seed, and the look-up of local data files.

Local files (``--data-dir``): the in-distribution files are read from ``<data-dir>/<name>`` when
that folder exists (aliases such as ``MNIST``, ``fashion-mnist``, ``FashionMNIST`` are
accepted), else from ``<data-dir>`` itself. A file-based OOD set is looked for in
``<data-dir>/<name>`` and then in the sibling ``<data-dir>/../<name>``, so both
``data/{mnist,fashion_mnist,kmnist}`` with ``--data-dir data`` and ``--data-dir data/mnist``
work. A default OOD set whose folder is absent is skipped with a note in the report; one named
with ``--ood`` is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from datasets import DatasetFileError, Splits, load_dataset, load_ood
from evaluation.study.config import FILE_DATASETS, StudyConfig
from evaluation.study.digest import tensor_digest
from evaluation.study.errors import StudyError

__all__ = ["DataPlan", "SeedData", "default_ood", "plan_data"]

T = TypeVar("T")

GENERATED_OOD: tuple[str, ...] = ("uniform", "gaussian", "natural_patches")

_FILE_OOD: dict[str, tuple[str, ...]] = {
    "mnist": ("fashion_mnist", "kmnist"),
    "fashion_mnist": ("mnist", "kmnist"),
    "kmnist": ("mnist", "fashion_mnist"),
    "cifar10": ("svhn",),
    "svhn": ("cifar10",),
}

_ALIASES: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST", "Fashion-MNIST"),
    "kmnist": ("kmnist", "KMNIST"),
    "cifar10": ("cifar10", "cifar-10", "cifar-10-batches-bin", "CIFAR10"),
    "svhn": ("svhn", "SVHN"),
}


def default_ood(dataset: str, image: bool) -> tuple[str, ...]:
    """The OOD sets a data set is evaluated on when ``--ood`` is not given."""
    if not image:
        return ("uniform", "gaussian")
    if dataset == "digits04":
        return (*GENERATED_OOD, "digits59")
    return (*GENERATED_OOD, *_FILE_OOD.get(dataset, ()))


def _find_dir(root: Path, name: str, *, siblings: bool) -> Path | None:
    bases = [root, root.parent] if siblings else [root]
    for base in bases:
        for alias in _ALIASES.get(name, (name,)):
            if (base / alias).is_dir():
                return base / alias
    return None


@dataclass
class SeedData:
    """One seed's in-distribution splits and OOD inputs (shaped like the splits' inputs)."""

    seed: int
    splits: Splits
    ood: dict[str, torch.Tensor]


@dataclass
class DataPlan:
    """What the study reads for every seed, resolved (and loaded once for seed 0) up front.

    Attributes:
        dataset_dir: Directory of the in-distribution files (file-based data sets).
        ood_sets: OOD set names that will be evaluated.
        ood_dirs: Directory of each file-based OOD set.
        image: Whether the inputs are images (rotation shift and natural patches apply).
        notes: Human-readable notes for the report (skipped sets, ...).
    """

    config: StudyConfig
    dataset_dir: Path | None
    ood_sets: tuple[str, ...]
    ood_dirs: dict[str, Path]
    image: bool
    notes: list[str] = field(default_factory=list)
    _cache: dict[int, SeedData] = field(default_factory=dict)

    @property
    def flat(self) -> bool:
        return self.config.model == "mlp"

    def load(self, seed: int) -> SeedData:
        """Splits and OOD sets of ``seed`` (seed 0 is already loaded by :func:`plan_data`)."""
        if seed in self._cache:
            return self._cache.pop(seed)
        splits = _wrap(
            lambda: load_dataset(
                self.config.dataset, seed=seed, flat=self.flat, data_dir=self.dataset_dir
            )
        )
        ood = {
            name: _wrap(
                partial(load_ood, name, splits, seed=seed, data_dir=self.ood_dirs.get(name))
            )
            for name in self.ood_sets
        }
        return SeedData(seed, splits, ood)


def _wrap(load: Callable[[], T]) -> T:
    """Run a loader, turning missing/corrupt files into a :class:`StudyError`."""
    try:
        return load()
    except DatasetFileError as err:
        raise StudyError(str(err)) from None


def plan_data(config: StudyConfig) -> DataPlan:
    """Resolve directories and OOD sets, and load seed 0, so that bad input fails first.

    Sets ``config.data_digest`` (the content hash of seed 0's splits and OOD sets, which together
    hold every file read), so the study's fingerprint covers the data.

    Raises:
        StudyError: A file-based set whose files are missing (the message names them), a CNN on
            a tabular data set, or an OOD set that cannot be shaped like the data.
    """
    root = config.data_dir
    dataset_dir = None
    if config.dataset in FILE_DATASETS:
        assert root is not None  # validate_config insists
        dataset_dir = _find_dir(root, config.dataset, siblings=False) or root
    flat = config.model == "mlp"
    splits = _wrap(lambda: load_dataset(config.dataset, seed=0, flat=flat, data_dir=dataset_dir))
    image = splits.image_shape is not None
    if config.model == "cnn" and not image:
        raise StudyError(
            f"model 'cnn' needs an image data set; {config.dataset!r} is tabular (use --model mlp)"
        )
    notes: list[str] = []
    explicit = config.ood is not None
    wanted = config.ood if config.ood is not None else default_ood(config.dataset, image)
    ood_dirs: dict[str, Path] = {}
    ood_sets: list[str] = []
    for name in wanted:
        if name in FILE_DATASETS:
            found = None if root is None else _find_dir(root, name, siblings=True)
            if found is None:
                where = (
                    "no --data-dir was given"
                    if root is None
                    else f"no folder {' / '.join(_ALIASES[name])} in '{root}' or '{root.parent}'"
                )
                if explicit:
                    raise StudyError(
                        f"OOD set {name!r} is read from local files, but {where}; put its files "
                        f"in <data-dir>/{name}"
                    )
                notes.append(f"OOD set `{name}` skipped: {where}.")
                continue
            if dataset_dir is not None and found.resolve() == dataset_dir.resolve():
                raise StudyError(
                    f"OOD set {name!r} resolves to '{found}', the directory the in-distribution "
                    f"data {config.dataset!r} is read from; give each data set its own folder"
                )
            ood_dirs[name] = found
        ood_sets.append(name)
    if not image:
        notes.append(
            f"`{config.dataset}` is tabular: no rotation shift; the generated OOD noise lies in "
            "[0, 1], close to the standardised features, so OOD detection is hard by design."
        )
    ood: dict[str, torch.Tensor] = {}
    for name in ood_sets:
        try:
            ood[name] = _wrap(partial(load_ood, name, splits, seed=0, data_dir=ood_dirs.get(name)))
        except ValueError as err:
            if isinstance(err, StudyError):
                raise
            raise StudyError(f"OOD set {name!r}: {err}") from None
    digest = tensor_digest(
        [*splits.train.tensors, *splits.val.tensors, *splits.test.tensors, *ood.values()]
    )
    object.__setattr__(config, "data_digest", digest)
    plan = DataPlan(config, dataset_dir, tuple(ood_sets), ood_dirs, image, notes)
    plan._cache[0] = SeedData(0, splits, ood)
    return plan
