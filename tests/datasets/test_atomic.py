"""The shared atomic writes: old or new file, never half of one; permissions of a replaced file kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mobilenets.datasets.atomic import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    write_text_atomic(path, "old ≥ text\n")
    with pytest.raises(RuntimeError), atomic_path(path) as temp:
        temp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text(encoding="utf-8") == "old ≥ text\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_follows_the_umask(tmp_path: Path) -> None:
    kept = tmp_path / "private.txt"
    kept.write_text("secret")
    kept.chmod(0o600)
    write_text_atomic(kept, "new secret")
    assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_text() == "new secret"
    mask = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "new.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
