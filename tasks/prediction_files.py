"""The rows of the prediction CSVs that ``mobilenets predict`` (the tasks' predict loops) and
``mobilenets onnx-predict`` both write, so that one model gives the same columns either way, and where
``predict`` puts its files.

Kept free of Lightning, ONNX and task imports: both sides import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
        path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
    return path
