"""Figures: matplotlib's headless backend, the styling every figure of the library shares, saving a figure
atomically and logging it to TensorBoard.

The figures themselves (the accuracy-vs-cost curves of Kondratyuk et al. 2020, one point per ensemble size;
cascades; reliability diagrams; the cross-run comparison) live next to the code that computes their
numbers; this module holds only what they have in common. It imports matplotlib lazily, so importing the
library does not.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_ensembles.results import atomic_write_text

__all__ = [
    "GRID_ALPHA",
    "LEGEND_FONT_SIZE",
    "close",
    "figure_writers",
    "log_figure",
    "png_bytes",
    "pyplot",
    "save_png",
    "style_axes",
]

GRID_ALPHA = 0.3
LEGEND_FONT_SIZE = 8


def pyplot() -> Any:
    """``matplotlib.pyplot``, with the non-interactive Agg backend unless the user has chosen another.

    Returns:
        The ``matplotlib.pyplot`` module.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def style_axes(
    ax: Any,
    title: str = "",
    /,
    *,
    title_size: float = 9,
    grid: str = "major",
    legend_size: float = LEGEND_FONT_SIZE,
    **legend: Any,
) -> None:
    """The finishing touches every figure's axes share: a small title, a light grid and a small legend.

    Args:
        ax: the matplotlib ``Axes``.
        title: the axes' title.
        title_size: its font size.
        grid: which ticks get grid lines (``"major"`` or ``"both"`` for log axes).
        legend_size: the legend's font size.
        **legend: further arguments of ``ax.legend`` (``loc``, ``title`` of the legend, ...).
    """
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=GRID_ALPHA, which=grid)
    ax.legend(fontsize=legend_size, **legend)


def close(figure: Any) -> None:
    """Release a figure (pyplot keeps every open figure alive otherwise)."""
    pyplot().close(figure)


def png_bytes(figure: Any) -> bytes:
    """The figure as PNG bytes, at the figure's own size and resolution.

    Args:
        figure: a matplotlib ``Figure``.

    Returns:
        The PNG file's content.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Write the figure as a PNG so that readers see the old file or the new one, never half of one.

    Args:
        figure: a matplotlib ``Figure``.
        path: the destination; its folder is created if needed.

    Returns:
        The destination path.
    """
    return atomic_write_text(path, png_bytes(figure))


def figure_writers(loggers: Iterable[Any]) -> list[Any]:
    """The experiments of ``loggers`` that take figures (``add_figure``: TensorBoard's ``SummaryWriter``).

    Args:
        loggers: Lightning loggers, e.g. ``trainer.loggers``.

    Returns:
        Their ``experiment`` objects that have ``add_figure``, in order.
    """
    experiments = [getattr(logger, "experiment", None) for logger in loggers]
    return [e for e in experiments if hasattr(e, "add_figure")]


def log_figure(writers: Iterable[Any], tag: str, figure: Any, step: int) -> None:
    """Log the figure under ``tag`` to every writer, leaving it open (the caller closes it).

    Args:
        writers: objects with ``add_figure`` (see :func:`figure_writers`).
        tag: the TensorBoard tag.
        figure: a matplotlib ``Figure``.
        step: the global step.
    """
    for writer in writers:
        writer.add_figure(tag, figure, step, close=False)
