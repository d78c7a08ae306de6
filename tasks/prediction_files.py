"""The rows of the prediction CSVs that ``mobilenets predict`` (the tasks' predict loops) and
``mobilenets onnx-predict`` both write, so that one model gives the same columns either way, where
``predict`` puts its files, and how the per-process shards of a DDP ``predict`` become one file.

Kept free of Lightning, ONNX and task imports: both sides import it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import atomic_path, write_csv_atomic, write_text_atomic


class PredictShardError(MobilenetsError, ValueError):
    """A per-process predict shard that is missing or does not fit the others; the message names it."""


#: Column of the attribute CSV of ``mobilenets predict`` listing the attributes predicted present.
PRESENT_COLUMN = "present_attributes"
#: An attribute is predicted present at this sigmoid probability or above.
PRESENT_THRESHOLD = 0.5


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Float64 sigmoid of ``logits`` (very negative logits give 0 without an overflow warning)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def topk_rows(
    paths: Sequence[str | Path], indices: np.ndarray, probabilities: np.ndarray, names: Sequence[str]
) -> list[list[str]]:
    """CSV rows (header first) of a classifier's top-k: ``path``, then per rank ``class<r>_index``,
    ``class<r>_name`` and ``class<r>_probability`` (6 decimals); ``indices`` and ``probabilities`` are
    (N, k), best first. A class without a name is named by its index."""
    k = indices.shape[1] if indices.ndim == 2 else 0
    if indices.shape != probabilities.shape or len(indices) != len(paths):
        raise ValueError(
            f"top-k rows: expected ({len(paths)}, k) indices and probabilities, "
            f"got {tuple(indices.shape)} and {tuple(probabilities.shape)}"
        )
    header = ["path"]
    for rank in range(1, k + 1):
        header += [f"class{rank}_index", f"class{rank}_name", f"class{rank}_probability"]
    rows = [header]
    for path, row_indices, row_probabilities in zip(paths, indices.tolist(), probabilities.tolist()):
        cells = [str(path)]
        for index, probability in zip(row_indices, row_probabilities):
            cells += [str(index), names[index] if index < len(names) else str(index), f"{probability:.6f}"]
        rows.append(cells)
    return rows


def multilabel_rows(
    paths: Sequence[str | Path],
    logits: np.ndarray,
    names: Sequence[str],
    present_column: bool = False,
) -> list[list[str]]:
    """CSV rows (header first) of multi-label logits: ``path``, then the sigmoid probability of each
    attribute (6 decimals) under its name, and with ``present_column`` the ``;``-joined names of the
    attributes whose probability is at least ``PRESENT_THRESHOLD``."""
    probabilities = sigmoid(logits)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(names) or len(probabilities) != len(paths):
        raise ValueError(
            f"multilabel rows: expected ({len(paths)}, {len(names)}) logits for {len(paths)} images and "
            f"{len(names)} attribute names, got shape {tuple(probabilities.shape)}"
        )
    header = ["path", *names] + ([PRESENT_COLUMN] if present_column else [])
    rows = [header]
    for path, row in zip(paths, probabilities):
        cells = [str(path), *(f"{v:.6f}" for v in row)]
        if present_column:
            cells.append(";".join(name for name, v in zip(names, row) if v >= PRESENT_THRESHOLD))
        rows.append(cells)
    return rows


def embedding_rows(paths: Sequence[str | Path], embeddings: np.ndarray) -> list[list[str]]:
    """CSV rows (header first) of embeddings: ``path, e0, ..., e{D-1}`` (7 significant digits)."""
    if embeddings.ndim != 2 or len(embeddings) != len(paths):
        raise ValueError(
            f"embedding rows: expected ({len(paths)}, D) embeddings for {len(paths)} images, "
            f"got shape {tuple(embeddings.shape)}"
        )
    header = ["path", *(f"e{i}" for i in range(embeddings.shape[1]))]
    return [header] + [[str(p), *(f"{v:.7g}" for v in row)] for p, row in zip(paths, embeddings)]


def predict_output_path(trainer: Any, file: str | Path | None, default_name: str) -> Path:
    """Where a predict loop writes: ``file``, else ``default_name`` in the trainer's log dir; under
    several processes each writes its own ``<stem>.rank<N><suffix>`` (the images are split between them).

    Calls ``trainer.log_dir``, which synchronises processes: call it on every rank."""
    path = Path(file) if file else Path(trainer.log_dir or trainer.default_root_dir) / default_name
    if trainer.world_size > 1:
        path = shard_path(path, trainer.global_rank)
    return path


def shard_path(path: str | Path, rank: int) -> Path:
    """Process ``rank``'s shard of ``path``: ``<stem>.rank<N><suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def merge_predict_shards(
    trainer: Any, shard: str | Path, merge: Callable[[list[Path], Path], None] | None = None
) -> Path:
    """After every process of a DDP ``predict`` has written its shard (``predict_output_path``), process 0
    merges them into the one file they are shards of and removes them; returns that file (on every
    process). With one process ``shard`` is already that file and is returned as it is.

    ``merge(shards, output)`` writes ``output`` from the shards in rank order (default:
    ``merge_csv_shards``). Call it on every process: it waits for all of them twice (shards written,
    merged file in place)."""
    shard = Path(shard)
    if trainer.world_size <= 1:
        return shard
    suffix = f".rank{trainer.global_rank}"
    if not shard.stem.endswith(suffix):
        raise ValueError(
            f"{shard}: not a shard of process {trainer.global_rank} (expected '*{suffix}{shard.suffix}')"
        )
    output = shard.with_name(shard.stem.removesuffix(suffix) + shard.suffix)
    trainer.strategy.barrier("predict shards written")
    if trainer.is_global_zero:
        shards = [shard_path(output, rank) for rank in range(trainer.world_size)]
        for path in shards:
            if not path.is_file():
                raise PredictShardError(f"{path}: predict shard of process {shards.index(path)} not found")
        (merge or merge_csv_shards)(shards, output)
        for path in shards:
            path.unlink()
    trainer.strategy.barrier("predict shards merged")
    return output


def interleave(parts: Sequence[Sequence[Any]], names: Sequence[str | Path] | None = None) -> list[Any]:
    """The items of the processes' shares back in the order of one process: DDP's evaluation and predict
    samplers give process ``r`` of ``n`` positions ``r, r + n, r + 2n, ...``, so item ``i`` of part ``r``
    was item ``r + i·n``. A part whose size cannot come from such a split (the sizes fall by at most one,
    once, from process 0's) raises ``PredictShardError`` naming it (``names``, else its rank)."""
    first = previous = len(parts[0]) if parts else 0
    for rank, part in enumerate(parts):
        allowed = (first, first - 1) if previous == first else (previous,)
        if len(part) not in allowed:
            name = names[rank] if names is not None else f"part {rank}"
            expected = " or ".join(str(n) for n in allowed if n >= 0)
            raise PredictShardError(
                f"{name}: {len(part)} rows, expected {expected} (process 0's share has {first}; "
                "the shares of the images differ by at most one)"
            )
        previous = len(part)
    total, count = sum(len(part) for part in parts), len(parts)
    return [parts[position % count][position // count] for position in range(total)]


def merge_csv_shards(shards: list[Path], output: Path) -> None:
    """One CSV from the processes' shards: the header they share, then their rows in single-process
    order (``interleave``); written atomically."""
    header: list[str] | None = None
    parts: list[list[list[str]]] = []
    for shard in shards:
        with shard.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.reader(stream))
        if not rows:
            raise PredictShardError(f"{shard}: empty predict shard (expected at least the header row)")
        if header is None:
            header = rows[0]
        elif rows[0] != header:
            raise PredictShardError(f"{shard}: header {rows[0]} differs from {shards[0]}'s {header}")
        parts.append(rows[1:])
    write_csv_atomic(output, [header or [], *interleave(parts, shards)])


def merge_npy_shards(shards: list[Path], output: Path) -> None:
    """One ``.npy`` from the processes' shards: their rows in single-process order (``interleave``);
    written atomically."""
    parts = [np.load(shard) for shard in shards]
    for shard, part in zip(shards[1:], parts[1:]):
        if part.shape[1:] != parts[0].shape[1:]:
            raise PredictShardError(
                f"{shard}: rows of shape {part.shape[1:]}, but {shards[0]}'s are {parts[0].shape[1:]} "
                "(shards of different row shapes)"
            )
    rows = interleave([list(part) for part in parts], shards)
    merged = np.stack(rows) if rows else np.concatenate(parts)
    with atomic_path(output, ".npy") as temp, temp.open("wb") as stream:
        np.save(stream, merged)


def merge_json_shards(shards: list[Path], output: Path, order: Callable[[dict[str, Any]], Any]) -> None:
    """One JSON list from the processes' JSON-list shards, stably sorted by ``order(entry)`` (e.g. the image's
    position in the predict folder); written atomically."""
    entries: list[dict[str, Any]] = []
    for shard in shards:
        try:
            part = json.loads(shard.read_text(encoding="utf-8"))
        except ValueError as error:
            raise PredictShardError(f"{shard}: not a JSON predict shard ({error})") from error
        if not isinstance(part, list):
            raise PredictShardError(f"{shard}: expected a JSON list, got {type(part).__name__}")
        entries += part
    write_text_atomic(output, json.dumps(sorted(entries, key=order)))
