"""Saving matplotlib figures: the one way every task writes its PNGs (atomically, then the figure is closed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilenets.datasets.atomic import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (reports are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``figure`` to ``path`` (the format follows the suffix) atomically, close it, return the path.

    Readers see the previous file or the complete new one, never a half-written image; the folder is
    created when missing.
    """
    path = Path(path)
    try:
        with atomic_path(path, path.suffix or ".png") as temp:
            figure.savefig(temp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        pyplot().close(figure)
    return path
