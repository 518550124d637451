"""Reader for the SVHN cropped-digit ``.mat`` files in a local directory (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from numpy.typing import NDArray

from datasets.errors import DatasetFileError
from datasets.locate import locate_files
from datasets.raw import RawImageData, check_labels

__all__ = ["SVHN_FILES", "load_svhn", "read_svhn_mat"]

SVHN_TRAIN_FILE = "train_32x32.mat"
SVHN_TEST_FILE = "test_32x32.mat"
SVHN_FILES: tuple[str, str] = (SVHN_TRAIN_FILE, SVHN_TEST_FILE)
SVHN_CLASSES = 10


def read_svhn_mat(path: str | Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Read one SVHN ``*_32x32.mat`` file with `scipy.io.loadmat`.

    The file holds ``X`` of shape ``[32, 32, 3, N]`` and ``y`` of shape ``[N, 1]`` with
    values 1..10, where 10 stands for the digit 0.

    Args:
        path: The ``.mat`` file (MATLAB v5 format, as distributed).

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]`` in 0..9.

    Raises:
        DatasetFileError: If the file cannot be parsed (corrupt, truncated or empty), lacks
            ``X`` or ``y``, has unexpected shapes, holds labels outside 1..10, or pixels that are
            not whole numbers in 0..255 (e.g. floats already scaled to [0, 1]).
    """
    path = Path(path)
    try:
        contents = scipy.io.loadmat(path)
    except (
        ValueError, OSError, TypeError, EOFError, NotImplementedError, scipy.io.matlab.MatReadError
    ) as err:  # fmt: skip
        raise DatasetFileError(
            f"'{path}': cannot read as a MATLAB v5 .mat file (corrupt or truncated?): {err}"
        ) from err
    missing = [key for key in ("X", "y") if key not in contents]
    if missing:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise DatasetFileError(
            f"'{path}': missing variable(s) {', '.join(missing)}; expected X and y, found {found}"
        )
    x = np.asarray(contents["X"])
    y = np.asarray(contents["y"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] == 0:
        raise DatasetFileError(f"'{path}': X must have shape [32, 32, 3, N>0], got {x.shape}")
    if y.ndim not in (1, 2) or (y.ndim == 2 and 1 not in y.shape):
        raise DatasetFileError(f"'{path}': y must have shape [N, 1] or [N], got {y.shape}")
    raw = y.reshape(-1).astype(np.int64)
    if raw.size and (raw.min() < 1 or raw.max() > 10):
        raise DatasetFileError(
            f"'{path}': SVHN labels must lie in 1..10, found range {raw.min()}..{raw.max()}"
        )
    labels = check_labels(raw % 10, x.shape[3], SVHN_CLASSES, path)
    if x.dtype != np.uint8:
        _check_pixel_values(x, path)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)
    return images, labels


def _check_pixel_values(x: NDArray[Any], path: Path) -> None:
    """Non-uint8 ``X`` must hold whole numbers in 0..255 (a cast would otherwise truncate)."""
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetFileError(f"'{path}': X has dtype {x.dtype}; expected uint8 pixels 0..255")
    lo, hi = x.min(), x.max()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise DatasetFileError(
            f"'{path}': X values must lie in 0..255 (uint8 pixels), found range {lo}..{hi}"
        )
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0 and np.any(x != np.round(x)):
        raise DatasetFileError(
            f"'{path}': X is {x.dtype} in [0, 1] (range {lo:.3g}..{hi:.3g}): already scaled "
            "pixels, which a uint8 cast would turn into black images; store the original uint8 "
            "0..255 pixels (e.g. np.round(X * 255).astype(np.uint8))"
        )
    if np.issubdtype(x.dtype, np.floating) and np.any(x != np.round(x)):
        raise DatasetFileError(
            f"'{path}': X is {x.dtype} with fractional values; expected whole pixel values "
            "0..255 (uint8), as distributed"
        )


def load_svhn(directory: str | Path) -> RawImageData:
    """Read SVHN (cropped digits) from ``train_32x32.mat`` and ``test_32x32.mat``.

    Args:
        directory: Directory holding the two files. Never downloads.

    Returns:
        uint8 images ``[N, 3, 32, 32]`` and int64 labels 0..9 of the train and test parts.

    Raises:
        DatasetFileError: If a file is missing (the message lists the expected names),
            corrupt or malformed.
    """
    paths = locate_files(directory, SVHN_FILES, dataset="SVHN (.mat)")
    train_images, train_labels = read_svhn_mat(paths[SVHN_TRAIN_FILE])
    test_images, test_labels = read_svhn_mat(paths[SVHN_TEST_FILE])
    return RawImageData(train_images, train_labels, test_images, test_labels, SVHN_CLASSES)
