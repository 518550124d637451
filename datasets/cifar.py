"""Reader for the CIFAR-10 *binary* batches in a local directory (no pickle, no download)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from datasets.errors import DatasetFileError
from datasets.locate import locate_files
from datasets.raw import RawImageData, check_labels

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_FILES",
    "CIFAR10_SUBDIR",
    "RECORD_BYTES",
    "load_cifar10",
    "read_cifar_batch",
]

CIFAR10_CLASSES = 10
CIFAR10_SUBDIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_FILES: tuple[str, ...] = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
IMAGE_SHAPE: tuple[int, int, int] = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then 1024 R, 1024 G, 1024 B bytes


def read_cifar_batch(
    path: str | Path, num_classes: int = CIFAR10_CLASSES
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Read one CIFAR binary batch of fixed-size records.

    Args:
        path: A ``*.bin`` batch: records of 1 label byte + 3072 pixel bytes (channel-major,
            each channel row-major).
        num_classes: Labels must be below this.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        DatasetFileError: If the file is empty, its size is not a multiple of 3073 bytes
            (truncated or corrupt), or a label is out of range.
    """
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % RECORD_BYTES:
        raise DatasetFileError(
            f"'{path}': size {data.size} bytes is not a positive multiple of the "
            f"{RECORD_BYTES}-byte CIFAR record (1 label + 3072 pixels); truncated or corrupt"
        )
    records = data.reshape(-1, RECORD_BYTES)
    labels = check_labels(records[:, 0], records.shape[0], num_classes, path)
    images = records[:, 1:].reshape(-1, *IMAGE_SHAPE)
    return images, labels


def _read_batches(paths: Sequence[Path]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Read and concatenate several batches."""
    parts = [read_cifar_batch(p) for p in paths]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels


def load_cifar10(directory: str | Path) -> RawImageData:
    """Read CIFAR-10 from its binary version in a local directory.

    Looks for ``data_batch_1.bin`` … ``data_batch_5.bin`` and ``test_batch.bin`` in
    `directory` or its ``cifar-10-batches-bin/`` sub-folder. The Python (pickle) version is
    deliberately not supported. Never downloads.

    Args:
        directory: Directory holding the batches.

    Returns:
        uint8 images ``[N, 3, 32, 32]`` and int64 labels of the train and test parts.

    Raises:
        DatasetFileError: If a batch is missing (the message lists the expected names),
            truncated or corrupt.
    """
    paths = locate_files(
        directory, CIFAR10_FILES, dataset="CIFAR-10 (binary)", subdirs=(CIFAR10_SUBDIR,)
    )
    train_images, train_labels = _read_batches([paths[name] for name in CIFAR10_TRAIN_FILES])
    test_images, test_labels = read_cifar_batch(paths[CIFAR10_TEST_FILE])
    return RawImageData(train_images, train_labels, test_images, test_labels, CIFAR10_CLASSES)
