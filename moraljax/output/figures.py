"""Figures of the reports: one figure factory, the colours, stacked share bars.

Figures are drawn on matplotlib.figure.Figure, not pyplot: no global backend
state, no display needed (savefig renders PNG with Agg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib import axes as matplotlib_axes
from matplotlib import figure as matplotlib_figure
import numpy as np

from moraljax.output import names

DPI = 100
PANEL_SIZE_INCHES = (5.0, 3.5)
MAX_PANEL_COLUMNS = 3

# One colour per action type, the same in every figure: greens cooperate,
# warm colours defect, greys are illegal outputs.
ACTION_TYPE_COLORS = {
    "C|C": "#2ca02c",
    "C|D": "#98df8a",
    "D|C": "#ff7f0e",
    "D|D": "#d62728",
    "illegal|C": "#c7c7c7",
    "illegal|D": "#7f7f7f",
}
# Answers of the beyond-matrix tests in the same colours: C as C|C, D as D|D,
# anything else as an illegal output.
ANSWER_COLORS = {"C": ACTION_TYPE_COLORS["C|C"], "D": ACTION_TYPE_COLORS["D|D"],
                 "other": ACTION_TYPE_COLORS["illegal|D"]}


def figure(rows: int, columns: int, panel_size: tuple[float, float] = PANEL_SIZE_INCHES
           ) -> tuple[matplotlib_figure.Figure, np.ndarray]:
    """A figure of rows x columns panels, each `panel_size` inches.

    Returns:
        (figure, axes [rows, columns]).
    """
    width, height = panel_size
    fig = matplotlib_figure.Figure(figsize=(width * columns, height * rows), dpi=DPI)
    return fig, fig.subplots(rows, columns, squeeze=False)


def panels(num_panels: int) -> tuple[matplotlib_figure.Figure, list[matplotlib_axes.Axes]]:
    """A figure of `num_panels` panels in rows of at most MAX_PANEL_COLUMNS; unused cells hidden."""
    num_columns = min(num_panels, MAX_PANEL_COLUMNS)
    fig, axes = figure(math.ceil(num_panels / num_columns), num_columns)
    flat = list(axes.ravel())
    for unused in flat[num_panels:]:
        unused.set_visible(False)
    return fig, flat[:num_panels]


def action_type_colors() -> list[str]:
    """The colours of ACTION_TYPE_NAMES, in their order."""
    return [ACTION_TYPE_COLORS[name] for name in names.ACTION_TYPE_NAMES]


def stacked_bars(axis: matplotlib_axes.Axes, labels: Sequence[str], shares: np.ndarray,
                 series: Sequence[str], colors: Sequence[str]) -> None:
    """Bars of shares stacked bottom-up, one bar per label.

    Args:
        axis: the panel.
        labels: the bars' x labels.
        shares: [bars, series] shares.
        series: the names of the stacked parts (legend).
        colors: one colour per part.
    """
    bottom = np.zeros(len(labels))
    for i, (name, color) in enumerate(zip(series, colors)):
        axis.bar(np.arange(len(labels)), shares[:, i], bottom=bottom, color=color, label=name)
        bottom += shares[:, i]
    axis.set_xticks(np.arange(len(labels)), labels, rotation=30 if max(map(len, labels)) > 5 else 0,
                    fontsize="small")
    axis.set_ylim(0, 1)


def legend_right(fig: matplotlib_figure.Figure, axis: matplotlib_axes.Axes, right: float) -> None:
    """One legend for the figure, from `axis`, in a margin right of `right` (figure fraction)."""
    handles, labels = axis.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize="small")
    fig.tight_layout(rect=(0, 0, right, 1))
