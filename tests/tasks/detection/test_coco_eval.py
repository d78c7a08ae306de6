"""detect-eval: numbers identical to a direct pycocotools COCOeval call, per-category AP, CLI, errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mobilenets.datasets.synthetic_detection import make_eval_set
from mobilenets.tasks.cli.detect_eval import main
from mobilenets.tasks.detection.coco_eval import (
    COCO_STAT_NAMES,
    ResultsFormatError,
    evaluate_detections,
)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coco_eval")
    ground_truth, results = make_eval_set(num_images=60, dets_per_image=40, num_categories=12, seed=3)
    gt_path, res_path = root / "instances_val.json", root / "detections.json"
    gt_path.write_text(json.dumps(ground_truth))
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


def reference_pycocotools(gt_path: Path, res_path: Path) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_numbers_equal_pycocotools_to_the_last_digit(eval_files: tuple[Path, Path]) -> None:
    gt_path, res_path = eval_files
    reference = reference_pycocotools(gt_path, res_path)
    ours = evaluate_detections(gt_path, res_path)  # faster-coco-eval engine
    assert len(ours.stats) == 12
    assert list(ours.stats) == [float(v) for v in reference.stats]  # exact, not approximate
    assert 0.05 < ours.stats[0] < 0.95  # a real mix of hits and misses, not a degenerate 0 or 1
    slow = evaluate_detections(gt_path, res_path, engine="pycocotools")
    assert slow.stats == ours.stats and slow.per_category == ours.per_category
    # per-category AP: the precision array's mean for that category, as COCO's tools compute it
    precision = reference.eval["precision"]
    cat_ids = reference.params.catIds
    for cid, _name, ap in ours.per_category:
        values = precision[:, :, cat_ids.index(cid), 0, -1]
        assert ap == float(values[values > -1].mean())


def test_image_subset_matches_pycocotools_img_ids(eval_files: tuple[Path, Path]) -> None:
    gt_path, res_path = eval_files
    subset = list(range(1, 31))
    ours = evaluate_detections(gt_path, res_path, image_ids=subset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
        evaluator.params.imgIds = subset
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert list(ours.stats) == [float(v) for v in evaluator.stats]


def test_cli_results_mode_prints_12_numbers_and_writes_csv(
    eval_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    gt_path, res_path = eval_files
    assert main(["--results", str(res_path), "--annotations", str(gt_path), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6
    reference = reference_pycocotools(gt_path, res_path)
    assert f"= {reference.stats[1]:0.3f}" in printed
    rows = list(csv.DictReader((tmp_path / "per_category_ap.csv").open()))
    assert len(rows) == 12 and rows[0]["category_id"] == "1"
    saved = json.loads((tmp_path / "coco_eval.json").read_text())
    assert list(saved) == list(COCO_STAT_NAMES) and saved["AP"] == float(reference.stats[0])


def test_bad_results_are_named(eval_files: tuple[Path, Path], tmp_path: Path) -> None:
    gt_path, _ = eval_files
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},\n{')
    with pytest.raises(ResultsFormatError, match=r"bad\.json: not valid JSON at line 2"):
        evaluate_detections(gt_path, bad)
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    with pytest.raises(
        ResultsFormatError, match=r"entry 0 has category_id 9 that the annotations do not define"
    ):
        evaluate_detections(gt_path, bad)
    bad.write_text(json.dumps([{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    with pytest.raises(ResultsFormatError, match=r"entry 0 has image_id 99999"):
        evaluate_detections(gt_path, bad)
    bad.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 5, 5]}]))
    with pytest.raises(
        ResultsFormatError, match=r"entry 0 needs 'image_id', 'category_id', 'bbox' and 'score'"
    ):
        evaluate_detections(gt_path, bad)
    empty = evaluate_detections(gt_path, [])
    assert empty.stats == (0.0,) * 12 and empty.num_detections == 0
