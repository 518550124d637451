"""Output directories: refuse to clobber a different study, and publish reports atomically.

A report is built in a hidden temporary directory next to ``--out`` (same file system), and only
when every file is written is it renamed into place; an older report at ``--out`` is first moved
aside and deleted afterwards. A crash therefore leaves either the previous report or none at
``--out``, never a half-written one (at worst a hidden ``.<name>.tmp-*`` folder).

``study.json`` in a report holds the study's fingerprint (:meth:`StudyConfig.fingerprint`); it is
how an existing directory is recognised as the same study (re-running replaces it) or a
different one (refused without ``--overwrite``).
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

__all__ = ["STUDY_FILE", "atomic_output", "check_output_dir"]

STUDY_FILE = "study.json"
STUDY_FORMAT = "bayes-kfoc-study"


def study_stamp(config: StudyConfig) -> dict[str, Any]:
    """The content of ``study.json``."""
    return {"format": STUDY_FORMAT, "fingerprint": config.fingerprint(), "config": config.to_json()}


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
    stamp = out / STUDY_FILE
    if not stamp.is_file():
        raise StudyError(
            f"output directory '{out}' is not empty and holds no {STUDY_FILE} (not a study "
            "report); choose another --out or pass --overwrite to replace its contents"
        )
    try:
        old = json.loads(stamp.read_text())
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
            if k not in ("out", "cache_dir", "overwrite", "progress", "threads", "data_dir")
            and old_cfg.get(k) != new_cfg.get(k)
        )
        details = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in diff)
        what = details or "other settings"
        raise StudyError(
            f"output directory '{out}' already holds a different study ({what}); pass "
            "--overwrite to replace it, or choose another --out"
        )


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success, it replaces ``out`` in one rename.

    On an exception the temporary directory is removed and ``out`` is left untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the report
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
