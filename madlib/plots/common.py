"""What every notebook shares: the column's width, where figures and tables go (:func:`savefig`,
:func:`write_table`), tables for reading (:func:`show_table`) and glued values (:func:`glue_all`).
Each analysis' own figures are in the module of its name beside this one."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..paths import atomic_path, results_dir


COLUMN_PX = 784
"""Width of the book's text column in CSS pixels: a wider figure is shown scaled down to it."""
COLUMN_INCHES = 7.0
"""Width the figures are drawn at, so that they are shown at (about) their natural size."""


def displayed_text_px(fig, column_px: int = COLUMN_PX) -> float:
    """Height in CSS pixels, as shown in the book, of the smallest visible text of ``fig``: the
    notebook shows the figure at ``figure.dpi`` with a tight bounding box, scaled down to
    ``column_px`` if wider. The book's figures keep this at 9 px or more."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width_in = fig.get_tightbbox(renderer).width
    px_per_pt = min(fig.dpi, column_px / width_in) / 72
    sizes = [t.get_fontsize() for t in fig.findobj(plt.Text) if t.get_visible() and t.get_text().strip()
             and t.get_window_extent(renderer).width > 0]  # fmt: skip
    return min(sizes) * px_per_pt if sizes else float("inf")


def savefig(fig, analysis: str, name: str) -> None:
    """Save ``fig`` as ``<results>/<analysis>/<name>.png`` (atomically). Nothing is returned, so a
    notebook cell ending in this call shows the figure, not a path of the build."""
    with atomic_path(results_dir(analysis) / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def write_table(df: pd.DataFrame, analysis: str, name: str) -> None:
    """Write a tidy table as ``<results>/<analysis>/<name>.csv`` (atomically; nothing is returned,
    as for :func:`savefig`)."""
    with atomic_path(results_dir(analysis) / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)


def show_table(df: pd.DataFrame, caption: str, precision: int = 3):
    """A table for reading: rounded to ``precision`` decimals (a value too small for them in
    scientific notation, never as -0.000; zero as 0), missing values as a dash, a caption, and no column of row numbers (a default
    integer index is hidden; a meaningful index is kept). The CSVs keep full precision."""
    half = 0.5 * 10.0**-precision

    def number(x):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
            return str(x)
        if isinstance(x, (int, np.integer)):
            return f"{x:,}"
        if np.isnan(x):
            return "–"
        if x == 0:
            return "0"
        return f"{x:.1e}" if abs(x) < half else f"{x:.{precision}f}"

    styler = df.style.format(number).set_caption(caption)
    if isinstance(df.index, pd.RangeIndex):
        styler = styler.hide(axis="index")
    return styler


def glue_all(values: dict[str, Any]) -> None:
    """Glue each value under its key for the book's text (``{glue:text}`key```), without showing it
    on the page: a notebook's ``for key, value in ...: glue(key, value, display=False)`` in one call."""
    from myst_nb import glue

    for key, value in values.items():
        glue(key, value, display=False)
