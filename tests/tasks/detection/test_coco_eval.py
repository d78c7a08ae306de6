"""detect-eval: numbers identical to a direct pycocotools COCOeval call, per-category AP, CLI, errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mobilenets.datasets.synthetic.coco import make_coco_eval_set
from mobilenets.tasks.cli.detect_eval import main
from mobilenets.tasks.detection.coco_eval import (
    COCO_STAT_NAMES,
    ResultsFormatError,
    evaluate_detections,
)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coco_eval")
    ground_truth, results = make_coco_eval_set(num_images=60, dets_per_image=40, num_categories=12, seed=3)
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


def _mutated(gt_path: Path, res_path: Path, where: str, change: Any) -> tuple[dict, list]:
    ground_truth, results = json.loads(gt_path.read_text()), json.loads(res_path.read_text())
    change(ground_truth if where == "gt" else results)
    return ground_truth, results


def _set(path: str, value: Any) -> Any:
    """A change to a nested JSON value: ``path`` like ``annotations.3.bbox.2``."""

    def change(payload: Any) -> None:
        *parents, last = path.split(".")
        for key in parents:
            payload = payload[int(key)] if key.isdigit() else payload[key]
        payload[int(last) if last.isdigit() else last] = value

    return change


@pytest.mark.parametrize(
    ("where", "change", "message"),
    [
        ("gt", _set("annotations.3.bbox.2", 0), r"annotations\[3\] \(id \d+\): 'bbox' \[.*\] has a width or height <= 0"),
        ("gt", _set("annotations.5.bbox.3", -2.5), r"annotations\[5\] \(id \d+\): 'bbox' \[.*\] has a width or height <= 0"),
        ("gt", _set("annotations.4.category_id", 77), r"annotations\[4\] \(id \d+\) has category_id 77, which 'categories' does not define"),
        ("gt", _set("annotations.6.image_id", 4242), r"annotations\[6\] \(id \d+\) is on image_id 4242, which 'images' does not list"),
        ("gt", _set("images.7.id", 1), r"images\[7\] repeats id 1 \(ids must be unique\)"),
        ("res", _set("2.bbox.2", -1.0), r"entry 2: 'bbox' \[.*\] has a width or height <= 0"),
        ("res", _set("8.bbox.3", 0.0), r"entry 8: 'bbox' \[.*\] has a width or height <= 0"),
        ("res", _set("9.category_id", 77), r"entry 9 has category_id 77 that the annotations do not define"),
        ("res", _set("4.score", float("nan")), r"entry 4: 'score' must be a finite number, got nan"),
        ("res", _set("5.score", "0.9"), r"entry 5: 'score' must be a finite number, got '0.9'"),
        ("res", _set("6.bbox", [1, 2, "3", 4]), r"entry 6: 'bbox' must be \[x, y, width, height\] of numbers"),
    ],
)  # fmt: skip
def test_cli_rejects_what_cocoeval_would_score_silently(
    eval_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, where: str, change: Any,
    message: str,
) -> None:  # fmt: skip
    from mobilenets.tasks.cli import main as cli_main

    ground_truth, results = _mutated(*eval_files, where, change)
    gt_path, res_path = tmp_path / "instances.json", tmp_path / "detections.json"
    gt_path.write_text(json.dumps(ground_truth))
    res_path.write_text(json.dumps(results))
    assert cli_main(["detect-eval", "--results", str(res_path), "--annotations", str(gt_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("mobilenets detect-eval: error: ")
    named = gt_path if where == "gt" else res_path
    assert re.search(f"error: {re.escape(str(named))}: {message}", err), err
    assert not (tmp_path / "detections_eval").exists()


def test_nan_score_used_to_crash_the_default_engine(eval_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Without the check, pycocotools scores a NaN and faster-coco-eval fails: neither is an answer."""
    _, results = _mutated(*eval_files, "res", _set("0.score", float("nan")))
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(results))
    with pytest.raises(ResultsFormatError, match=r"nan\.json: entry 0: 'score' must be a finite number"):
        evaluate_detections(eval_files[0], path)
