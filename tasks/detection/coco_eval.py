"""COCO bbox evaluation: COCOeval's numbers (pycocotools' algorithm) for a detector's results.

The default engine is faster-coco-eval's C++ COCOeval, which gives pycocotools' numbers several times faster;
``engine="pycocotools"`` runs the reference implementation itself (the tests compare the two on the same
files). ``mobilenets detect-eval`` (``tasks/cli/detect_eval.py``) is the command around it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.tasks.paper import paper_table

Engine = Literal["faster", "pycocotools"]

#: COCOeval.summarize()'s twelve bbox numbers, in its order.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)
COCO_STAT_LABELS: tuple[str, ...] = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)
#: Table 13's MobileNet rows (``tasks/paper.py``) as ``format_result`` prints them: config name → (mAP %,
#: billion mult-adds, million parameters).
PAPER_TABLE13: dict[str, tuple[float, float, float]] = {
    row.model.removesuffix(" MobileNet"): (row.metric, row.million_mult_adds / 1000, row.million_parameters)
    for row in paper_table(13)
    if row.width_mult is not None and row.million_mult_adds is not None and row.million_parameters is not None
}


class ResultsFormatError(MobilenetsError, ValueError):
    """A COCO results file that cannot be evaluated; the message names the file and the entry."""


@dataclass(frozen=True)
class CocoEvalResult:
    """COCOeval's 12 bbox numbers and the per-category AP (IoU 0.50:0.95, all areas, 100 detections)."""

    stats: tuple[float, ...]
    per_category: tuple[tuple[int, str, float], ...]
    num_images: int
    num_detections: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return dict(zip(COCO_STAT_NAMES, self.stats))


def write_results_json(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a COCO results list (``image_id``, ``category_id``, ``bbox`` [x,y,w,h], ``score``) atomically."""
    path = Path(path)
    write_text_atomic(path, json.dumps(list(results)))
    return path


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ResultsFormatError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ResultsFormatError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _box_problem(bbox: Any) -> str | None:
    """What is wrong with a COCO ``[x, y, width, height]`` box, or None. COCO's tools accept a zero or
    negative width silently (an impossible box that can match nothing, or one that matches wrongly)."""
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return f"'bbox' must be [x, y, width, height] of numbers, got {bbox!r}"
    if not all(math.isfinite(v) for v in bbox):
        return f"'bbox' {list(bbox)} is not finite"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"'bbox' {list(bbox)} has a width or height <= 0 (expected [x, y, width > 0, height > 0])"
    return None


def check_results(results: Sequence[Any], source: str) -> None:
    """Each detection has ``image_id``, ``category_id``, a box of positive size and a finite numeric
    ``score``; the message names ``source`` and the entry's index."""
    for index, det in enumerate(results):
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            raise ResultsFormatError(
                f"{source}: entry {index} needs 'image_id', 'category_id', 'bbox' and 'score'"
            )
        problem = _box_problem(det["bbox"])
        if problem:
            raise ResultsFormatError(f"{source}: entry {index}: {problem}")
        score = det["score"]
        if not _is_number(score) or not math.isfinite(score):
            # pycocotools ranks a NaN score anywhere and faster-coco-eval fails: neither is a result
            raise ResultsFormatError(
                f"{source}: entry {index}: 'score' must be a finite number, got {score!r}"
            )


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a COCO results file, checking each entry's keys, box and score."""
    path = Path(path)
    results = _read_json(path, "results")
    if not isinstance(results, list):
        raise ResultsFormatError(f"{path}: expected a JSON list of detections, got {type(results).__name__}")
    check_results(results, str(path))
    return results


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read a COCO instances file for evaluation (kept free of the training stack's imports)."""
    path = Path(path)
    payload = _read_json(path, "annotation")
    if not isinstance(payload, dict):
        raise ResultsFormatError(f"{path}: expected a JSON object with images/annotations/categories")
    check_ground_truth(payload, str(path))
    return payload


def check_ground_truth(payload: dict[str, Any], source: str) -> None:
    """The instances file is one COCOeval can score faithfully: unique image and category ids, and every
    annotation on a listed image, of a listed category, with a box of positive size. COCO's tools accept each
    of these silently (a duplicate image id overwrites, a box of zero width can never match)."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(payload.get(key), list):
            raise ResultsFormatError(f"{source}: missing or non-list key {key!r} (COCO instances format)")
    for key in ("images", "categories"):
        seen: set[Any] = set()
        for index, entry in enumerate(payload[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ResultsFormatError(f"{source}: {key}[{index}] has no 'id'")
            if entry["id"] in seen:
                raise ResultsFormatError(
                    f"{source}: {key}[{index}] repeats id {entry['id']!r} (ids must be unique)"
                )
            seen.add(entry["id"])
    image_ids = {image["id"] for image in payload["images"]}
    category_ids = {category["id"] for category in payload["categories"]}
    annotation_ids: set[Any] = set()
    for index, ann in enumerate(payload["annotations"]):
        where = f"{source}: annotations[{index}]"
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= ann.keys():
            raise ResultsFormatError(f"{where} needs 'image_id', 'category_id' and 'bbox'")
        where += f" (id {ann['id']})" if "id" in ann else ""
        if "id" in ann:
            if ann["id"] in annotation_ids:
                raise ResultsFormatError(f"{where} repeats an annotation id (ids must be unique)")
            annotation_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise ResultsFormatError(
                f"{where} is on image_id {ann['image_id']!r}, which 'images' does not list"
            )
        if ann["category_id"] not in category_ids:
            raise ResultsFormatError(
                f"{where} has category_id {ann['category_id']!r}, which 'categories' does not define"
            )
        problem = _box_problem(ann["bbox"])
        if problem:
            raise ResultsFormatError(f"{where}: {problem}")


def _check_results_match(
    results: Sequence[dict[str, Any]], ground_truth: dict[str, Any], source: str
) -> None:
    image_ids = {image["id"] for image in ground_truth["images"]}
    category_ids = {category["id"] for category in ground_truth["categories"]}
    for index, det in enumerate(results):
        if det["image_id"] not in image_ids:
            raise ResultsFormatError(
                f"{source}: entry {index} has image_id {det['image_id']} that the annotations do not list"
            )
        if det["category_id"] not in category_ids:
            raise ResultsFormatError(
                f"{source}: entry {index} has category_id {det['category_id']} that the annotations do not "
                f"define (results must carry the dataset's category ids, not contiguous labels)"
            )


def _coco_eval(
    ground_truth: dict[str, Any],
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None,
    engine: Engine,
) -> Any:
    quiet = contextlib.redirect_stdout(io.StringIO())
    if engine == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        with quiet:
            gt = COCO(ground_truth)
            dt = gt.loadRes(results)
            evaluator = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with quiet:
            gt = COCO()
            gt.dataset = ground_truth
            gt.createIndex()
            dt = gt.loadRes(results)
            evaluator = COCOeval(gt, dt, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    with quiet:
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def evaluate_detections(
    ground_truth: dict[str, Any] | str | Path,
    results: Sequence[dict[str, Any]] | str | Path,
    image_ids: Sequence[int] | None = None,
    engine: Engine = "faster",
) -> CocoEvalResult:
    """COCOeval (bbox) of ``results`` against ``ground_truth`` (dicts or file paths).

    ``image_ids`` restricts the evaluation to those images (e.g. the ones a run actually saw). An empty
    results list scores 0 everywhere (COCO's tools refuse to load one).
    """
    start = time.perf_counter()
    # files are user input and checked entry by entry; dicts come from the suite's own loaders and models
    # (a detector may clip a box to zero width at the image border: it simply matches nothing)
    if isinstance(ground_truth, str | Path):
        ground_truth = load_ground_truth(ground_truth)
    source = str(results) if isinstance(results, str | Path) else "results"
    results = load_results(results) if isinstance(results, str | Path) else list(results)
    _check_results_match(results, ground_truth, source)
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    category_ids = sorted(names)
    num_images = len(image_ids) if image_ids is not None else len(ground_truth["images"])
    if not results:
        zero = tuple(0.0 for _ in COCO_STAT_NAMES)
        per_category = tuple((cid, names[cid], 0.0) for cid in category_ids)
        return CocoEvalResult(zero, per_category, num_images, 0, time.perf_counter() - start)
    evaluator = _coco_eval(ground_truth, results, image_ids, engine)
    stats = tuple(float(v) for v in evaluator.stats[:12])
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
    precision = np.asarray(evaluator.eval["precision"])
    eval_cat_ids = list(evaluator.params.catIds)
    per_category = []
    for cid in category_ids:
        values = precision[:, :, eval_cat_ids.index(cid), 0, -1]
        values = values[values > -1]
        per_category.append((cid, names[cid], float(values.mean()) if values.size else float("nan")))
    return CocoEvalResult(stats, tuple(per_category), num_images, len(results), time.perf_counter() - start)


def per_category_csv(result: CocoEvalResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category_id", "name", "AP"])
    for cid, name, ap in result.per_category:
        writer.writerow([cid, name, "" if math.isnan(ap) else f"{ap:.6f}"])
    return buffer.getvalue()


def format_result(
    result: CocoEvalResult,
    model_row: tuple[str, float, float] | None = None,
    paper: tuple[float, float, float] | None = None,
) -> str:
    """COCOeval's twelve lines, then Table 13's columns (mAP, billion mult-adds, million parameters)."""
    lines = [f" {label} = {value:0.3f}" for label, value in zip(COCO_STAT_LABELS, result.stats)]
    lines.append(
        f"({result.num_images} images, {result.num_detections} detections, evaluated in {result.seconds:.1f} s)"
    )
    if model_row is not None:
        name, billion_madds, million_params = model_row
        lines += [
            "",
            f"{'Table 13':<24}{'mAP':>8}{'B mult-adds':>13}{'M params':>10}",
            f"{name + ' (ours)':<24}{100 * result.stats[0]:>7.1f}%{billion_madds:>13.2f}{million_params:>10.2f}",
        ]
        if paper is not None:
            lines.append(f"{name + ' (paper)':<24}{paper[0]:>7.1f}%{paper[1]:>13.1f}{paper[2]:>10.1f}")
    return "\n".join(lines)
