"""The shared atomic writes: old or new file, never half of one; permissions of a replaced file kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mobilenets.datasets.atomic import atomic_path, atomic_paths, remove_stale_temporaries, write_text_atomic


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


def test_files_written_as_a_pair_are_replaced_together_or_not_at_all(tmp_path: Path) -> None:
    first, second = tmp_path / "cells.csv", tmp_path / "cells.geojson"
    write_text_atomic(first, "old csv")
    write_text_atomic(second, "old json")
    with pytest.raises(OSError, match="disk full"), atomic_paths(first, second) as (temp_a, temp_b):
        temp_a.write_text("new csv")  # the first is complete ...
        temp_b.write_text("{half")
        raise OSError("disk full")  # ... the second fails: neither is replaced
    assert (first.read_text(), second.read_text()) == ("old csv", "old json")
    with atomic_paths(first, second) as (temp_a, temp_b):
        temp_a.write_text("new csv")
        temp_b.write_text("new json")
    assert (first.read_text(), second.read_text()) == ("new csv", "new json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "cells.geojson"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    # what SIGKILL during atomic_path leaves (no finally runs), beside files that must stay
    for name in (".model.onnx.ab12cd34.tmp", ".other.onnx.ef56gh78.tmp", ".meta.json.ij90kl12.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    for name in ("model.onnx", ".hidden_config", "notes.tmp"):
        (tmp_path / name).write_bytes(b"keep")
    removed = remove_stale_temporaries(tmp_path, "*.onnx")
    assert sorted(p.name for p in removed) == [".model.onnx.ab12cd34.tmp", ".other.onnx.ef56gh78.tmp"]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [".hidden_config", ".meta.json.ij90kl12.tmp", "model.onnx", "notes.tmp"]
    assert remove_stale_temporaries(tmp_path / "missing") == []
