"""Overfit a tiny batch with each detector, from the built-in ImageNet weights: the loss falls, and the few
training images are then detected with COCO AP50 >= 0.9 and AP75 >= 0.75. Checked to fail with a matcher that
assigns the wrong boxes (AP50 0.58) and with a box decoding that disagrees with the encoding (AP75 0.5).

SSD's batch is 2:1 images of flat objects, seen at that size in training and evaluation: on a square image a
grid of anchors with x and y swapped is the same set of boxes in another order, which a head can memorise;
on a 2:1 image it leaves the right half without anchors (checked: swapping the centres' x and y in
``TFSSDAnchorGenerator.grid_anchors`` fails the SSD test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mobilenets.backbone.inference import reestimate_folded_batchnorm
from mobilenets.datasets.synthetic.drawing import draw_shape, textured_background
from mobilenets.tasks.detection import FasterRCNNDetection, SSDDetection
from mobilenets.tasks.detection.coco_eval import evaluate_detections
from mobilenets.tasks.detection.task import DetectionTask

SIZE = 96
#: label → (shape, fill colour); two classes that differ in shape and colour
CLASSES = {1: ("rectangle", (230, 40, 40)), 2: ("ellipse", (40, 90, 230))}
OFFICIAL = {"weights": "official:0.25_128", "width_mult": 0.25, "activation": "relu6", "padding": "tf"}


def tiny_batch(
    count: int = 4, seed: int = 0, width: int = SIZE, height: int = SIZE, aspect: float = 1.0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``count`` width x height images in [0, 1] with one or two non-overlapping shapes each (``aspect``:
    their height / width), and their targets."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for index in range(count):
        canvas = Image.fromarray(textured_background(rng, height, width))
        draw = ImageDraw.Draw(canvas)
        boxes, labels = [], []
        # one shape in the left half, a second in the right half of every other image
        for half in range(1 + index % 2):
            label = 1 + (index + half) % 2
            side = int(rng.integers(26, 40))
            tall = round(side * aspect)
            x0 = int(rng.integers(0, width // 2 - side)) + half * width // 2
            y0 = int(rng.integers(0, height - tall))
            kind, colour = CLASSES[label]
            draw_shape(draw, kind, (x0, y0, x0 + side - 1, y0 + tall - 1), colour)
            boxes.append([x0, y0, x0 + side, y0 + tall])
            labels.append(label)
        images.append(torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1).float() / 255)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def average_precision(
    task: DetectionTask, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
) -> tuple[float, float]:
    """COCO (AP50, AP75) of ``task``'s detections on ``images`` against ``targets`` (labels are the category ids),
    detected at the images' own size: SSD's transform would otherwise squash a 2:1 image to its square input."""
    task.eval()
    transform = task.model.transform
    saved = transform.fixed_size, transform.min_size, transform.max_size
    height, width = images[0].shape[-2:]
    transform.fixed_size, transform.min_size, transform.max_size = (
        None,
        (min(height, width),),
        max(height, width),
    )
    try:
        with torch.no_grad():
            detections = task.model(images)
    finally:
        transform.fixed_size, transform.min_size, transform.max_size = saved
    ground_truth = {
        "images": [{"id": i + 1, "width": width, "height": height} for i in range(len(images))],
        "categories": [{"id": label, "name": kind} for label, (kind, _) in CLASSES.items()],
        "annotations": [],
    }
    for image_id, target in enumerate(targets, start=1):
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            ground_truth["annotations"].append(
                {
                    "id": len(ground_truth["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    results = [
        {
            "image_id": image_id,
            "category_id": int(label),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(s),
        }
        for image_id, found in enumerate(detections, start=1)
        for (x0, y0, x1, y1), label, s in zip(found["boxes"].tolist(), found["labels"], found["scores"])
    ]
    stats = evaluate_detections(ground_truth, results).stats
    return stats[1], stats[2]


def overfit(
    task: DetectionTask,
    steps: int,
    lr: float,
    batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]] | None = None,
) -> tuple[list[float], float, float]:
    """Train ``task`` on one tiny batch (default ``tiny_batch()``) for ``steps`` AdamW steps (batch norm
    re-estimated from the folded weights first, as fitting does); returns the losses and the AP50 and AP75 on
    that batch afterwards."""
    torch.manual_seed(0)
    images, targets = batch or tiny_batch()
    mean, std = (torch.tensor(v)[:, None, None] for v in task.normalization)
    reestimate_folded_batchnorm(task.backbone, [torch.stack([(image - mean) / std for image in images])])
    optimizer = torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    task.train()
    for _ in range(steps):
        loss = sum(task.model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, *average_precision(task, images, targets)


def assert_fitted(losses: list[float], ap50: float, ap75: float) -> None:
    """The loss fell to under 30% of its start, and the training images are found (AP50) and tightly boxed
    (AP75: a box coder whose decoding disagrees with its encoding still finds them at IoU 0.5)."""
    fell = float(np.mean(losses[-5:])) < 0.3 * losses[0]
    assert (fell, ap50 >= 0.9, ap75 >= 0.75) == (True, True, True), (losses[::10], ap50, ap75)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.25 MobileNet on a few small images: threads mostly wait on each other
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_ssd_overfits_a_tiny_batch() -> None:
    task = SSDDetection(num_classes=3, input_size=SIZE, **OFFICIAL)
    # trained (the task skips resizing in training) and evaluated at 128 x 64 on objects 0.7 as high as wide
    batch = tiny_batch(width=128, height=64, aspect=0.7)
    losses, ap50, ap75 = overfit(task, steps=60, lr=3e-3, batch=batch)
    assert_fitted(losses, ap50, ap75)


@pytest.mark.slow
def test_faster_rcnn_overfits_a_tiny_batch() -> None:
    task = FasterRCNNDetection(
        num_classes=3,
        input_size=SIZE,
        max_size=SIZE,
        anchor_scales=[s * SIZE / 300 for s in (0.25, 0.5, 1.0, 2.0)],
        num_proposals=50,
        box_batch_size_per_image=16,
        **OFFICIAL,
    )
    losses, ap50, ap75 = overfit(task, steps=80, lr=2e-3)
    assert_fitted(losses, ap50, ap75)
