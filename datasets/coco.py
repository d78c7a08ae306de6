"""COCO-format detection data: ``annotations/instances_<split>.json`` + an image folder, through pycocotools.

Policies (each counted and logged, never silent):

- category ids (COCO's are non-contiguous) map to contiguous labels 1..K (0 is the background) and back;
- crowd annotations stay out of training targets (COCOeval still sees them in the ground truth);
- boxes past the image border are clipped; boxes under 1 px wide or high (after clipping) are dropped;
- images without (usable) annotations are kept as negatives, or dropped with ``keep_empty=False``;
- a missing image file is an error naming it, or is skipped and counted with ``skip_missing=True``;
- an annotation with a category id absent from ``categories`` is an error naming the annotation id.

Any dataset in this format works (a user's own categories), not only COCO itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.base import BaseDataModule, SampleKey
from mobilenets.datasets.images import images_in_folder, load_rgb
from mobilenets.datasets.transforms import MINUS_ONE_ONE, DetectionTransform

log = logging.getLogger(__name__)

Augmentation = Literal["ssd", "frcnn", "none"]


class CocoFormatError(MobilenetsError, ValueError):
    """An annotation file that is not valid COCO format; the message names the file and the problem."""


class MissingImageError(MobilenetsError, FileNotFoundError):
    """An image listed in the annotations is not on disk; the message names the file."""


def annotation_path(root: str | Path, split: str) -> Path:
    """Where COCO keeps a split's annotations: ``root/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and check a COCO instances file; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: annotation file not found")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CocoFormatError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise CocoFormatError(f"{path}: not a UTF-8 text file ({error})") from error
    if not isinstance(payload, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(payload.get(key), list):
            raise CocoFormatError(f"{path}: missing or non-list key {key!r} (COCO instances format)")
    for index, image in enumerate(payload["images"]):
        if not isinstance(image, dict) or not {"id", "file_name"} <= image.keys():
            raise CocoFormatError(f"{path}: images[{index}] needs 'id' and 'file_name'")
    for index, category in enumerate(payload["categories"]):
        if not isinstance(category, dict) or not {"id", "name"} <= category.keys():
            raise CocoFormatError(f"{path}: categories[{index}] needs 'id' and 'name'")
    image_ids: set[Any] = set()
    for index, image in enumerate(payload["images"]):
        if image["id"] in image_ids:  # pycocotools would keep the last entry and pool both's annotations
            raise CocoFormatError(
                f"{path}: images[{index}] repeats image id {image['id']!r} (ids must be unique)"
            )
        image_ids.add(image["id"])
    category_ids = {category["id"] for category in payload["categories"]}
    for index, ann in enumerate(payload["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox"} <= ann.keys():
            raise CocoFormatError(
                f"{path}: annotations[{index}] needs 'id', 'image_id', 'category_id' and 'bbox'"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise CocoFormatError(
                f"{path}: annotation id {ann['id']}: 'bbox' must be [x, y, width, height], got {bbox!r}"
            )
        if ann["category_id"] not in category_ids:
            raise CocoFormatError(
                f"{path}: annotation id {ann['id']} has unknown category_id {ann['category_id']} "
                f"(categories define {sorted(category_ids)})"
            )
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(
                f"{path}: annotation id {ann['id']} points at unknown image_id {ann['image_id']}"
            )
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
    return payload


def coco_from_dict(payload: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an already-loaded (and checked) instances dict."""
    coco = COCO()
    coco.dataset = payload
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


@dataclass(frozen=True)
class CategoryMap:
    """Non-contiguous category ids ↔ contiguous labels 1..K (label 0 is the detectors' background)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: Sequence[dict[str, Any]]) -> CategoryMap:
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def to_category_id(self, label: int) -> int:
        if not 1 <= label <= len(self.category_ids):
            raise KeyError(f"label {label} is outside 1..{len(self.category_ids)}")
        return self.category_ids[label - 1]

    def name(self, label: int) -> str:
        return self.names[label - 1] if 1 <= label <= len(self.names) else f"class {label}"


@dataclass
class CocoStats:
    """What the annotation policies did to one split (logged at load time)."""

    images: int = 0
    annotations: int = 0
    crowd_skipped: int = 0
    degenerate_dropped: int = 0
    clipped: int = 0
    empty_images: int = 0
    empty_dropped: int = 0
    missing_skipped: int = 0
    missing_files: list[str] = field(default_factory=list)


def boxes_for_image(
    annotations: Sequence[dict[str, Any]],
    width: float,
    height: float,
    categories: CategoryMap,
    stats: CocoStats,
) -> tuple[np.ndarray, np.ndarray]:
    """Training boxes (xyxy pixels, clipped) and labels of one image's annotations, counting the policies."""
    boxes, labels = [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 - cx0 < 1.0 or cy1 - cy0 < 1.0:
            stats.degenerate_dropped += 1
            log.info(
                "dropped annotation id %s: box %s is under 1 px after clipping", ann.get("id"), ann["bbox"]
            )
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            stats.clipped += 1
        boxes.append((cx0, cy0, cx1, cy1))
        labels.append(categories.to_label(ann["category_id"]))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


class CocoDetection(Dataset):
    """One split of a COCO-format dataset: ``(image tensor, target dict)`` samples.

    The target holds ``boxes`` (xyxy pixels, float32), ``labels`` (contiguous, int64), ``image_id`` (the
    COCO id) and ``orig_size`` (H, W). Evaluation uses ``coco`` (the full ground truth, crowd included).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transform: DetectionTransform | None = None,
        keep_empty: bool = True,
        skip_missing: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform or DetectionTransform("none", 300, train=False)
        payload = load_coco_json(self.annotation_file)
        self.coco = coco_from_dict(payload)
        self.categories = CategoryMap.from_categories(payload["categories"])
        self.stats = CocoStats(images=len(payload["images"]), annotations=len(payload["annotations"]))
        self.records: list[dict[str, Any]] = []
        for image in sorted(payload["images"], key=lambda im: im["id"]):
            path = self.image_dir / image["file_name"]
            if not path.is_file():
                if not skip_missing:
                    raise MissingImageError(
                        f"{path}: image file of image id {image['id']} (listed in {self.annotation_file}) "
                        "not found; set skip_missing: true to skip such images"
                    )
                self.stats.missing_skipped += 1
                self.stats.missing_files.append(str(path))
                continue
            anns = self.coco.imgToAnns.get(image["id"], [])
            width, height = image.get("width"), image.get("height")
            if width is None or height is None:
                height, width = load_rgb(path).shape[:2]
            boxes, labels = boxes_for_image(anns, width, height, self.categories, self.stats)
            if len(boxes) == 0:
                self.stats.empty_images += 1
                if not keep_empty:
                    self.stats.empty_dropped += 1
                    continue
            self.records.append(
                {"id": image["id"], "path": path, "size": (height, width), "boxes": boxes, "labels": labels}
            )
        self._log_stats()

    def _log_stats(self) -> None:
        s = self.stats
        log.info(
            "%s: %d images (%d kept), %d annotations; %d crowd boxes kept out of targets, %d boxes under "
            "1 px dropped, %d boxes clipped to the image, %d images without boxes (%d dropped), "
            "%d missing image files skipped",
            self.annotation_file,
            s.images,
            len(self.records),
            s.annotations,
            s.crowd_skipped,
            s.degenerate_dropped,
            s.clipped,
            s.empty_images,
            s.empty_dropped,
            s.missing_skipped,
        )
        if s.missing_skipped:
            log.warning("skipped %d missing image files, e.g. %s", s.missing_skipped, s.missing_files[0])

    @property
    def image_ids(self) -> list[int]:
        return [record["id"] for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        image = load_rgb(record["path"])
        rng = None if seed is None else np.random.default_rng(seed)
        tensor, boxes, labels = self.transform(image, record["boxes"], record["labels"], rng)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": record["id"],
            "orig_size": tuple(image.shape[:2]),
        }
        return tensor, target


class ImageFolderForDetection(Dataset):
    """Every image under a folder, for ``predict``: ``(image tensor, {"image_id", "path", "orig_size"})``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.paths = images_in_folder(self.root, "predict_dir")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = load_rgb(self.paths[index])
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return tensor, {
            "image_id": index,
            "path": str(self.paths[index]),
            "orig_size": tuple(image.shape[:2]),
        }


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Images of different sizes stay a list of tensors; targets a list of dicts (torchvision's input)."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets


class CocoDataModule(BaseDataModule):
    """COCO-format splits under ``root`` (``root/<split>/`` images, ``root/annotations/instances_<split>.json``).

    Args:
        root: dataset folder.
        train_split / val_split / test_split: split names (``train2017``, ``val2017``; test defaults to val).
        predict_dir: a folder of images for ``predict``.
        augment: ``ssd`` (SSD random crop, flip, photometric), ``frcnn`` (flip, scale jitter) or ``none``.
        input_size: the detector's input (SSD) or shorter side (Faster R-CNN) used by the training pipeline.
        max_size: longest side cap of the Faster R-CNN training pipeline.
        batch_size: images per batch (the SSD reference config uses 24).
        num_workers: data-loading processes.
        keep_empty: keep images without boxes as negatives (True) or drop them.
        skip_missing: skip (and count) images whose file is missing instead of failing.
        mean, std: the model's normalisation; images stay in [0, 1] here because the detectors normalise
            inside (torchvision's transform), with these same values.
        seed: seed of the shuffling and of each training sample's augmentation.
    """

    seeded_keys = True
    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        predict_dir: str | None = None,
        augment: Augmentation = "ssd",
        input_size: int = 300,
        max_size: int | None = None,
        batch_size: int = 24,
        num_workers: int = 4,
        keep_empty: bool = True,
        skip_missing: bool = False,
        mean: tuple[float, float, float] = MINUS_ONE_ONE[0],
        std: tuple[float, float, float] = MINUS_ONE_ONE[1],
        seed: int = 0,
    ) -> None:
        super().__init__(input_size, batch_size, num_workers, mean, std, predict_dir, seed)
        self.save_hyperparameters()
        self.root = Path(root)
        self.datasets: dict[str, CocoDetection] = {}

    def split_name(self, stage: str) -> str:
        hp = self.hparams
        return {"train": hp.train_split, "val": hp.val_split, "test": hp.test_split or hp.val_split}[stage]

    def make_dataset(self, stage: str) -> CocoDetection:
        """The dataset of ``stage`` (train/val/test), built once."""
        if stage not in self.datasets:
            hp = self.hparams
            split = self.split_name(stage)
            train = stage == "train"
            transform = DetectionTransform(hp.augment, self.input_size, train=train, max_size=hp.max_size)
            self.datasets[stage] = CocoDetection(
                self.root / split,
                annotation_path(self.root, split),
                transform,
                keep_empty=hp.keep_empty if train else True,
                skip_missing=hp.skip_missing,
            )
        return self.datasets[stage]

    @property
    def category_map(self) -> CategoryMap:
        """Categories of the dataset (read from the first split available)."""
        for stage in ("train", "val", "test"):
            if stage in self.datasets:
                return self.datasets[stage].categories
        for stage in ("train", "val"):
            path = annotation_path(self.root, self.split_name(stage))
            if path.is_file():
                return CategoryMap.from_categories(load_coco_json(path)["categories"])
        raise FileNotFoundError(f"{self.root}: no annotations/instances_<split>.json to read categories from")

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.make_dataset("train")
            self.make_dataset("val")
        if stage == "validate":
            self.make_dataset("val")
        if stage == "test":
            self.make_dataset("test")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.make_dataset("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.make_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.make_dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_dir:
            raise ValueError("set data.init_args.predict_dir to the folder of images to run predict on")
        return self._loader(ImageFolderForDetection(self.predict_dir))
