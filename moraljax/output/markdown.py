"""Markdown tables of the reports: cells, escaping and table lines."""

from __future__ import annotations

from collections.abc import Sequence


def escape(text: str) -> str:
    """A cell's text with "|" escaped ("|" inside a cell would split the table row)."""
    return text.replace("|", "\\|")


def mean_ci(mean: float, ci: float, decimals: int = 3) -> str:
    """A "mean ± 95% CI half-width" cell, e.g. "0.794 ± 0.012"."""
    return f"{mean:.{decimals}f} ± {ci:.{decimals}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table: the header, the separator, one line per row.

    Cells are written as given (escape them first where they may hold "|").
    """
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
