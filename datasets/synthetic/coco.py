"""A small COCO-format detection dataset of coloured shapes, written exactly as COCO lays its files out.

``root/<split>/<file_name>.png`` and ``root/annotations/instances_<split>.json`` with ``images``,
``annotations`` (``bbox`` as ``[x, y, w, h]``, polygon ``segmentation``, ``area``, ``iscrowd``) and
``categories`` whose ids are deliberately non-contiguous, so the id ↔ label mapping is exercised. Some
images hold no object (negatives); image sizes vary so batches mix sizes. Also a COCO-val-sized ground
truth with detector-like results (no images) for timing and checking evaluators.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mobilenets.datasets.atomic import write_json_atomic
from mobilenets.datasets.synthetic.drawing import shape_area, shape_polygon, textured_background

#: (COCO-style category id, shape): ids skip numbers on purpose, as COCO's own do.
SHAPE_CATEGORIES: tuple[tuple[int, str], ...] = ((3, "rectangle"), (7, "ellipse"), (12, "triangle"))


def make_coco_shapes_split(
    root: Path,
    split: str,
    num_images: int,
    seed: int = 0,
    size_range: tuple[int, int] = (112, 176),
    max_objects: int = 3,
    empty_fraction: float = 0.1,
    categories: Sequence[tuple[int, str]] = SHAPE_CATEGORIES,
    first_image_id: int = 1,
) -> Path:
    """Write ``num_images`` images of ``split`` and its ``instances_<split>.json``; returns the JSON path."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    annotation_id = 1
    for index in range(num_images):
        image_id = first_image_id + index
        width = int(rng.integers(size_range[0], size_range[1] + 1))
        height = int(rng.integers(size_range[0], size_range[1] + 1))
        canvas = Image.fromarray(textured_background(rng, height, width))
        draw = ImageDraw.Draw(canvas)
        count = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
        for _ in range(count):
            category_id, kind = categories[int(rng.integers(len(categories)))]
            side = min(width, height)
            w = float(rng.uniform(0.22, 0.55) * side)
            h = float(np.clip(w * rng.uniform(0.6, 1.6), 0.18 * side, 0.7 * side))
            x = float(rng.uniform(0, width - w))
            y = float(rng.uniform(0, height - h))
            polygon = shape_polygon(kind, x, y, w, h)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            outline = tuple(255 - c for c in colour)
            draw.polygon(polygon, fill=colour, outline=outline)
            annotations.append(
                {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                    "area": round(shape_area(kind, w, h), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(c, 2) for point in polygon for c in point]],
                }
            )
            annotation_id += 1
        file_name = f"{image_id:012d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    payload = {
        "info": {"description": "mobilenets synthetic shapes", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in categories],
    }
    path = root / "annotations" / f"instances_{split}.json"
    write_json_atomic(path, payload)
    return path


def make_coco_shapes(
    root: Path,
    splits: dict[str, int] | None = None,
    seed: int = 0,
    size_range: tuple[int, int] = (112, 176),
    empty_fraction: float = 0.1,
    max_objects: int = 3,
) -> Path:
    """Write every split of a shapes dataset under ``root`` (default 64 train / 16 val images)."""
    splits = splits or {"train": 64, "val": 16}
    next_id = 1
    for offset, (split, count) in enumerate(splits.items()):
        make_coco_shapes_split(
            root,
            split,
            count,
            seed=seed + 1000 * offset,
            size_range=size_range,
            empty_fraction=empty_fraction,
            max_objects=max_objects,
            first_image_id=next_id,
        )
        next_id += count
    return Path(root)


def make_coco_eval_set(
    num_images: int = 5000,
    dets_per_image: int = 100,
    num_categories: int = 80,
    gt_per_image: float = 7.3,
    crowd_fraction: float = 0.01,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """A COCO-val-sized ground truth (no image files) and a detector-like results list for timing and
    checking evaluators: ~7 boxes per 640x480 image over small/medium/large sizes, a few crowd boxes;
    detections are jittered copies of the ground truth (some with the wrong class) plus random boxes."""
    rng = np.random.default_rng(seed)
    category_ids = [i + 1 + i // 8 for i in range(num_categories)]  # non-contiguous, as COCO's
    images, annotations, results = [], [], []
    annotation_id = 1
    for image_id in range(1, num_images + 1):
        width, height = 640, 480
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = int(rng.poisson(gt_per_image))
        sides = np.exp(rng.uniform(np.log(8), np.log(400), size=(count, 2)))
        gts = []
        for w, h in sides:
            w, h = min(w, width - 1), min(h, height - 1)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = category_ids[int(rng.integers(num_categories))]
            box = [round(float(v), 2) for v in (x, y, w, h)]
            annotations.append(
                {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": round(float(w * h * 0.8), 2),
                    "iscrowd": int(rng.random() < crowd_fraction),
                }
            )
            annotation_id += 1
            gts.append((box, category))
        for index in range(dets_per_image):
            if gts and index < 3 * len(gts):
                (x, y, w, h), category = gts[index % len(gts)]
                x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
                w, h = w * np.exp(rng.normal(0, 0.15)), h * np.exp(rng.normal(0, 0.15))
                if rng.random() < 0.2:
                    category = category_ids[int(rng.integers(num_categories))]
                score = rng.uniform(0.3, 1.0)
            else:
                w, h = np.exp(rng.uniform(np.log(8), np.log(400), size=2))
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                category = category_ids[int(rng.integers(num_categories))]
                score = rng.uniform(0.0, 0.6)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                    "score": round(float(score), 5),
                }
            )
    categories = [{"id": cid, "name": f"class{cid}", "supercategory": "thing"} for cid in category_ids]
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}
    return ground_truth, results
