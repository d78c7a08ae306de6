"""Embedding shards: face embeddings written by many processes (``mobilenets predict`` under DDP, several
jobs) and read back by ``mobilenets faces index build|add --embeddings FOLDER`` without running the model.

A shard is three files sharing a stem ``<prefix>.shard-<rank>-of-<world size>`` (ranks zero-padded to 5):

* ``<stem>.npy``: the float32 (N, D) embeddings, row i of image i of the table;
* ``<stem>.csv``: the table, a ``path,identity`` header then one row per embedding (absolute image paths;
  the identity is the image's folder name, as in ``GALLERY/<identity>/<image>``);
* ``<stem>.json``: the header, written last: format and version, N and D, the model that made the
  embeddings (``model``: its ``fingerprint`` — see ``model_fingerprint`` — α, input size, ...), and each
  data file's name, size in bytes and sha256.

Each file is written under a temporary name and renamed into place; the header goes last and a rewrite
removes the old header first, so a shard without its header is an interrupted write, reported as such. A
reader checks the sizes (truncation) and the table's checksum on opening and the array's checksum while it
streams the rows, and all shards of a folder against each other: one embedding size, one model, every rank
of each ``-of-<world size>`` group present, no image path in two shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import atomic_path, write_json_atomic, write_text_atomic
from mobilenets.tasks.teacher import file_sha256

SHARD_FORMAT = "mobilenets-face-embeddings"
SHARD_VERSION = 1
TABLE_HEADER = ("path", "identity")
#: rows read at a time when streaming a shard (32 MiB of 128-d float32)
STREAM_ROWS = 1 << 16
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)\.shard-(?P<rank>\d{5})-of-(?P<world>\d{5})$")


class ShardError(MobilenetsError, ValueError):
    """An embedding shard (or folder of them) that cannot be used; the message names the file."""


def shard_stem(prefix: str, rank: int, world_size: int) -> str:
    """``<prefix>.shard-<rank>-of-<world_size>``, both zero-padded to 5 digits (sorts by rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"shard rank {rank} outside 0..{world_size - 1}")
    return f"{prefix}.shard-{rank:05d}-of-{world_size:05d}"


# --------------------------------------------------------------------------- which model made them
def weights_fingerprint(state_dict: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes; CPU copies) and the ``settings`` that change
    the embeddings (α, input size, normalisation, ...): the same trained weights give the same fingerprint
    whether they come from a checkpoint file or a model in memory, on any device."""
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#: state-dict entries that do not change the embeddings (the calibrated "unknown" threshold)
NOT_EMBEDDING_STATE = ("threshold",)


def model_fingerprint(model: Any) -> str:
    """The fingerprint of a face-embedding task (``FaceEmbedder`` or anything with its ``state_dict()``,
    ``hparams``, ``normalization`` and ``embedding_size``): its weights and preprocessing; when it serves an
    exported ONNX file (``exported_network``), that file's sha256 instead of the weights."""
    mean, std = model.normalization
    settings = {
        "task": type(model).__name__,
        "embedding_size": int(model.embedding_size),
        "input_size": int(model.hparams.input_size),
        "width_mult": float(model.hparams.width_mult),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    exported = getattr(model, "exported_network", None)
    if exported is not None:
        return "onnx:" + weights_fingerprint(
            {}, {**settings, "export_sha256": file_sha256(Path(exported.path))}
        )
    state = {k: v for k, v in model.state_dict().items() if k not in NOT_EMBEDDING_STATE}
    return weights_fingerprint(state, settings)


# --------------------------------------------------------------------------- writing
def write_shard(
    folder: str | Path,
    stem: str,
    embeddings: np.ndarray,
    paths: Sequence[str | Path],
    identities: Sequence[str],
    model: Mapping[str, Any],
    embeddings_file: str | Path | None = None,
) -> Path:
    """Write one shard (``<stem>.npy``, ``.csv``, then the ``.json`` header) into ``folder``; returns the
    header's path. ``model`` must hold the ``fingerprint``. With ``embeddings_file``, an ``.npy`` already
    holding exactly ``embeddings``, the shard's array is a hard link to it (no second copy on disk) where
    the file system allows."""
    folder = Path(folder)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or not len(embeddings) == len(paths) == len(identities):
        raise ValueError(
            f"a shard needs (N, D) embeddings with N paths and identities, got {tuple(embeddings.shape)}, "
            f"{len(paths)} paths, {len(identities)} identities"
        )
    if not model.get("fingerprint"):
        raise ValueError("a shard's model entry needs its fingerprint")
    header_path, array_path, table_path = (folder / f"{stem}{suffix}" for suffix in (".json", ".npy", ".csv"))
    folder.mkdir(parents=True, exist_ok=True)
    header_path.unlink(missing_ok=True)  # until the new header lands, the shard reads as incomplete
    with atomic_path(array_path, ".npy") as temp:
        if not _link(embeddings_file, temp):
            with temp.open("wb") as stream:
                np.save(stream, embeddings)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_HEADER)
    writer.writerows((str(p), str(i)) for p, i in zip(paths, identities))
    write_text_atomic(table_path, buffer.getvalue())
    header = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "count": int(embeddings.shape[0]),
        "embedding_size": int(embeddings.shape[1]),
        "dtype": "float32",
        "model": dict(model),
        "embeddings": _file_record(array_path),
        "table": _file_record(table_path),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(header_path, header, indent=1)
    return header_path


def _link(source: str | Path | None, temp: Path) -> bool:
    """Replace ``temp`` by a hard link to ``source``; False where there is no source or no hard links."""
    if source is None:
        return False
    try:
        temp.unlink()
        os.link(source, temp)
    except OSError:
        return False
    return True


def _file_record(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# --------------------------------------------------------------------------- reading
@dataclass
class EmbeddingShard:
    """One shard, opened and checked: its header, table and where its rows start in the ``.npy``."""

    header_path: Path
    header: dict[str, Any]
    paths: list[str]
    identities: list[str]
    data_offset: int

    @property
    def name(self) -> str:
        return self.header_path.name

    @property
    def array_path(self) -> Path:
        return self.header_path.with_name(self.header["embeddings"]["file"])

    @property
    def count(self) -> int:
        return int(self.header["count"])

    @property
    def dim(self) -> int:
        return int(self.header["embedding_size"])

    @property
    def model(self) -> dict[str, Any]:
        return self.header["model"]

    @classmethod
    def open(cls, header_path: str | Path) -> EmbeddingShard:
        """Read and check a shard's header, the sizes of its files, its table and its array's shape."""
        header_path = Path(header_path)
        if not header_path.is_file():
            raise ShardError(f"{header_path}: shard header missing")
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ShardError(f"{header_path}: unreadable shard header ({error})") from error
        if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
            raise ShardError(f"{header_path}: not a face-embedding shard header (format {SHARD_FORMAT!r})")
        if header.get("version") != SHARD_VERSION:
            raise ShardError(
                f"{header_path}: shard format version {header.get('version')}, expected {SHARD_VERSION}"
            )
        for key in ("count", "embedding_size", "model", "embeddings", "table"):
            if key not in header:
                raise ShardError(f"{header_path}: shard header lacks the {key!r} entry")
        if not header["model"].get("fingerprint"):
            raise ShardError(f"{header_path}: shard header names no model fingerprint ('model.fingerprint')")
        for key in ("embeddings", "table"):
            _check_size(header_path, header[key])
        table_path = header_path.with_name(header["table"]["file"])
        paths, identities = _read_table(table_path, header["table"]["sha256"])
        count, dim = int(header["count"]), int(header["embedding_size"])
        if len(paths) != count:
            raise ShardError(f"{table_path}: {len(paths)} rows, its header {header_path.name} says {count}")
        array_path = header_path.with_name(header["embeddings"]["file"])
        with array_path.open("rb") as stream:
            try:
                version = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(stream)
            except ValueError as error:
                raise ShardError(f"{array_path}: not a .npy array ({error})") from error
            offset = stream.tell()
        if shape != (count, dim) or dtype != np.float32 or fortran:
            raise ShardError(
                f"{array_path}: a {dtype} array of shape {shape}, its header {header_path.name} says "
                f"float32 ({count}, {dim})"
            )
        return cls(header_path, header, paths, identities, offset)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a fresh array (plain reads, not a memory map: the process keeps only what
        it asked for)."""
        dim = self.dim
        with self.array_path.open("rb") as stream:
            stream.seek(self.data_offset + 4 * dim * start)
            out = np.fromfile(stream, dtype=np.float32, count=(stop - start) * dim)
        if out.size != (stop - start) * dim:
            raise ShardError(f"{self.array_path}: truncated (rows {start}:{stop} of {self.count} missing)")
        return out.reshape(stop - start, dim)

    def iter_rows(self, batch_rows: int = STREAM_ROWS) -> Iterator[np.ndarray]:
        """The rows in order, ``batch_rows`` at a time; the file's sha256 is checked at the end (a shard
        changed since its header was written is an error naming it)."""
        digest = hashlib.sha256()
        dim = self.dim
        with self.array_path.open("rb") as stream:
            digest.update(stream.read(self.data_offset))
            for start in range(0, self.count, batch_rows):
                rows = min(batch_rows, self.count - start)
                chunk = np.fromfile(stream, dtype=np.float32, count=rows * dim)
                if chunk.size != rows * dim:
                    raise ShardError(f"{self.array_path}: truncated at row {start}")
                digest.update(chunk.data)
                yield chunk.reshape(rows, dim)
            digest.update(stream.read())
        if digest.hexdigest() != self.header["embeddings"]["sha256"]:
            raise ShardError(
                f"{self.array_path}: contents differ from the sha256 in {self.header_path.name} "
                "(corrupt, or rewritten without its header)"
            )


def _check_size(header_path: Path, record: Any) -> None:
    if not isinstance(record, dict) or not {"file", "bytes", "sha256"} <= set(record):
        raise ShardError(f"{header_path}: a file entry needs 'file', 'bytes' and 'sha256', got {record!r}")
    path = header_path.with_name(str(record["file"]))
    if not path.is_file():
        raise ShardError(f"{path}: shard file missing (named in {header_path.name})")
    size = path.stat().st_size
    if size != int(record["bytes"]):
        what = "truncated" if size < int(record["bytes"]) else "longer than written"
        raise ShardError(
            f"{path}: {what}: {size} bytes, its header {header_path.name} says {record['bytes']}"
        )


def _read_table(path: Path, sha256: str) -> tuple[list[str], list[str]]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"{path}: contents differ from the sha256 in its shard header (corrupt?)")
    rows = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    if tuple(next(rows, ())) != TABLE_HEADER:
        raise ShardError(f"{path}: line 1: expected the header {','.join(TABLE_HEADER)}")
    paths, identities = [], []
    for line, row in enumerate(rows, start=2):
        if len(row) != 2:
            raise ShardError(f"{path}: line {line}: expected 2 cells (path, identity), got {len(row)}")
        paths.append(row[0])
        identities.append(row[1])
    return paths, identities


class ShardSet:
    """Every shard of a folder (``*.shard-NNNNN-of-NNNNN.json``), checked against each other, read as one
    table of ``count`` rows in shard order (by name, so by rank)."""

    def __init__(self, folder: Path, shards: list[EmbeddingShard]) -> None:
        self.folder = folder
        self.shards = shards
        self.starts = np.cumsum([0] + [s.count for s in shards])

    @classmethod
    def open(cls, folder: str | Path) -> ShardSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise ShardError(f"{folder}: embedding shard folder not found")
        files = sorted(p for p in folder.iterdir() if p.is_file() and _SHARD_NAME.match(p.stem))
        headers = [p for p in files if p.suffix == ".json"]
        for path in files:
            if path.suffix in (".npy", ".csv") and not path.with_suffix(".json").is_file():
                raise ShardError(
                    f"{path}: shard without its header {path.with_suffix('.json').name} (an interrupted "
                    "write? rerun the predict that makes it, or remove the shard's files)"
                )
        if not headers:
            raise ShardError(f"{folder}: no embedding shards (*.shard-NNNNN-of-NNNNN.json) in this folder")
        _check_complete(folder, headers)
        shards = [EmbeddingShard.open(h) for h in headers]
        first = shards[0]
        for shard in shards[1:]:
            if shard.dim != first.dim:
                raise ShardError(
                    f"{shard.header_path}: {shard.dim}-d embeddings, {first.name} has {first.dim}-d "
                    "(shards of different models?)"
                )
            if shard.model["fingerprint"] != first.model["fingerprint"]:
                raise ShardError(
                    f"{shard.header_path}: made by another model than {first.name} (fingerprint "
                    f"{shard.model['fingerprint'][:12]}…, not {first.model['fingerprint'][:12]}…)"
                )
        owner: dict[str, str] = {}
        for shard in shards:
            for path in shard.paths:
                other = owner.get(path)
                if other == shard.name:
                    raise ShardError(f"{path}: listed twice in the shard {shard.header_path}")
                if other is not None:
                    raise ShardError(f"{path}: in two shards, {folder / other} and {shard.header_path}")
                owner[path] = shard.name
        return cls(folder, shards)

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.shards[0].model)

    @property
    def paths(self) -> list[str]:
        return [p for s in self.shards for p in s.paths]

    @property
    def identities(self) -> list[str]:
        return [i for s in self.shards for i in s.identities]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """The rows at sorted global ``indices`` (a training sample), read shard by shard in chunks."""
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        done = 0
        for number, shard in enumerate(self.shards):
            local = indices[which == number] - self.starts[number]
            for begin in range(0, len(local), STREAM_ROWS):
                part = local[begin : begin + STREAM_ROWS]
                block = shard.read_rows(int(part[0]), int(part[-1]) + 1)
                out[done : done + len(part)] = block[part - part[0]]
                done += len(part)
        return out

    def iter_rows(self, batch_rows: int = STREAM_ROWS) -> Iterator[np.ndarray]:
        """Every row in order, ``batch_rows`` (or fewer) at a time, each shard's checksum checked."""
        for shard in self.shards:
            yield from shard.iter_rows(batch_rows)

    def describe(self) -> str:
        return f"{self.folder}: {len(self.shards)} shard(s), {self.count} faces, {self.dim}-d"


def _check_complete(folder: Path, headers: list[Path]) -> None:
    """Every rank 0..N-1 of each ``<prefix>.shard-…-of-N`` group has its header."""
    groups: dict[tuple[str, int], set[int]] = {}
    for header in headers:
        match = _SHARD_NAME.match(header.stem)
        assert match is not None  # listed by the same pattern
        groups.setdefault((match["prefix"], int(match["world"])), set()).add(int(match["rank"]))
    for (prefix, world), ranks in sorted(groups.items()):
        for rank in range(world):
            if rank not in ranks:
                missing = folder / f"{shard_stem(prefix, rank, world)}.json"
                raise ShardError(
                    f"{missing}: shard missing ({len(ranks)} of the {world} shards of {prefix!r} found)"
                )
