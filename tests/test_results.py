"""Result files: atomic writes with the user's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lightning_ensembles.results import atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_uses_the_umask_like_open(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "sub" / "results.json", "{}\n")
        with open(tmp_path / "plain.txt", "w") as handle:  # what every other file gets
            handle.write("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(written.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask
    assert written.read_text() == "{}\n" and not list(written.parent.glob(".*.tmp"))


def test_a_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = atomic_write_text(tmp_path / "results.json", "old")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))
