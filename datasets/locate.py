"""Find the files of a local dataset in a user-named directory (never downloads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datasets.errors import DatasetFileError, missing_files_error

__all__ = ["locate_files"]


def locate_files(
    directory: str | Path,
    names: Sequence[str],
    *,
    dataset: str,
    subdirs: Sequence[str] = (),
    suffixes: Sequence[str] = ("",),
) -> dict[str, Path]:
    """Find every file in `names` in `directory` or one of its `subdirs`.

    All files must be found in the same folder: the directory itself is tried first, then
    each sub-folder in order.

    Args:
        directory: The directory the user named.
        names: Required file names.
        dataset: Human-readable dataset name for error messages.
        subdirs: Sub-folders of `directory` that may hold the files instead.
        suffixes: Accepted name suffixes, tried in order (e.g. ``("", ".gz")``).

    Returns:
        Map from each name in `names` to the path found.

    Raises:
        DatasetFileError: If `directory` does not exist, or some file is in no folder; the
            message names the directory and lists the expected files.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DatasetFileError(
            f"{dataset}: data directory '{root}' does not exist or is not a directory. "
            f"Expected files: {', '.join(names)}."
        )
    best: tuple[dict[str, Path], list[str]] | None = None
    for folder in [root, *(root / sub for sub in subdirs)]:
        found: dict[str, Path] = {}
        for name in names:
            for suffix in suffixes:
                path = folder / (name + suffix)
                if path.is_file():
                    found[name] = path
                    break
        missing = [n for n in names if n not in found]
        if not missing:
            return found
        if best is None or len(found) > len(best[0]):
            best = (found, missing)
    assert best is not None
    extras = [s for s in suffixes if s]
    note = f" (each may also end in {' or '.join(extras)})" if extras else ""
    if subdirs:
        note += f"; also searched sub-folder(s) {', '.join(subdirs)}"
    raise missing_files_error(root, names, best[1], dataset, note=note)
