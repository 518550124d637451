"""Markdown tables of ``mean ± std`` over seeds, with the best value per column in bold."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Column", "format_mean_std", "markdown_table", "mean_std"]


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


def markdown_table(
    rows: Sequence[str],
    columns: Sequence[Column],
    cells: Mapping[tuple[str, str], Sequence[float]],
    *,
    first: str = "method",
) -> str:
    """A markdown table; missing cells are ``–``; the best mean per column is bold.

    Ties at the displayed precision are all bold.

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
            best[c.key] = max(means) if c.better == "max" else min(means)
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
