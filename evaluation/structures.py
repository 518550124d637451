"""The curvature structures the evaluation compares (one definition for the study and benchmarks).

``"full"`` (the exact dense block) is left out: it is a reference for tests, too large for the
study's networks.
"""

from __future__ import annotations

__all__ = ["STRUCTURES"]

STRUCTURES: tuple[str, ...] = ("diag", "kfac", "kfoc")
"""Approximate curvature structures of :mod:`bayes_kfoc`, in report order."""
