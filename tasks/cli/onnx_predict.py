"""``mobilenets onnx-predict``: run an exported ONNX model (float or int8) on images with ONNX Runtime.

Images are prepared exactly like the task's eval transform, from the model's own metadata (input size,
mean, std), and the CSV follows the model's ``output_kind``:

- ``logits`` (classifier, geolocation cells): ``path, class1_index, class1_name, class1_probability, ...``
  for the top-k softmax probabilities, the same columns as the classifier's ``mobilenets predict``;
- ``multilabel_logits`` (attributes): ``path`` then one sigmoid probability per attribute;
- ``embedding``: ``path`` then the embedding's components.

The attribute and embedding rows come from ``tasks/prediction_files.py``, shared with the tasks' own
``mobilenets predict`` loops.

Detection models export raw box deltas and class logits; they need the task's documented post-processing
(anchors, decoding, NMS), so this command refuses them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mobilenets.datasets.atomic import write_csv_atomic
from mobilenets.datasets.images import images_in_folder
from mobilenets.tasks.deploy.export import (
    ExportError,
    onnx_metadata,
    ort_session,
    output_kind,
    parse_name_list,
    preprocess_images,
    run_onnx,
)
from mobilenets.tasks.prediction_files import embedding_rows, multilabel_rows, topk_rows


def onnx_predict(
    onnx_path: str | Path,
    paths: Sequence[Path],
    batch_size: int = 16,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[list[np.ndarray], dict[str, str]]:
    """Outputs of the ONNX model on ``paths`` (each output concatenated over the images) and its metadata."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: ONNX model not found")
    metadata = onnx_metadata(onnx_path)
    session = ort_session(onnx_path, threads)
    chunks: list[list[np.ndarray]] = []
    with tqdm(
        total=len(paths),
        desc=f"onnx-predict {onnx_path.name}",
        unit="image",
        disable=None if progress else True,  # None: a bar on a terminal only, not in logs or pipes
    ) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            chunks.append(run_onnx(session, preprocess_images(batch, metadata)))
            bar.update(len(batch))
    outputs = (
        [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))] if chunks else []
    )
    return outputs, metadata


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def prediction_rows(
    paths: Sequence[Path], outputs: list[np.ndarray], metadata: dict[str, str], top_k: int = 5
) -> list[list[str]]:
    """The CSV rows (header first) for the model's output kind."""
    kind = output_kind(metadata)
    first = outputs[0]
    if kind == "logits":
        probabilities = _softmax(first.astype(np.float64))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        top = np.take_along_axis(probabilities, order, axis=1)
        return topk_rows(paths, order, top, parse_name_list(metadata.get("class_names")))
    if kind == "multilabel_logits":
        names = parse_name_list(metadata.get("attribute_names") or metadata.get("attributes"))
        if len(names) != first.shape[1]:
            names = [f"attribute{i}" for i in range(first.shape[1])]
        return multilabel_rows(paths, first, names, present_column=True)
    if kind == "embedding":
        return embedding_rows(paths, first)
    raise ExportError(
        f"output_kind {kind!r}: raw detection outputs need the task's post-processing "
        "(see the detection task's ssd_postprocess); onnx-predict does not decode them"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mobilenets onnx-predict",
        description="Run an exported ONNX model (float or int8) on a folder of images with ONNX Runtime and "
        "write a CSV: top-k classes for classifiers, probabilities for attributes, embeddings.",
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="an .onnx file written by mobilenets export"
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    paths = images_in_folder(args.images, "--images", ExportError)
    outputs, metadata = onnx_predict(args.model, paths, args.batch_size, args.threads)
    rows = prediction_rows(paths, outputs, metadata, args.top_k)
    write_csv_atomic(args.out, rows)
    print(f"wrote predictions of {len(paths)} images ({output_kind(metadata)}) to {args.out}")
    return 0
