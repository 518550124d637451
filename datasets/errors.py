"""The error raised when local dataset files are missing, corrupt or truncated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["DatasetFileError", "missing_files_error"]


class DatasetFileError(ValueError):
    """A dataset file on disk is missing, corrupt or truncated.

    The message always names the directory or file concerned and, for missing files, the
    file names that were expected.
    """


def missing_files_error(
    directory: Path,
    expected: Sequence[str],
    missing: Sequence[str],
    dataset: str,
    *,
    note: str = "",
) -> DatasetFileError:
    """Build the error for files that are absent from a user-named directory.

    Args:
        directory: The directory that was searched.
        expected: Every file name the reader needs (a `.gz` variant may be accepted too).
        missing: The subset of `expected` that was not found.
        dataset: A human-readable dataset name, e.g. ``"MNIST (IDX)"``.
        note: Extra text appended after the list of expected files.

    Returns:
        A `DatasetFileError` whose message names the directory and lists the expected files.
    """
    return DatasetFileError(
        f"{dataset}: missing file(s) {', '.join(missing)} in directory '{directory}'. "
        f"Expected files: {', '.join(expected)}{note}. "
        "Nothing is downloaded; place the files there yourself."
    )
