"""A list of (image path, target) pairs as decoded, transformed samples, and the datamodule every
image-label source shares (seeded validation split, a predict source from a folder or a list file; loaders,
workers and resumable shuffling come from ``datasets/base.py``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.base import BaseDataModule, SampleKey
from mobilenets.datasets.images import (
    Box,
    check_images,
    images_in_folder,
    load_rgb,
    load_rgb_region,
)
from mobilenets.datasets.transforms import MINUS_ONE_ONE, ClassificationTransform

log = logging.getLogger(__name__)


class DatasetLayoutError(MobilenetsError, FileNotFoundError):
    """A dataset folder or list file that is missing or not in the expected layout; the message names
    the path and shows the layout that was expected."""


class ImageListDataset(Dataset):
    """Samples ``{"image", "target", "index", "path"}`` from parallel lists of paths and targets.

    Args:
        paths: image files.
        targets: one target per image (an int class, a vector, ...; ``None`` for unlabelled images,
            stored as -1).
        transform: image array → tensor. A ``ClassificationTransform`` with the fast backend is given the
            image size before decoding so JPEGs decode at a reduced scale when possible; any other
            callable receives the decoded (and box-cropped) RGB array.
        boxes: optional region ``(x0, y0, x1, y1)`` per image (pixels of the full image) to crop to first.
        skip_corrupt: check every image up front and drop undecodable ones (counted in the log); when
            False a corrupt file raises ``CorruptImageError`` naming it when it is read.

    A key may be ``(index, seed)``: the augmentation of that sample is then drawn from ``seed``.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[Any] | None = None,
        transform: Callable[..., torch.Tensor] | None = None,
        boxes: Sequence[Box | None] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        paths = [Path(p) for p in paths]
        targets = list(targets) if targets is not None else [None] * len(paths)
        boxes = list(boxes) if boxes is not None else [None] * len(paths)
        if not len(paths) == len(targets) == len(boxes):
            raise ValueError(
                f"paths, targets and boxes differ in length: {len(paths)}, {len(targets)}, {len(boxes)}"
            )
        self.skipped = 0
        if skip_corrupt:
            kept, self.skipped = check_images(paths, skip_corrupt=True)
            paths = [paths[i] for i in kept]
            targets = [targets[i] for i in kept]
            boxes = [boxes[i] for i in kept]
        self.paths = paths
        self.targets = targets
        self.boxes = boxes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, rng: np.random.Generator) -> Any:
        """The transformed image of sample ``index``."""
        path, box = self.paths[index], self.boxes[index]
        transform = self.transform
        if isinstance(transform, ClassificationTransform) and transform.backend == "fast":

            def choose(width: int, height: int) -> Box:
                within = _clip_box(box, width, height) if box is not None else None
                return transform.crop_box(width, height, rng, within)

            region = load_rgb_region(path, choose, transform.input_size)
            return transform.finish(region, rng)
        if box is None:
            image = load_rgb(path)
        else:
            image = load_rgb(path)
            x0, y0, x1, y1 = _clip_box(box, image.shape[1], image.shape[0])
            image = image[int(y0) : max(round(y1), int(y0) + 1), int(x0) : max(round(x1), int(x0) + 1)]
        if transform is None:
            return torch.from_numpy(np.ascontiguousarray(image))
        if isinstance(transform, ClassificationTransform):
            return transform(image, rng)
        return transform(image)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = np.random.default_rng(seed)
        target = self.targets[index]
        return {
            "image": self.load(index, rng),
            "target": -1 if target is None else target,
            "index": index,
            "path": str(self.paths[index]),
        }


def _clip_box(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    x0, y0 = min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0)
    return (x0, y0, max(min(x1, float(width)), x0 + 1.0), max(min(y1, float(height)), y0 + 1.0))


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: ``fraction`` of each class (at least one image of any class with two or
    more) goes to validation, chosen with ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    train, val = [], []
    for label in sorted(by_class):
        members = rng.permutation(by_class[label]).tolist()
        count = round(len(members) * fraction)
        if fraction > 0 and count == 0 and len(members) >= 2:
            count = 1
        val += members[:count]
        train += members[count:]
    return sorted(train), sorted(val)


def read_path_list(path: Path) -> list[Path]:
    """Image paths listed one per line (blank lines and ``#`` comments ignored; relative to the file)."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: predict list not found (expected a text file, one image per line)")
    paths = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():  # a BOM is not part of a path
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        image = Path(line)
        paths.append(image if image.is_absolute() else path.parent / image)
    return paths


class ImageDataModule(BaseDataModule):
    """Datamodule of the image-label sources: builds the split datasets once and predicts on a folder or
    list of images (loaders, workers and resumable shuffling: ``BaseDataModule``).

    Subclasses implement ``load_splits()`` returning ``{"train": (paths, targets, boxes), "val": ...,
    "test": ...}`` (``val`` and ``test`` may be missing; boxes may be None) and set ``class_names``.

    Args:
        input_size: the training/eval resolution ρ (the model's ``input_size``).
        batch_size: images per batch (per process under DDP).
        num_workers: loader processes (0 loads in the main process).
        pin_memory: page-locked batches for fast host-to-GPU copies.
        val_fraction: share of each class carved from train for validation when the source has no
            validation split.
        seed: seed of that split and of the shuffling/augmentation.
        skip_corrupt: drop undecodable images (counted in the log) instead of raising.
        mean: normalisation mean (default: [-1, 1] scaling, what the ImageNet weights expect).
        std: normalisation std.
        predict_dir: folder of images to predict on (recursively, sorted).
        predict_list: text file with one image path per line to predict on.
        train_scale: area range of the random resized crop.
    """

    def __init__(
        self,
        input_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        mean: tuple[float, float, float] = MINUS_ONE_ONE[0],
        std: tuple[float, float, float] = MINUS_ONE_ONE[1],
        predict_dir: str | None = None,
        predict_list: str | None = None,
        train_scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        super().__init__(input_size, batch_size, num_workers, mean, std, predict_dir, seed, pin_memory)
        self.val_fraction = val_fraction
        self.skip_corrupt = skip_corrupt
        self.predict_list = predict_list
        self.train_scale = tuple(train_scale)
        self.class_names: list[str] | None = None
        self.datasets: dict[str, ImageListDataset] = {}
        self._splits: dict[str, tuple[list[Path], list[Any], list[Box | None] | None]] | None = None

    # ----------------------------------------------------------------- for subclasses
    def load_splits(self) -> dict[str, tuple[list[Path], list[Any], list[Box | None] | None]]:
        raise NotImplementedError

    # ----------------------------------------------------------------- building
    def transform(self, train: bool) -> ClassificationTransform:
        return ClassificationTransform(
            self.input_size, train=train, mean=self.mean, std=self.std, scale=self.train_scale
        )

    def splits(self) -> dict[str, tuple[list[Path], list[Any], list[Box | None] | None]]:
        """The parsed splits (read once), with validation carved from train when missing."""
        if self._splits is None:
            splits = dict(self.load_splits())
            if "val" not in splits and self.val_fraction > 0:
                paths, targets, boxes = splits["train"]
                train, val = stratified_split(targets, self.val_fraction, self.seed)

                def take(indices: list[int]) -> tuple[list[Path], list[Any], list[Box | None] | None]:
                    return (
                        [paths[i] for i in indices],
                        [targets[i] for i in indices],
                        [boxes[i] for i in indices] if boxes is not None else None,
                    )

                splits["train"], splits["val"] = take(train), take(val)
            self._splits = splits
        return self._splits

    def prepare_data(self) -> None:
        """Nothing to download: the data must already be on disk (checked in ``setup``)."""

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and (self.predict_dir or self.predict_list):
            try:  # only for the class names: predicting needs no training data (the checkpoint has them)
                splits = self.splits()
            except DatasetLayoutError:
                splits = {}
        else:
            splits = self.splits()
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["predict"],
        }.get(stage or "fit", ["train", "val", "test"])
        for split in wanted:
            if split in self.datasets:
                continue
            if split == "predict":
                paths = self.predict_paths()
                self.datasets[split] = ImageListDataset(
                    paths, None, self.transform(train=False), skip_corrupt=self.skip_corrupt
                )
                continue
            source = split if split in splits else ("val" if split == "test" else None)
            if source is None or source not in splits:
                continue
            if split != source:
                log.warning("no %s split in this dataset: testing on the validation split", split)
            paths, targets, boxes = splits[source]
            dataset = ImageListDataset(
                paths, targets, self.transform(train=split == "train"), boxes, self.skip_corrupt
            )
            if dataset.skipped:
                log.warning("%s split: skipped %d corrupt images", split, dataset.skipped)
            self.datasets[split] = dataset

    def predict_paths(self) -> list[Path]:
        if self.predict_dir:
            return images_in_folder(self.predict_dir, "predict_dir", DatasetLayoutError)
        if self.predict_list:
            return read_path_list(Path(self.predict_list))
        if "test" in self.splits():
            log.warning("no predict_dir / predict_list given: predicting on the test split")
            return list(self.splits()["test"][0])
        raise DatasetLayoutError("set data predict_dir (a folder of images) or predict_list (a text file)")

    # ----------------------------------------------------------------- loaders
    #: ImageListDataset draws each sample's augmentation from the seed in its key
    seeded_keys = True

    def _dataset(self, split: str) -> ImageListDataset:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        if split not in self.datasets:
            raise DatasetLayoutError(f"this dataset has no {split} split")
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("predict"))
