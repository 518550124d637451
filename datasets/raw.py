"""The raw uint8 arrays a local-file reader returns, their checks and conversion to splits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from torch.utils.data import TensorDataset

from datasets.errors import DatasetFileError
from datasets.splits import Splits, make_dataset, train_val_split

__all__ = ["RawImageData", "check_labels", "raw_to_splits"]


@dataclass(frozen=True)
class RawImageData:
    """Official train and test parts of an image data set read from disk.

    Attributes:
        train_images: uint8 ``[N, C, H, W]``.
        train_labels: int64 ``[N]`` in ``0..num_classes-1``.
        test_images: uint8 ``[M, C, H, W]``.
        test_labels: int64 ``[M]``.
        num_classes: Number of classes.
    """

    train_images: NDArray[np.uint8]
    train_labels: NDArray[np.int64]
    test_images: NDArray[np.uint8]
    test_labels: NDArray[np.int64]
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.train_images.shape
        return (int(c), int(h), int(w))


def check_labels(
    labels: NDArray[np.integer], num_images: int, num_classes: int, path: Path | str
) -> NDArray[np.int64]:
    """Check a label array against its images and return it as int64.

    Args:
        labels: Labels read from `path`.
        num_images: Number of images the labels belong to.
        num_classes: Labels must lie in ``0..num_classes-1``.
        path: File (or files) the labels came from, for the error message.

    Returns:
        The labels as a 1-D int64 array.

    Raises:
        DatasetFileError: On a count mismatch or an out-of-range label.
    """
    out = np.asarray(labels).astype(np.int64).reshape(-1)
    if out.shape[0] != num_images:
        raise DatasetFileError(
            f"'{path}': {out.shape[0]} labels for {num_images} images; the counts must match"
        )
    if out.size and (out.min() < 0 or out.max() >= num_classes):
        raise DatasetFileError(
            f"'{path}': labels must lie in 0..{num_classes - 1}, "
            f"found range {out.min()}..{out.max()}"
        )
    return out


def raw_to_splits(
    raw: RawImageData, *, name: str, seed: int = 0, flat: bool = True, val_fraction: float = 0.1
) -> Splits:
    """Turn official train/test arrays into `Splits`, carving validation out of train.

    Args:
        raw: Arrays read from disk.
        name: Name recorded in the splits.
        seed: Seed of the stratified train/validation split.
        flat: ``True`` gives inputs ``[N, C*H*W]``; ``False`` gives ``[N, C, H, W]``.
        val_fraction: Fraction of the official training set used for validation.

    Returns:
        Splits with float32 pixels in ``[0, 1]`` (value / 255) and int64 labels; the test
        split is the official test set.
    """
    train, val = train_val_split(raw.train_labels, seed, val_fraction)
    shape: tuple[int, ...] = (math.prod(raw.image_shape),) if flat else raw.image_shape

    def part(images: NDArray[np.uint8], labels: NDArray[np.int64]) -> TensorDataset:
        pixels = images.reshape(len(images), *shape).astype(np.float32) / np.float32(255.0)
        return make_dataset(pixels, labels)

    return Splits(
        train=part(raw.train_images[train], raw.train_labels[train]),
        val=part(raw.train_images[val], raw.train_labels[val]),
        test=part(raw.test_images, raw.test_labels),
        num_classes=raw.num_classes,
        input_shape=shape,
        name=name,
        image_shape=raw.image_shape,
    )
