"""Reader for MNIST / Fashion-MNIST / KMNIST IDX files (raw or gzip) in a local directory."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from datasets.errors import DatasetFileError
from datasets.locate import locate_files
from datasets.raw import RawImageData, check_labels

__all__ = ["IDX_FILES", "IMAGE_MAGIC", "LABEL_MAGIC", "load_idx_dataset", "read_idx"]

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing gzip (detected by its magic bytes)."""
    data = path.read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFileError(f"'{path}': corrupt or truncated gzip data ({err})") from err


def read_idx(path: str | Path, expected_magic: int) -> NDArray[np.uint8]:
    """Read one IDX file of unsigned bytes, checking its header against its size.

    Args:
        path: The file, raw or gzip-compressed.
        expected_magic: `IMAGE_MAGIC` (3-D images) or `LABEL_MAGIC` (1-D labels).

    Returns:
        The uint8 array with the dimensions the header gives.

    Raises:
        DatasetFileError: On a wrong magic number, an empty file, or a byte count that does
            not match the header (truncated or with trailing bytes).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetFileError(f"'{path}': truncated IDX file ({len(data)} bytes, no header)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        kind = "image" if expected_magic == IMAGE_MAGIC else "label"
        raise DatasetFileError(
            f"'{path}': bad magic number {magic} (expected {expected_magic} for an IDX "
            f"{kind} file); the file is corrupt or not of this kind"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFileError(f"'{path}': truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise DatasetFileError(f"'{path}': IDX header has a zero dimension {dims}")
    expected = header + math.prod(dims)
    if len(data) < expected:
        raise DatasetFileError(
            f"'{path}': truncated IDX file: header {dims} needs {expected} bytes, found {len(data)}"
        )
    if len(data) > expected:
        raise DatasetFileError(
            f"'{path}': IDX file has {len(data) - expected} unexpected trailing bytes "
            f"after the {expected} bytes its header {dims} describes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_pair(
    images_path: Path, labels_path: Path, num_classes: int
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Read matching image and label files; images come back as ``[N, 1, H, W]``."""
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    checked = check_labels(labels, images.shape[0], num_classes, labels_path)
    return images[:, None, :, :], checked


def load_idx_dataset(
    directory: str | Path, *, dataset: str = "MNIST-style IDX", num_classes: int = 10
) -> RawImageData:
    """Read the four IDX files of MNIST, Fashion-MNIST or KMNIST from a local directory.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ending in
    ``.gz``) in `directory` or its ``raw/`` sub-folder. Never downloads.

    Args:
        directory: Directory holding the files.
        dataset: Name used in error messages.
        num_classes: Labels must lie in ``0..num_classes-1``.

    Returns:
        The uint8 images ``[N, 1, 28, 28]`` and int64 labels of the train and test parts.

    Raises:
        DatasetFileError: If a file is missing (the message lists the expected names),
            corrupt or truncated, or labels do not match the images.
    """
    paths = locate_files(
        directory, IDX_FILES, dataset=dataset, subdirs=("raw",), suffixes=("", ".gz")
    )
    train_images, train_labels = _read_pair(paths[IDX_FILES[0]], paths[IDX_FILES[1]], num_classes)
    test_images, test_labels = _read_pair(paths[IDX_FILES[2]], paths[IDX_FILES[3]], num_classes)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetFileError(
            f"'{directory}': train images {train_images.shape[1:]} and test images "
            f"{test_images.shape[1:]} differ in shape"
        )
    return RawImageData(train_images, train_labels, test_images, test_labels, num_classes)
