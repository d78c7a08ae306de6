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


@contextlib.contextmanager
def atomic_paths(*paths: str | Path, suffix: str = ".tmp") -> Iterator[list[Path]]:
    """Temporary paths for files that belong together (a partition's CSV and its GeoJSON): none replaces
    its file until the block has written them all, so a failure while writing leaves every old file."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path, suffix)) for path in paths]


def temporary_pattern(name_glob: str = "*", suffix: str = ".tmp") -> str:
    """The glob of the hidden temporaries ``atomic_path`` makes for files whose names match ``name_glob``."""
    return f".{name_glob}.*{suffix}"


def remove_stale_temporaries(folder: str | Path, name_glob: str = "*", suffix: str = ".tmp") -> list[Path]:
    """Remove the hidden temporaries that a killed writer (SIGKILL, power loss: no ``finally`` ran) left in
    ``folder`` for files matching ``name_glob``; returns what was removed. Call it where one writer owns
    the folder's files (an export's output, an index directory), before writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for temp in sorted(folder.glob(temporary_pattern(name_glob, suffix))):
        if temp.is_file():
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8", newline="")


def write_json_atomic(path: str | Path, payload: Any, **dumps_options: Any) -> None:
    write_text_atomic(path, json.dumps(payload, **dumps_options))


def write_csv_atomic(path: str | Path, rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buffer.getvalue())
