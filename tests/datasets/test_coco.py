"""COCO-format data: category mapping, annotation policies with counts, clear errors, transforms, collate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenets.datasets.coco import (
    CategoryMap,
    CocoDataModule,
    CocoDetection,
    CocoFormatError,
    MissingImageError,
    detection_collate,
    load_coco_json,
)
from mobilenets.datasets.synthetic.coco import SHAPE_CATEGORIES, make_coco_shapes
from mobilenets.datasets.transforms import DetectionTransform, ssd_random_crop


def write_split(
    root: Path, annotations: list[dict], images: int = 2, size: tuple[int, int] = (80, 60)
) -> Path:
    """A hand-made split: ``images`` grey PNGs of ``size`` (W, H) and the given annotations."""
    (root / "val").mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id in range(1, images + 1):
        name = f"{image_id:03d}.png"
        Image.new("RGB", size, (90, 90, 90)).save(root / "val" / name)
        entries.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    payload = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 5, "name": "cat"}, {"id": 17, "name": "dog"}],
    }
    path = root / "annotations" / "instances_val.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def test_category_map_is_contiguous_and_reversible() -> None:
    cmap = CategoryMap.from_categories([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}])
    assert cmap.category_ids == (1, 90)
    assert [cmap.to_label(1), cmap.to_label(90)] == [1, 2]
    assert [cmap.to_category_id(1), cmap.to_category_id(2)] == [1, 90]
    assert cmap.name(2) == "toothbrush"
    with pytest.raises(KeyError):
        cmap.to_category_id(0)  # the background has no category


def test_policies_crowd_degenerate_clipped_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_split(
        tmp_path,
        [
            ann(1, 1, 17, [10, 10, 20, 20]),  # kept as label 2 (category 17)
            ann(2, 1, 5, [0, 0, 30, 30], iscrowd=1),  # crowd: out of the targets
            ann(3, 1, 5, [5, 5, 0.5, 10]),  # under 1 px wide: dropped
            ann(4, 1, 5, [70, 50, 30, 30]),  # past the 80x60 border: clipped to [70, 50, 80, 60]
            ann(5, 1, 5, [100, 100, 5, 5]),  # wholly outside: nothing left after clipping, dropped
        ],
    )
    with caplog.at_level(logging.INFO, logger="mobilenets.datasets.coco"):
        dataset = CocoDetection(tmp_path / "val", path, keep_empty=True)
    stats = dataset.stats
    assert (stats.crowd_skipped, stats.degenerate_dropped, stats.clipped) == (1, 2, 1)
    assert stats.empty_images == 1 and len(dataset) == 2  # image 2 has no boxes and is kept as a negative
    assert "1 crowd boxes" in caplog.text and "2 boxes under 1 px dropped" in caplog.text
    image, target = dataset[0]
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [2, 1]
    assert torch.allclose(target["boxes"], torch.tensor([[10.0, 10, 30, 30], [70, 50, 80, 60]]))
    # the crowd box is still in the ground truth that COCOeval sees
    assert len(dataset.coco.getAnnIds(imgIds=[1], iscrowd=True)) == 1
    dropped = CocoDetection(tmp_path / "val", path, keep_empty=False)
    assert len(dropped) == 1 and dropped.stats.empty_dropped == 1


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "instances_bad.json"
    path.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(CocoFormatError, match=r"instances_bad\.json: not valid JSON at line 2"):
        load_coco_json(path)
    path.write_text('{"images": [], "annotations": []}')
    with pytest.raises(CocoFormatError, match=r"instances_bad\.json: missing or non-list key 'categories'"):
        load_coco_json(path)
    with pytest.raises(CocoFormatError, match="annotation file not found"):
        load_coco_json(tmp_path / "nope.json")


def test_unknown_category_and_bad_bbox_name_the_annotation(tmp_path: Path) -> None:
    path = write_split(tmp_path, [ann(41, 1, 5, [1, 1, 5, 5]), ann(42, 1, 99, [1, 1, 5, 5])])
    with pytest.raises(CocoFormatError, match=r"annotation id 42 has unknown category_id 99"):
        CocoDetection(tmp_path / "val", path)
    path = write_split(tmp_path, [ann(7, 1, 5, [1, 1, 5])])
    with pytest.raises(CocoFormatError, match=r"annotation id 7: 'bbox' must be \[x, y, width, height\]"):
        CocoDetection(tmp_path / "val", path)


def test_missing_image_error_or_skip_with_count(tmp_path: Path) -> None:
    path = write_split(tmp_path, [ann(1, 1, 5, [1, 1, 20, 20]), ann(2, 2, 5, [1, 1, 20, 20])])
    (tmp_path / "val" / "002.png").unlink()
    with pytest.raises(MissingImageError, match=r"002\.png: image file of image id 2 .* not found"):
        CocoDetection(tmp_path / "val", path)
    dataset = CocoDetection(tmp_path / "val", path, skip_missing=True)
    assert len(dataset) == 1 and dataset.stats.missing_skipped == 1
    assert dataset.image_ids == [1]


def test_collate_keeps_images_of_different_sizes(tmp_path: Path) -> None:
    make_coco_shapes(tmp_path, {"val": 4}, size_range=(64, 96))
    dm = CocoDataModule(str(tmp_path), train_split="val", val_split="val", batch_size=4, num_workers=0)
    dm.setup("validate")
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == len(targets) == 4
    assert len({tuple(i.shape) for i in images}) > 1  # sizes differ, nothing was padded or stacked
    for image, target in zip(images, targets):
        height, width = image.shape[-2:]
        assert target["orig_size"] == (height, width)
        if len(target["boxes"]):
            assert (
                float(target["boxes"][:, 2].max()) <= width and float(target["boxes"][:, 3].max()) <= height
            )
    assert dm.category_map.category_ids == tuple(cid for cid, _ in SHAPE_CATEGORIES)
    batch = detection_collate([(torch.zeros(3, 5, 7), {"a": 1}), (torch.zeros(3, 9, 4), {"a": 2})])
    assert [tuple(i.shape) for i in batch[0]] == [(3, 5, 7), (3, 9, 4)] and batch[1] == [{"a": 1}, {"a": 2}]


def _white_box_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[30:90, 40:100] = 255
    return image, np.array([[40.0, 30.0, 100.0, 90.0]], dtype=np.float32), np.array([1])


@pytest.mark.parametrize("kind", ["ssd", "frcnn"])
def test_train_transforms_keep_boxes_on_the_object(kind: str) -> None:
    image, boxes, labels = _white_box_image()
    transform = DetectionTransform(kind, 96, train=True, max_size=200, seed=3)
    for _ in range(15):
        tensor, out_boxes, out_labels = transform(image, boxes, labels)
        if kind == "ssd":
            assert tensor.shape == (3, 96, 96)
        else:
            short, long = sorted(tensor.shape[-2:])
            assert short in {77, 86, 96, 106, 115} and long <= 200
        assert len(out_boxes) == len(out_labels)
        for x0, y0, x1, y1 in out_boxes.round().int().tolist():
            inside = tensor[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
            # the box still covers the white square: photometric distortion may darken it, but it stays the
            # brightest thing in the image (zoom-out fill and background are darker)
            assert inside.numel() > 0 and float(inside.min()) >= float(tensor.max()) - 0.05
            if kind == "ssd":
                assert (x1 - x0) >= 1 and (y1 - y0) >= 1


def test_ssd_random_crop_respects_min_iou_and_drops_boxes_whose_centre_leaves() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    boxes = np.array([[0.0, 0.0, 20.0, 20.0], [60.0, 60.0, 100.0, 100.0]], dtype=np.float32)
    labels = np.array([1, 2])
    for _ in range(30):
        crop, out_boxes, out_labels = ssd_random_crop(image, boxes, labels, rng, min_ious=(0.5,))
        assert len(out_labels) == len(out_boxes)
        assert len(out_boxes) >= 1
        h, w = crop.shape[:2]
        assert np.all(out_boxes[:, 2] <= w) and np.all(out_boxes[:, 3] <= h)
    empty = np.zeros((0, 4), dtype=np.float32)
    same, out, _ = ssd_random_crop(image, empty, np.zeros(0, dtype=np.int64), rng)
    assert same is image and len(out) == 0


def test_eval_transform_is_identity_in_original_pixels(tmp_path: Path) -> None:
    image, boxes, labels = _white_box_image()
    tensor, out_boxes, out_labels = DetectionTransform("ssd", 96, train=False)(image, boxes, labels)
    assert tensor.shape == (3, 120, 160)
    assert torch.equal(out_boxes, torch.from_numpy(boxes)) and out_labels.tolist() == [1]
    with pytest.raises(ValueError, match="must be 'ssd', 'frcnn' or 'none'"):
        DetectionTransform("yolo", 96, train=True)


@pytest.mark.parametrize("augment", ["ssd", "frcnn"])
def test_training_batches_are_the_same_in_every_run(tmp_path: Path, augment: str) -> None:
    """Random crops, jitter, flips and colour changes follow from the seed and the epoch, so two runs (and a
    resumed one) train on the same batches; another seed draws others."""
    make_coco_shapes(tmp_path, {"train": 6}, size_range=(64, 96))

    def first_batch(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dm = CocoDataModule(
            str(tmp_path), train_split="train", val_split="train", augment=augment, input_size=64,
            batch_size=6, num_workers=0,
            seed=seed,
        )  # fmt: skip
        dm.setup("fit")
        images, targets = next(iter(dm.train_dataloader()))
        return images, [t["boxes"] for t in targets]

    (images, boxes), (again, again_boxes) = first_batch(0), first_batch(0)
    assert all(torch.equal(a, b) for a, b in zip(images, again))
    assert all(torch.equal(a, b) for a, b in zip(boxes, again_boxes))
    other, _ = first_batch(1)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(images, other))
