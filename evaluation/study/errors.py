"""The two errors the study raises on purpose: bad input, and a bad number mid-run."""

from __future__ import annotations

__all__ = ["StudyError", "StudyRunError"]


class StudyError(ValueError):
    """Invalid study input (names, files, output directory), raised before any long work."""


class StudyRunError(RuntimeError):
    """A method produced something unusable (e.g. NaN probabilities) during the run.

    The message names the method, the seed and the evaluation step.
    """
