"""Figure plumbing shared by the analyses: Agg canvases, PNG files, RGB arrays for loggers.

Figures are built with :class:`matplotlib.figure.Figure` on an explicit Agg canvas, never
through ``pyplot``: nothing touches the global backend (a notebook keeps its inline backend),
no figure needs closing, and drawing works in threads and on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["COLORS", "figure_to_array", "new_figure", "save_figure"]

#: Colours of the paper's plots: common dimensions red, unique blue, a comparison model black.
COLORS: dict[str, str] = {"common": "tab:red", "unique": "tab:blue", "comparison": "black", "all": "tab:gray"}


def new_figure(
    ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0, **subplot_kw: Any
) -> tuple[Figure, Any]:
    """A figure on an Agg canvas and its axes (one ``Axes`` or an array of them)."""
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True, subplot_kw=subplot_kw or None)
    return fig, axes


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as a ``uint8`` RGB array ``(H, W, 3)``, what image loggers take."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
