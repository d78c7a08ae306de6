"""CelebA in its released layout, plus folders of unlabeled images as extra distillation data.

Layout under ``root``::

    img_align_celeba/000001.jpg ...
    list_attr_celeba.txt      line 1: the image count; line 2: the 40 attribute names;
                              then "<file> v1 .. v40" per image, values in {-1, 1}, any whitespace
    list_eval_partition.txt   "<file> <0|1|2>" per image: train / val / test

Every sample is a dict: ``image`` (3, ρ, ρ) float tensor, ``labels`` (A,) float in {0, 1} (zeros for
unlabeled images), ``labeled`` bool, ``index`` (the image's position in ``CelebADataModule.image_paths``, the
list a distillation teacher's cached outputs are stored in) and ``path``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.base import BaseDataModule, KeyedConcatDataset, SampleKey
from mobilenets.datasets.images import images_in_folder, list_images, load_rgb
from mobilenets.datasets.transforms import MINUS_ONE_ONE, ClassificationTransform

log = logging.getLogger(__name__)

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
Split = Literal["train", "val", "test"]

#: The 40 attributes of CelebA, in the order of list_attr_celeba.txt.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


class CelebAFormatError(MobilenetsError, ValueError):
    """A CelebA annotation file that does not follow the released layout; names the file and line."""


class CelebANotFoundError(MobilenetsError, FileNotFoundError):
    """A CelebA file or folder that is missing; says what was looked for and where."""


@dataclass(frozen=True)
class AttributeTable:
    """The parsed attribute file: image names, attribute names, labels (N, A) as {0, 1} uint8."""

    names: list[str]
    attributes: list[str]
    labels: np.ndarray
    lines: list[int]  # the line of each row in the file (1-based), for error messages

    def __len__(self) -> int:
        return len(self.names)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CelebANotFoundError(f"{path}: file not found (expected the CelebA layout: {path.name})")
    return path.read_text(encoding="utf-8-sig").splitlines()  # a BOM (Windows editors) is not data


def parse_attribute_file(path: Path) -> AttributeTable:
    """Parse ``list_attr_celeba.txt``; any deviation raises ``CelebAFormatError`` with file and line."""
    path = Path(path)
    lines = _read_lines(path)
    if len(lines) < 2:
        raise CelebAFormatError(f"{path}: expected an image count on line 1 and attribute names on line 2")
    count_text = lines[0].strip()
    if not count_text.isdigit():
        raise CelebAFormatError(f"{path}:1: expected the number of images, got {count_text!r}")
    attributes = lines[1].split()
    if not attributes:
        raise CelebAFormatError(f"{path}:2: expected the attribute names, got an empty line")
    if len(set(attributes)) != len(attributes):
        raise CelebAFormatError(f"{path}:2: attribute names are not unique")
    names: list[str] = []
    rows: list[list[int]] = []
    line_numbers: list[int] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        name, values = fields[0], fields[1:]
        if len(values) != len(attributes):
            raise CelebAFormatError(
                f"{path}:{number}: {name} has {len(values)} values, expected {len(attributes)} "
                f"(one per attribute on line 2)"
            )
        bad = next(((attributes[i], v) for i, v in enumerate(values) if v not in ("-1", "1")), None)
        if bad is not None:
            raise CelebAFormatError(
                f"{path}:{number}: {name} has value {bad[1]!r} for {bad[0]}, expected -1 or 1"
            )
        numbers = [int(v) for v in values]
        if name in seen:
            raise CelebAFormatError(f"{path}:{number}: {name} is listed twice (first on line {seen[name]})")
        seen[name] = number
        names.append(name)
        rows.append(numbers)
        line_numbers.append(number)
    if int(count_text) != len(names):
        raise CelebAFormatError(
            f"{path}:1: the count line says {int(count_text)} images, the file lists {len(names)}"
        )
    labels = (np.asarray(rows, dtype=np.int8).reshape(len(names), len(attributes)) > 0).astype(np.uint8)
    return AttributeTable(names, attributes, labels, line_numbers)


def parse_partition_file(path: Path) -> dict[str, tuple[int, int]]:
    """Parse ``list_eval_partition.txt`` into image name → (partition 0/1/2, line number)."""
    path = Path(path)
    partition: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise CelebAFormatError(f"{path}:{number}: expected '<image> <0|1|2>', got {len(fields)} fields")
        name, value = fields
        if value not in ("0", "1", "2"):
            raise CelebAFormatError(
                f"{path}:{number}: {name} has partition {value!r}, expected 0 (train), 1 (val) or 2 (test)"
            )
        if name in partition:
            raise CelebAFormatError(
                f"{path}:{number}: {name} is listed twice (first on line {partition[name][1]})"
            )
        partition[name] = (int(value), number)
    return partition


@dataclass(frozen=True)
class CelebAIndex:
    """Everything read from a CelebA root: per split the image paths and labels, and the attribute names."""

    root: Path
    attributes: list[str]
    paths: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    skipped_missing: int


def read_celeba(root: Path, skip_missing: bool = False) -> CelebAIndex:
    """Read and cross-check the attribute and partition files of a CelebA root.

    A listed image that does not exist raises (naming the attribute file and line) unless
    ``skip_missing``, which drops it and logs the count.
    """
    root = Path(root)
    if not root.is_dir():
        raise CelebANotFoundError(f"{root}: CelebA root folder not found")
    attr_path, part_path, image_dir = root / ATTRIBUTE_FILE, root / PARTITION_FILE, root / IMAGE_DIR
    table = parse_attribute_file(attr_path)
    partition = parse_partition_file(part_path)
    listed = set(table.names)
    for name, (_, number) in partition.items():
        if name not in listed:
            raise CelebAFormatError(
                f"{part_path}:{number}: {name} is not in {attr_path.name}; the two files disagree"
            )
    for name, number in zip(table.names, table.lines):
        if name not in partition:
            raise CelebAFormatError(
                f"{attr_path}:{number}: {name} has no partition in {part_path.name}; the two files disagree"
            )
    if not image_dir.is_dir():
        raise CelebANotFoundError(f"{image_dir}: image folder not found (expected {IMAGE_DIR}/ under {root})")
    existing = {p.name for p in image_dir.iterdir()}
    paths: dict[str, list[Path]] = {split: [] for split in SPLITS}
    rows: dict[str, list[int]] = {split: [] for split in SPLITS}
    split_of = {value: split for split, value in SPLITS.items()}
    skipped = 0
    for row, (name, number) in enumerate(zip(table.names, table.lines)):
        if name not in existing:
            if not skip_missing:
                raise CelebANotFoundError(
                    f"{attr_path}:{number}: image {name} not found in {image_dir} "
                    "(set skip_missing: true to skip such rows)"
                )
            skipped += 1
            continue
        split = split_of[partition[name][0]]
        paths[split].append(image_dir / name)
        rows[split].append(row)
    if skipped:
        log.warning("%s: skipped %d listed images that do not exist (skip_missing: true)", attr_path, skipped)
    labels = {split: table.labels[np.asarray(rows[split], dtype=np.int64)] for split in SPLITS}
    return CelebAIndex(root, table.attributes, paths, labels, skipped)


# --------------------------------------------------------------------------- datasets
class AttributeImages(Dataset):
    """Images with optional attribute labels; ``index`` is ``offset`` + the position in ``paths``.

    With ``teacher_transform`` set, samples also carry ``teacher_image`` (the teacher's own preprocessing),
    for running a teacher online instead of from its cache.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray | None,
        num_attributes: int,
        transform: ClassificationTransform,
        offset: int = 0,
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(labels)} label rows")
        self.paths = list(paths)
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self.num_attributes = num_attributes
        self.transform = transform
        self.offset = offset
        self.teacher_transform: Callable[[np.ndarray], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[index]
        decode_size = getattr(self.transform, "decode_size", None)
        if self.teacher_transform is not None:
            decode_size = max(decode_size or 0, getattr(self.teacher_transform, "decode_size", 0)) or None
        image = load_rgb(path, min_size=decode_size)
        sample: dict[str, Any] = {
            "image": self.transform(image, np.random.default_rng(seed)),
            "labels": self.labels[index] if self.labels is not None else torch.zeros(self.num_attributes),
            "labeled": self.labels is not None,
            "index": self.offset + index,
            "path": str(path),
        }
        if self.teacher_transform is not None:
            sample["teacher_image"] = self.teacher_transform(image)
        return sample


class CelebA(AttributeImages):
    """One split of a CelebA root (``train``, ``val`` or ``test``)."""

    def __init__(
        self,
        root: Path | str,
        split: Split,
        transform: ClassificationTransform,
        skip_missing: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        index = read_celeba(Path(root), skip_missing)
        self.attributes = index.attributes
        super().__init__(index.paths[split], index.labels[split], len(index.attributes), transform)


def attribute_transform(input_size: int, train: bool, mean: Sequence[float], std: Sequence[float]) -> Any:
    """The preprocessing of aligned faces: a mild random crop and flip in training (faces stay whole),
    resize and centre crop otherwise."""
    return ClassificationTransform(input_size, train, mean, std, hflip=True, scale=(0.6, 1.0))


class CelebADataModule(BaseDataModule):
    """CelebA train/val/test partitions, optionally plus unlabeled image folders added to training.

    Args:
        root: the CelebA folder (``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``).
        input_size: the model's input resolution.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        skip_missing: drop (and count) listed images that do not exist instead of raising.
        unlabeled_dirs: folders of extra images (nested folders allowed) used only for distillation; they
            join the training set with ``labeled: False``.
        augment: random crop and flip in training.
        mean, std: input normalisation (the default [-1, 1] matches the backbone's ImageNet weights).
        predict_dir: a folder of face images (nested folders allowed) for ``predict``; without it ``predict``
            runs on the test partition. Predicting on a folder does not need the CelebA files under ``root``
            (the model's checkpoint or export names the attributes).
        seed: seed of the shuffling and of each training sample's augmentation.
    """

    seeded_keys = True

    def __init__(
        self,
        root: str,
        input_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        skip_missing: bool = False,
        unlabeled_dirs: list[str] | None = None,
        augment: bool = True,
        mean: tuple[float, float, float] = MINUS_ONE_ONE[0],
        std: tuple[float, float, float] = MINUS_ONE_ONE[1],
        predict_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(input_size, batch_size, num_workers, mean, std, predict_dir, seed)
        self.save_hyperparameters()
        self.root = Path(root)
        self.index: CelebAIndex | None = None
        # set when predict_dir is predicted on without the CelebA files: there are no names to give then
        self._predict_without_index = False
        self.unlabeled_paths: list[Path] = []
        self.datasets: dict[str, Dataset] = {}
        self._parts: dict[str, list[AttributeImages]] = {}
        self.teacher_transform: Callable[[np.ndarray], torch.Tensor] | None = None

    # ----------------------------------------------------------------- what distillation needs
    @property
    def attribute_names(self) -> list[str] | None:
        """The attribute file's names; None while predicting on ``predict_dir`` without the CelebA files."""
        if self.index is None and self._predict_without_index:
            return None
        self._read()
        assert self.index is not None
        return list(self.index.attributes)

    @property
    def image_paths(self) -> list[Path]:
        """Every image of the module in a fixed order (train, val, test, unlabeled): ``index`` of a
        sample is its position here."""
        self._read()
        assert self.index is not None
        return [p for split in SPLITS for p in self.index.paths[split]] + self.unlabeled_paths

    def set_teacher_transform(self, transform: Callable[[np.ndarray], torch.Tensor] | None) -> None:
        """Make samples also carry ``teacher_image`` (for a teacher run online, not from its cache)."""
        self.teacher_transform = transform
        for parts in self._parts.values():
            for part in parts:
                part.teacher_transform = transform

    # ----------------------------------------------------------------- Lightning hooks
    def _read(self) -> None:
        if self.index is not None:
            return
        self.index = read_celeba(self.root, self.hparams.skip_missing)
        unlabeled: list[Path] = []
        for folder in self.hparams.unlabeled_dirs or []:
            folder_path = Path(folder)
            if not folder_path.is_dir():
                raise CelebANotFoundError(f"{folder_path}: unlabeled image folder not found (unlabeled_dirs)")
            found = list_images(folder_path)
            if not found:
                raise CelebANotFoundError(f"{folder_path}: no images found in this unlabeled folder")
            unlabeled += found
        self.unlabeled_paths = unlabeled

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_dir:
            self._setup_predict_folder(Path(self.predict_dir))
            return
        self._read()
        assert self.index is not None
        hp = self.hparams
        num_attributes = len(self.index.attributes)
        offset = 0
        for split in SPLITS:
            train = split == "train" and hp.augment
            transform = attribute_transform(self.input_size, train, self.mean, self.std)
            paths = self.index.paths[split]
            parts = [AttributeImages(paths, self.index.labels[split], num_attributes, transform, offset)]
            offset += len(paths)
            self._parts[split] = parts
        if self.unlabeled_paths:
            transform = attribute_transform(self.input_size, hp.augment, self.mean, self.std)
            self._parts["train"].append(
                AttributeImages(self.unlabeled_paths, None, num_attributes, transform, offset)
            )
        self.set_teacher_transform(self.teacher_transform)
        for split, parts in self._parts.items():
            self.datasets[split] = parts[0] if len(parts) == 1 else KeyedConcatDataset(parts)
            if len(self.datasets[split]) == 0:
                log.warning("%s: the %s partition is empty", self.root / PARTITION_FILE, split)

    def _setup_predict_folder(self, folder: Path) -> None:
        if "predict" in self.datasets:
            return
        try:
            self._read()
        except CelebANotFoundError as error:
            log.info("predicting on %s without the CelebA files (%s)", folder, error)
            self._predict_without_index = True
        paths = images_in_folder(folder, "predict_dir", CelebANotFoundError)
        count = len(self.index.attributes) if self.index is not None else 0
        transform = attribute_transform(self.input_size, False, self.mean, self.std)
        self.datasets["predict"] = AttributeImages(paths, None, count, transform)

    def _dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.setup("predict" if split == "predict" else None)
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("predict" if self.predict_dir else "test"))
