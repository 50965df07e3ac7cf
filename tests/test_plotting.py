"""The shared figure helpers: headless backend, atomic PNG files, TensorBoard logging."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lightning_ensembles.plotting import close, figure_writers, log_figure, png_bytes, pyplot, save_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_save_png_writes_the_figure_atomically(tmp_path: Path) -> None:
    figure, ax = pyplot().subplots(figsize=(2, 2), dpi=50)
    ax.plot([0, 1], [1, 0])
    path = save_png(figure, tmp_path / "sub" / "figure.png")
    assert path.read_bytes() == png_bytes(figure) and path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == ["figure.png"]  # no temporary file left behind
    close(figure)
    assert not pyplot().fignum_exists(figure.number)


def test_figures_go_to_the_loggers_that_take_them_and_stay_open() -> None:
    logged: list[tuple[str, int, bool]] = []

    class Writer:
        def add_figure(self, tag: str, figure: object, step: int, close: bool = True) -> None:
            logged.append((tag, step, close))

    loggers = [SimpleNamespace(experiment=Writer()), SimpleNamespace(experiment=object()), SimpleNamespace()]
    writers = figure_writers(loggers)
    assert len(writers) == 1
    figure, _ = pyplot().subplots()
    log_figure(writers, "a/b", figure, step=3)
    assert logged == [("a/b", 3, False)]
    assert pyplot().fignum_exists(figure.number)
    close(figure)
