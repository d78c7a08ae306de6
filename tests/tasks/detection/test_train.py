"""Training SSD end to end on the synthetic shapes: AP50 well above zero, and the demo step."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mobilenets.datasets.synthetic.coco import make_coco_shapes
from mobilenets.tasks.detection import FasterRCNNDetection


@pytest.mark.slow
def test_ssd_learns_the_shapes(tmp_path: Path) -> None:
    """A short run fits a small training set: its COCO AP50 (via the validation evaluator) is far above
    zero. Batch-norm statistics are re-estimated before validation (precise BN), without which a run this
    short evaluates near zero."""
    from mobilenets.tasks.cli.lightning import lightning_cli

    root = make_coco_shapes(tmp_path / "shapes", {"train": 16}, size_range=(64, 64), max_objects=2)
    config = {
        "fit": {
            "seed_everything": 0,
            "model": {
                "class_path": "mobilenets.tasks.detection.SSDDetection",
                "init_args": {
                    "width_mult": 0.25,
                    "input_size": 64,
                    "num_classes": 4,
                    "optimizer": "adamw",
                    "lr": 0.003,
                    "weight_decay": 0.0,
                    "warmup_epochs": 1,
                    "precise_bn_batches": 1,
                },
            },
            "data": {
                "class_path": "mobilenets.datasets.coco.CocoDataModule",
                "init_args": {
                    "root": str(root),
                    "train_split": "train",
                    "val_split": "train",
                    "augment": "none",
                    "batch_size": 16,
                    "num_workers": 0,
                },
            },
            "trainer": {
                "max_epochs": 40,
                "check_val_every_n_epoch": 40,
                "num_sanity_val_steps": 0,
                "default_root_dir": str(tmp_path / "run"),
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
            },
        }
    }
    cli = lightning_cli(config)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/AP50"]) > 0.5, metrics


@pytest.mark.slow
def test_demo_step_runs_and_reports_ap(tmp_path: Path) -> None:
    from mobilenets.tasks.cli.demo.detection import run_demo

    rows = run_demo(tmp_path, quick=True)
    metrics = {row.metric: row for row in rows}
    for detector, folder in (("SSD", "ssd"), ("Faster R-CNN", "frcnn")):
        assert any(name.startswith(detector) and "val AP50" in name for name in metrics)
        assert (tmp_path / folder / "detect_eval" / "per_category_ap.csv").is_file()
        results_file = tmp_path / folder / "detect_eval" / "detections.json"
        results = json.loads(results_file.read_text())
        assert {r["category_id"] for r in results} <= {3, 7, 12}
        # the reported AP50 is pycocotools' on the written detections, and above what random boxes reach
        ground_truth = COCO(str(tmp_path / "shapes" / "annotations" / "instances_val.json"))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(results_file)), "bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        (row,) = [row for name, row in metrics.items() if name.startswith(detector) and "val AP50" in name]
        reported = float(row.value.rstrip("%")) / 100
        assert reported == pytest.approx(evaluation.stats[1], abs=1e-3)
        assert reported > 0.03


def test_faster_rcnn_weighs_both_stages_box_losses() -> None:
    """The training loss is torchvision's four losses with both box-regression terms (RPN and box head) times
    ``localization_loss_weight``: the same batch and sampling give a loss larger by (w - 1) x those terms."""
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 40.0, 44.0]]), "labels": torch.tensor([1]), "image_id": 1},
        {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0]]), "labels": torch.tensor([2]), "image_id": 2},
    ]
    losses = {}
    for weight in (1.0, 3.0):
        torch.manual_seed(0)
        task = FasterRCNNDetection(
            num_classes=3,
            input_size=64,
            max_size=64,
            width_mult=0.25,
            anchor_scales=[0.125, 0.25],
            num_proposals=20,
            box_batch_size_per_image=8,
            localization_loss_weight=weight,
        )
        task.train()
        torch.manual_seed(1)  # the same anchors and RoIs sampled for both weights
        raw = task.model(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])
        torch.manual_seed(1)
        losses[weight] = (task._shared_step((images, targets), "train"), raw)
    (loss1, raw1), (loss3, _) = losses[1.0], losses[3.0]
    box_terms = float(raw1["loss_box_reg"] + raw1["loss_rpn_box_reg"])
    assert box_terms > 0 and float(loss1) == pytest.approx(float(sum(raw1.values())), rel=1e-5)
    assert float(loss3) == pytest.approx(float(loss1) + 2 * box_terms, rel=1e-5)
