"""Markdown tables of ``mean ± std`` over seeds, with the best value per column in bold."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Column", "format_geometric", "format_mean_std", "markdown_table", "mean_std"]


@dataclass(frozen=True)
class Column:
    """A table column.

    Attributes:
        key: Key of the cell values.
        label: Header text.
        better: ``"max"`` or ``"min"`` to bold the best mean, ``None`` for no bolding.
        digits: Decimal places.
    """

    key: str
    label: str
    better: str | None = None
    digits: int = 3

    @property
    def header(self) -> str:
        arrow = {"max": " ↑", "min": " ↓"}.get(self.better or "", "")
        return self.label + arrow


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std: no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` (just ``"m"`` for one value)."""
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def format_geometric(values: Sequence[float], digits: int = 3) -> str:
    """Geometric mean ``×/÷`` geometric sd, and the median, of positive values.

    For scale parameters (prior precisions spanning decades) the arithmetic mean ± sd is
    dominated by the largest value (33,580 ± 57,521 for τ ∈ {0.3, 1e3, 1e5}); the geometric
    mean and the median are not.
    """
    if not values or min(values) <= 0:
        raise ValueError(f"format_geometric: need positive values, got {list(values)}")
    logs = [math.log(v) for v in values]
    gm, gsd = mean_std(logs)
    med = statistics.median(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{math.exp(gm):.{digits}g} ×/÷ {math.exp(gsd):.{digits}g} (median {med:.{digits}g})"


def markdown_table(
    rows: Sequence[str],
    columns: Sequence[Column],
    cells: Mapping[tuple[str, str], Sequence[float]],
    *,
    first: str = "method",
) -> str:
    """A markdown table; missing cells are ``–``; the best mean per column is bold.

    Only a unique best is bold: when several rows tie at the displayed precision, none is (a
    tie is not a winner).

    Args:
        rows: Row labels (first column).
        columns: The value columns.
        cells: ``{(row, column.key): [value per seed]}``.
        first: Header of the first column.
    """
    best: dict[str, float] = {}
    for c in columns:
        if c.better is None:
            continue
        means = [round(mean_std(v)[0], c.digits) for (r, k), v in cells.items() if k == c.key and v]
        if len(means) > 1:
            top = max(means) if c.better == "max" else min(means)
            if means.count(top) == 1:
                best[c.key] = top
    lines = [
        "| " + " | ".join([first, *(c.header for c in columns)]) + " |",
        "| " + " | ".join(["---"] + ["---:"] * len(columns)) + " |",
    ]
    for r in rows:
        out = [r]
        for c in columns:
            v = cells.get((r, c.key))
            if not v:
                out.append("–")
                continue
            text = format_mean_std(v, c.digits)
            if c.key in best and round(mean_std(v)[0], c.digits) == best[c.key]:
                text = f"**{text}**"
            out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)
