"""SSD and Faster R-CNN on MobileNet: geometry, anchors, Table 13 counts, training step, export contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.synthetic.coco import make_coco_shapes
from mobilenets.tasks.detection import FasterRCNNDetection, SSDDetection
from mobilenets.tasks.detection.ssd import TFSSDAnchorGenerator, ssd_postprocess, ssd_preprocess


def test_tf_ssd_anchor_layout_matches_the_tf_api() -> None:
    generator = TFSSDAnchorGenerator()
    assert generator.num_anchors_per_location() == [3, 6, 6, 6, 6, 6]
    assert generator.scales[:6] == pytest.approx([0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
    # lowest level: (0.1, 1), (0.2, 2), (0.2, 1/2); level 1 ends with the in-between scale sqrt(0.35 * 0.5)
    assert generator.box_specs[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
    assert generator.box_specs[1][-1] == pytest.approx((math.sqrt(0.35 * 0.5), 1.0))
    grids = [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    anchors = generator.grid_anchors(grids, (300, 300))
    assert anchors.shape == (1917, 4)  # ssd_mobilenet_v1_coco's anchor count
    # first anchor: cell (0, 0) of the 19x19 map, scale 0.1, square: 30 px centred on 300/38
    centre = 300 / 38
    assert anchors[0].tolist() == pytest.approx(
        [centre - 15, centre - 15, centre + 15, centre + 15], abs=1e-4
    )
    # second anchor: scale 0.2, ratio 2: 0.2*sqrt(2)*300 wide, 0.2/sqrt(2)*300 high
    w, h = (anchors[1, 2:] - anchors[1, :2]).tolist()
    assert (w, h) == pytest.approx((60 * math.sqrt(2), 60 / math.sqrt(2)), abs=1e-3)
    # the last anchor is the 1x1 map's in-between box: sqrt(0.95 * 1.0) of the image, centred
    side = math.sqrt(0.95) * 300
    assert anchors[-1].tolist() == pytest.approx([150 - side / 2] * 2 + [150 + side / 2] * 2, abs=1e-3)


def test_ssd_feature_maps_at_300_are_19_10_5_3_2_1() -> None:
    model = SSDDetection(width_mult=0.25, num_classes=4).eval()
    maps = model.model.backbone(torch.zeros(1, 3, 300, 300))
    assert list(maps) == ["block11", "block13", "extra1", "extra2", "extra3", "extra4"]
    assert [m.shape[-1] for m in maps.values()] == [19, 10, 5, 3, 2, 1]
    assert [m.shape[1] for m in maps.values()] == model.model.backbone.out_channels
    # α = 0.25: taps 128, 256; extras max(int(d·α), 16) = 128, 64, 64, 32
    assert model.model.backbone.out_channels == [128, 256, 128, 64, 64, 32]
    assert model.anchors().shape == (1917, 4)


@pytest.mark.slow
def test_profile_of_the_paper_configs_matches_table13() -> None:
    from mobilenets.tasks.cli.profile import instantiate_model_from_config

    ssd = instantiate_model_from_config(CONFIG_DIR / "ssd300_coco.yaml", {"weights": None})
    prof = ssd.profile()
    # Table 13: 1.2 B mult-adds, 6.8 M parameters (91 outputs)
    assert abs(prof.mult_adds / 1e9 - 1.2) < 0.06 and abs(prof.million_parameters - 6.8) < 0.05
    assert ssd.paper_figures() == (1200.0, 6.8)
    frcnn = instantiate_model_from_config(CONFIG_DIR / "frcnn300_coco.yaml", {"weights": None})
    prof = frcnn.profile()
    # Table 13: 25.2 B mult-adds, 6.1 M parameters
    assert abs(prof.mult_adds / 1e9 - 25.2) / 25.2 < 0.02 and abs(prof.million_parameters - 6.1) < 0.05
    assert frcnn.paper_figures() == (25200.0, 6.1)


def test_faster_rcnn_profile_runs_exactly_300_crops_through_blocks_12_and_13() -> None:
    model = FasterRCNNDetection(width_mult=0.25, input_size=160, num_classes=4)
    crops = []
    handle = model.model.roi_heads.box_head.register_forward_hook(lambda m, i, o: crops.append(i[0].shape))
    model.profile()
    handle.remove()
    assert crops == [torch.Size([300, 128, 14, 14])]  # 300 proposals, 14x14 crops of block11 (512·α)
    assert model.model.rpn.nms_thresh == 0.7  # restored after counting
    body = model.backbone
    assert model.model.roi_heads.box_head.blocks[0] is body.blocks.block12


def _shapes(tmp_path: Path) -> Path:
    return make_coco_shapes(tmp_path / "shapes", {"train": 6, "val": 4}, size_range=(64, 80))


@pytest.mark.parametrize("task_cls", [SSDDetection, FasterRCNNDetection])
def test_train_step_and_detections_in_original_pixels(task_cls: type, tmp_path: Path) -> None:
    from mobilenets.datasets.coco import CocoDataModule

    root = _shapes(tmp_path)
    augment = "ssd" if task_cls is SSDDetection else "frcnn"
    dm = CocoDataModule(
        str(root), "train", "val", augment=augment, input_size=64, batch_size=3, num_workers=0
    )
    dm.setup("fit")
    model = task_cls(width_mult=0.25, input_size=64, num_classes=4)
    images, targets = next(iter(dm.train_dataloader()))
    model.train()
    losses = model.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    val_images, val_targets = next(iter(dm.val_dataloader()))
    detections = model.detect(val_images)
    assert len(detections) == len(val_images)
    for image, det in zip(val_images, detections):
        height, width = image.shape[-2:]
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= width + 1e-3
            assert float(det["boxes"][:, 3].max()) <= height + 1e-3
    results = model.to_coco_results(detections, [t["image_id"] for t in val_targets], dm.category_map)
    assert {r["category_id"] for r in results} <= {3, 7, 12}  # the dataset's ids, not labels 1..3


def test_num_classes_too_small_for_the_dataset_is_rejected(tmp_path: Path) -> None:
    from mobilenets.tasks.cli.lightning import lightning_cli

    root = _shapes(tmp_path)
    config = {
        "fit": {
            "model": {
                "class_path": "mobilenets.tasks.detection.SSDDetection",
                "init_args": {"width_mult": 0.25, "input_size": 64, "num_classes": 3},
            },
            "data": {
                "class_path": "mobilenets.datasets.coco.CocoDataModule",
                "init_args": {
                    "root": str(root),
                    "train_split": "train",
                    "val_split": "val",
                    "num_workers": 0,
                },
            },
            "trainer": {"fast_dev_run": 1, "default_root_dir": str(tmp_path / "run"), "logger": False},
        }
    }
    with pytest.raises(
        ValueError, match="3 categories but the model's num_classes is 3; it must be at least 4"
    ):
        lightning_cli(config)


def test_exported_ssd_plus_postprocess_equals_pytorch_detections() -> None:
    torch.manual_seed(1)
    model = SSDDetection(width_mult=0.25, input_size=96, num_classes=5, score_thresh=0.05).eval()
    # make the untrained head less uniform so NMS and thresholds have something to do
    with torch.no_grad():
        for conv in model.model.head.classification_head.module_list:
            conv.bias.normal_(0, 2.0)
    images = [torch.rand(3, 120, 90), torch.rand(3, 70, 110)]
    with torch.no_grad():
        expected = model.model(images)
        mean, std = model.normalization
        batch = ssd_preprocess(images, 96, mean, std)
        raw_boxes, raw_scores = model.export_module()(batch)
        hp = model.hparams
        ours = ssd_postprocess(
            raw_boxes,
            raw_scores,
            model.anchors(),
            (96, 96),
            [tuple(i.shape[-2:]) for i in images],
            score_thresh=hp.score_thresh,
            nms_thresh=hp.nms_thresh,
            topk_candidates=hp.topk_candidates,
            detections_per_img=hp.detections_per_img,
        )
    assert raw_boxes.shape == (2, model.anchors().shape[0], 4) and raw_scores.shape[-1] == 5
    assert sum(len(d["boxes"]) for d in expected) > 0
    for a, b in zip(expected, ours):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["scores"], b["scores"], atol=1e-6)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
    meta = model.export_metadata()
    assert meta["num_anchors"] == str(model.anchors().shape[0]) and "ssd_postprocess" in meta["outputs"]


@pytest.mark.slow
def test_fit_then_predict_writes_pngs_and_results(tmp_path: Path) -> None:
    from mobilenets.tasks.cli.lightning import lightning_cli

    root = _shapes(tmp_path)
    run = tmp_path / "run"
    model = {
        "class_path": "mobilenets.tasks.detection.SSDDetection",
        "init_args": {
            "width_mult": 0.25,
            "input_size": 64,
            "num_classes": 4,
            "draw_score_thresh": 0.0,
            "score_thresh": 0.001,
        },
    }
    data = {
        "class_path": "mobilenets.datasets.coco.CocoDataModule",
        "init_args": {
            "root": str(root),
            "train_split": "train",
            "val_split": "val",
            "batch_size": 3,
            "num_workers": 0,
            "predict_dir": str(root / "val"),
        },
    }
    trainer = {"max_epochs": 1, "default_root_dir": str(run), "enable_progress_bar": False}
    cli = lightning_cli({"fit": {"model": model, "data": data, "trainer": trainer}})
    assert "val/mAP" in cli.trainer.callback_metrics
    ckpt = next(run.rglob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["category_ids"] == [3, 7, 12]
    lightning_cli({"predict": {"model": model, "data": data, "trainer": trainer, "ckpt_path": str(ckpt)}})
    out = run / "predictions"
    assert len(list(out.glob("*_detections.png"))) == 4
    results = json.loads((out / "detections.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "file_name"} <= set(results[0])
    assert {r["category_id"] for r in results} <= {3, 7, 12}
