"""Atomic file writes shared by every module that writes results: nothing half-written is left behind."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``: it replaces ``path`` when the block succeeds, and is removed when
    it fails, so readers only ever see the old file or the complete new one. A replaced file keeps its
    permissions; a new one gets the umask's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()  # mkstemp creates 0600; results are meant to be shared
        os.chmod(temp, mode)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8", newline="")


def write_json_atomic(path: str | Path, payload: Any, **dumps_options: Any) -> None:
    write_text_atomic(path, json.dumps(payload, **dumps_options))


def write_csv_atomic(path: str | Path, rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buffer.getvalue())
