"""The one figure saver: atomic PNG writes that close the figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobilenets.tasks.figures import pyplot, save_figure


def test_save_figure_writes_atomically_and_closes_the_figure(tmp_path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [1, 0])
    path = save_figure(figure, tmp_path / "new" / "curve.png", dpi=50)
    assert path.read_bytes().startswith(b"\x89PNG") and not plt.fignum_exists(figure.number)
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]  # no temporary file left


def test_a_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    plt = pyplot()
    path = tmp_path / "curve.png"
    path.write_bytes(b"previous")
    figure, _ = plt.subplots()

    def broken(*args: object, **kwargs: object) -> None:
        Path(args[0]).write_bytes(b"half")
        raise RuntimeError("disk full")

    figure.savefig = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(figure, path)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    assert not plt.fignum_exists(figure.number)
