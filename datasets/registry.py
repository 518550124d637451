"""One registry of named in-distribution and out-of-distribution data sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from datasets.cifar import CIFAR10_FILES, load_cifar10
from datasets.digits import DIGITS_IMAGE_SHAPE, load_digits
from datasets.idx import IDX_FILES, load_idx_dataset
from datasets.images import match_image_shape
from datasets.ood import IN_CLASSES, OUT_CLASSES, gaussian_noise, natural_patches, uniform_noise
from datasets.raw import RawImageData, raw_to_splits
from datasets.splits import Splits
from datasets.svhn import SVHN_FILES, load_svhn
from datasets.tabular import load_tabular

__all__ = ["available_datasets", "available_ood", "load_dataset", "load_ood"]

VAL_FRACTION = 0.1
"""Fraction of an official training set carved off (stratified, seeded) for validation."""

_FILE_READERS: dict[str, tuple[Callable[[Path], RawImageData], tuple[str, ...]]] = {
    "mnist": (lambda d: load_idx_dataset(d, dataset="MNIST"), IDX_FILES),
    "fashion_mnist": (lambda d: load_idx_dataset(d, dataset="Fashion-MNIST"), IDX_FILES),
    "kmnist": (lambda d: load_idx_dataset(d, dataset="KMNIST"), IDX_FILES),
    "cifar10": (load_cifar10, CIFAR10_FILES),
    "svhn": (load_svhn, SVHN_FILES),
}

_BUNDLED: dict[str, Callable[[int, bool], Splits]] = {
    "digits": lambda seed, flat: load_digits(seed=seed, flat=flat, name="digits"),
    "digits04": lambda seed, flat: load_digits(
        seed=seed, flat=flat, classes=IN_CLASSES, name="digits04"
    ),
    "wine": lambda seed, flat: load_tabular("wine", seed=seed),
    "breast_cancer": lambda seed, flat: load_tabular("breast_cancer", seed=seed),
}

_GENERATED_OOD = ("uniform", "gaussian", "natural_patches")
_DIGITS_OOD = "digits59"


def available_datasets() -> tuple[str, ...]:
    """Names accepted by `load_dataset`."""
    return (*_BUNDLED, *_FILE_READERS)


def available_ood() -> tuple[str, ...]:
    """Names accepted by `load_ood`."""
    return (*_GENERATED_OOD, _DIGITS_OOD, *_FILE_READERS)


def _read_files(name: str, data_dir: str | Path | None) -> RawImageData:
    """Read a file-based data set, insisting on a data directory."""
    reader, files = _FILE_READERS[name]
    if data_dir is None:
        raise ValueError(
            f"data set {name!r} is read from local files and is never downloaded; pass "
            f"data_dir=<directory holding {', '.join(files)}>"
        )
    return reader(Path(data_dir))


def load_dataset(
    name: str, *, seed: int = 0, flat: bool = True, data_dir: str | Path | None = None
) -> Splits:
    """Load a named in-distribution data set as train / val / test splits.

    Bundled: ``digits``, ``digits04`` (digits 0-4), ``wine``, ``breast_cancer`` (60/20/20,
    stratified, seeded). File-based, needing `data_dir`: ``mnist``, ``fashion_mnist``,
    ``kmnist`` (IDX files), ``cifar10`` (binary batches), ``svhn`` (``.mat``); their test
    split is the official test set and validation is 10% of the official training set.

    Args:
        name: One of `available_datasets()`.
        seed: Seed of the split.
        flat: Flat ``[N, D]`` inputs (MLPs) or images ``[N, C, H, W]`` (CNNs); tabular data
            sets are always flat.
        data_dir: Directory holding the files of a file-based data set.

    Returns:
        The splits.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones) or a file-based
            data set without `data_dir`.
        DatasetFileError: If the files are missing, corrupt or truncated.
    """
    if name in _BUNDLED:
        return _BUNDLED[name](seed, flat)
    if name in _FILE_READERS:
        raw = _read_files(name, data_dir)
        return raw_to_splits(raw, name=name, seed=seed, flat=flat, val_fraction=VAL_FRACTION)
    raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(available_datasets())}")


def _is_flat(reference: Splits) -> bool:
    """Whether the reference inputs are flat vectors."""
    return len(reference.input_shape) == 1


def _require_image(name: str, reference: Splits) -> tuple[int, int, int]:
    """The reference's image shape, or a ValueError for tabular references."""
    if reference.image_shape is None:
        raise ValueError(
            f"OOD set {name!r} needs an image data set as reference; {reference.name!r} is tabular"
        )
    return reference.image_shape


def load_ood(
    name: str,
    reference: Splits,
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Load a named OOD input set shaped like `reference`'s inputs.

    ``uniform`` and ``gaussian`` are noise in ``[0, 1]``; ``natural_patches`` are crops of
    scikit-learn's sample photographs; ``digits59`` are the test images of digits 5-9 from
    the split with the same `seed` (use with ``digits04``); the file-based names give their
    official test images converted to the reference's channels and size.

    Args:
        name: One of `available_ood()`.
        reference: The in-distribution splits whose input shape the OOD set copies.
        seed: Seed of the generated sets, and the split seed for ``digits59``.
        data_dir: Directory holding the files of a file-based OOD set.
        num_samples: Size of a generated set; defaults to the reference test-set size.
            Ignored by the data-set-based names, which return their whole test set.

    Returns:
        Float32 tensor ``[N, *reference.input_shape]``.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones), a reference the
            set cannot be shaped like, or a file-based set without `data_dir`.
        DatasetFileError: If the files are missing, corrupt or truncated.
    """
    n = len(reference.test) if num_samples is None else num_samples
    shape = reference.input_shape
    if name == "uniform":
        return uniform_noise(n, shape, seed=seed)
    if name == "gaussian":
        return gaussian_noise(n, shape, seed=seed)
    if name == "natural_patches":
        patches = natural_patches(n, _require_image(name, reference), seed=seed)
        return patches.reshape(n, *shape)
    if name == _DIGITS_OOD:
        if reference.image_shape != DIGITS_IMAGE_SHAPE:
            raise ValueError(
                f"OOD set {name!r} needs a digits reference (8x8 images), got {reference.name!r}"
            )
        held_out = load_digits(seed=seed, flat=_is_flat(reference), classes=OUT_CLASSES)
        images: torch.Tensor = held_out.test.tensors[0]
        return images
    if name in _FILE_READERS:
        image_shape = _require_image(name, reference)
        raw = _read_files(name, data_dir)
        pixels = torch.from_numpy(raw.test_images.astype(np.float32) / np.float32(255.0))
        return match_image_shape(pixels, image_shape, flat=_is_flat(reference))
    raise ValueError(f"unknown OOD set {name!r}; valid names: {', '.join(available_ood())}")
