"""The `Splits` container and seeded, stratified index splitting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

__all__ = ["Splits", "make_dataset", "stratified_split", "train_val_split"]


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits of one in-distribution dataset.

    Attributes:
        train: Training inputs and int64 labels.
        val: Validation inputs and int64 labels.
        test: Test inputs and int64 labels.
        num_classes: Number of classes; labels lie in ``0..num_classes-1``.
        input_shape: Shape of one input (without the batch dimension).
        name: Registry name of the dataset.
        image_shape: ``(C, H, W)`` of the underlying image for image datasets (whether or not
            the inputs are flattened), ``None`` for tabular data.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    image_shape: tuple[int, int, int] | None = None


def stratified_split(
    labels: NDArray[np.int64], seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Split indices into train / val / test, stratified by label and seeded.

    Args:
        labels: Integer class labels, shape ``[N]``.
        seed: Seed of the shuffle; the same seed gives the same split.
        val_fraction: Fraction of all samples that go to validation.
        test_fraction: Fraction of all samples that go to test.

    Returns:
        Index arrays ``(train, val, test)``, each sorted ascending.
    """
    indices = np.arange(len(labels))
    rest, test = train_test_split(
        indices, test_size=test_fraction, stratify=labels, random_state=seed
    )
    rest_val_fraction = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(
        rest, test_size=rest_val_fraction, stratify=labels[rest], random_state=seed + 1
    )
    return np.sort(train), np.sort(val), np.sort(test)


def train_val_split(
    labels: NDArray[np.int64], seed: int, val_fraction: float = 0.1
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Carve a seeded, stratified validation split out of a training set.

    Args:
        labels: Integer class labels of the training set, shape ``[N]``.
        seed: Seed of the shuffle.
        val_fraction: Fraction of the training samples that go to validation.

    Returns:
        Index arrays ``(train, val)``, each sorted ascending.
    """
    train, val = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(val)


def make_dataset(inputs: NDArray[np.floating], labels: NDArray[np.integer]) -> TensorDataset:
    """Wrap inputs as float32 and labels as int64 in a `TensorDataset`.

    Args:
        inputs: Inputs, any shape ``[N, ...]``.
        labels: Integer labels, shape ``[N]``.

    Returns:
        A `TensorDataset` of ``(float32 inputs, int64 labels)``.
    """
    x = torch.as_tensor(np.ascontiguousarray(inputs, dtype=np.float32))
    y = torch.as_tensor(np.ascontiguousarray(labels, dtype=np.int64))
    return TensorDataset(x, y)
