"""Output directories: refuse to clobber a different study, publish reports atomically, and never
delete anything this tool did not write.

A report is built in a hidden temporary directory next to ``--out`` (same file system). Then:

- ``--out`` absent or empty: the temporary directory is renamed into place (one atomic rename);
- ``--out`` holds this tool's report and nothing else: the old report is renamed aside, the new
  one into place, and the old report's files (those listed in its ``study.json``) are unlinked
  one by one; its folders are removed only once empty;
- ``--out`` holds anything else (with ``--overwrite``: a folder of data, notes, ...): each
  report file is moved into it with an atomic per-file rename, files the previous report of this
  tool listed and the new one does not are unlinked, and nothing else is touched. A user's file
  that has the name of a report file (``report.md``, ``figures/``, ...) is an error, not
  replaced. ``study.json`` is removed first and written last, so a crash mid-way leaves no
  stamp claiming a complete report.

``study.json`` holds the study's fingerprint (:meth:`StudyConfig.fingerprint`, which covers the
data's content) and the list of files the tool wrote; the fingerprint is how an existing
directory is recognised as the same study (re-running replaces it) or a different one (refused
without ``--overwrite``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evaluation.study.config import StudyConfig
from evaluation.study.errors import StudyError

__all__ = ["STUDY_FILE", "atomic_output", "check_output_dir", "study_stamp"]

STUDY_FILE = "study.json"
STUDY_FORMAT = "bayes-kfoc-study"
_NOT_COMPARED = ("out", "cache_dir", "overwrite", "progress", "threads", "data_dir")


def study_stamp(config: StudyConfig, files: list[str] | None = None) -> dict[str, Any]:
    """The content of ``study.json``: format, fingerprint, config and the files written."""
    return {
        "format": STUDY_FORMAT,
        "fingerprint": config.fingerprint(),
        "config": config.to_json(),
        "files": sorted(files or []),
    }


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    """The ``study.json`` of a report of this tool in ``directory``, else ``None``."""
    try:
        stamp = json.loads((directory / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != STUDY_FORMAT:
        return None
    return stamp


def _owned_files(directory: Path, stamp: dict[str, Any] | None) -> set[str]:
    """Relative paths of the files this tool wrote into ``directory`` (per its stamp)."""
    if stamp is None:
        return set()
    files = stamp.get("files")
    if not isinstance(files, list):  # a stamp written before manifests: the report's own list
        files = ["results.json", "report.md", STUDY_FILE]
        try:
            figures = json.loads((directory / "results.json").read_text()).get("figures", [])
            files += [f for f in figures if isinstance(f, str)]
        except (OSError, ValueError, AttributeError):
            pass
    safe = {f for f in files if isinstance(f, str) and ".." not in Path(f).parts}
    return {f for f in safe if not Path(f).is_absolute()} | {STUDY_FILE}


def check_output_dir(config: StudyConfig) -> None:
    """Refuse an ``--out`` that holds something other than this study, unless ``--overwrite``.

    Raises:
        StudyError: ``--out`` is a file; or it holds a different study or unrelated files and
            ``overwrite`` is off.
    """
    out = config.out
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out '{out}' exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()) or config.overwrite:
        return
    stamp_path = out / STUDY_FILE
    if not stamp_path.is_file():
        raise StudyError(
            f"output directory '{out}' is not empty and holds no {STUDY_FILE} (not a study "
            "report); choose another --out, or pass --overwrite to add the report's files to it "
            "(nothing already there is deleted)"
        )
    try:
        old = json.loads(stamp_path.read_text())
        old_fp, old_cfg = old["fingerprint"], old.get("config", {})
    except (ValueError, KeyError, TypeError):
        raise StudyError(
            f"output directory '{out}' holds an unreadable {STUDY_FILE}; pass --overwrite to "
            "replace it"
        ) from None
    if old_fp != config.fingerprint():
        new_cfg = config.to_json()
        diff = sorted(
            k
            for k in set(old_cfg) | set(new_cfg)
            if k not in _NOT_COMPARED and old_cfg.get(k) != new_cfg.get(k)
        )
        details = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in diff)
        what = details or "other settings"
        if "data_digest" in diff:
            what += " (the data differ)"
        raise StudyError(
            f"output directory '{out}' already holds a different study ({what}); pass "
            "--overwrite to replace it, or choose another --out"
        )


def _report_files(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())


def _unlink_owned(directory: Path, files: set[str]) -> None:
    """Unlink ``files`` (relative to ``directory``), then remove their folders if left empty."""
    folders: set[Path] = set()
    for rel in files:
        path = directory / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
        folders.update(p for p in (directory / rel).parents if directory in p.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _publish_into(tmp: Path, out: Path, new_files: list[str]) -> None:
    """Move the report files into an existing directory that also holds other files."""
    stamp = _read_stamp(out)
    owned = _owned_files(out, stamp)
    clashes = [f for f in new_files if (out / f).exists() and f not in owned]
    clashes += [
        str(p.relative_to(out))
        for f in new_files
        for p in (out / f).parents
        if out in p.parents and p.exists() and not p.is_dir()
    ]
    if clashes:
        raise StudyError(
            f"output directory '{out}' holds {', '.join(sorted(set(clashes)))}, which this tool "
            "did not write but a report would replace; move them or choose another --out"
        )
    if (out / STUDY_FILE).is_file():
        (out / STUDY_FILE).unlink()  # no stamp while the report is incomplete
    for rel in new_files:
        if rel == STUDY_FILE:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    _unlink_owned(out, owned - set(new_files))
    os.replace(tmp / STUDY_FILE, out / STUDY_FILE)


@contextmanager
def atomic_output(out: Path, stamp: dict[str, Any]) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success its files become the report at ``out``.

    ``stamp`` (from :func:`study_stamp`) is written as ``study.json`` with the list of every
    file the caller wrote into the temporary directory.

    See the module docstring for how an existing ``out`` is treated: only files this tool wrote
    are ever removed. On an exception the temporary directory is removed and ``out`` is left
    untouched.

    Raises:
        StudyError: ``out`` holds a file this tool did not write under a report file's name.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the report
    try:
        yield tmp
        new_files = sorted({*_report_files(tmp), STUDY_FILE})
        full = {**stamp, "format": STUDY_FORMAT, "files": new_files}
        (tmp / STUDY_FILE).write_text(json.dumps(full, indent=1) + "\n")
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            if out.exists():
                out.rmdir()  # empty
            os.replace(tmp, out)
            return
        if not out.is_dir():
            raise StudyError(f"--out '{out}' exists and is not a directory")
        stamp = _read_stamp(out)
        owned = _owned_files(out, stamp)
        present = set(_report_files(out))
        if stamp is not None and present <= owned:  # only this tool's report: swap directories
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            _unlink_owned(old, owned)
            if old.is_dir() and not any(old.iterdir()):
                old.rmdir()
            return
        _publish_into(tmp, out, new_files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory only
