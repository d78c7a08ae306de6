"""Stanford Dogs (Khosla et al. 2011) in its official layout, and its LightningDataModule.

<root>/Images/n02085620-Chihuahua/n02085620_10074.jpg
<root>/Annotation/n02085620-Chihuahua/n02085620_10074      (PASCAL-VOC XML, no extension)
<root>/lists/train_list.mat, <root>/lists/test_list.mat   (file_list, annotation_list, labels 1..120)
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.image_list import DatasetLayoutError, ImageDataModule
from mobilenets.datasets.images import Box

EXPECTED_LAYOUT = """expected the Stanford Dogs layout:
  <root>/Images/<wnid>-<breed>/<wnid>_<n>.jpg
  <root>/Annotation/<wnid>-<breed>/<wnid>_<n>   (PASCAL-VOC XML)
  <root>/lists/train_list.mat, <root>/lists/test_list.mat   (file_list, annotation_list, labels)"""


class AnnotationError(MobilenetsError, ValueError):
    """A PASCAL-VOC annotation file that cannot be read; the message names the file and element."""


@dataclass(frozen=True)
class DogsSplit:
    """One list file parsed: image paths (relative to Images/), annotation paths, 0-based labels."""

    files: list[str]
    annotations: list[str]
    labels: list[int]


def breed_name(folder: str) -> str:
    """``n02085620-Chihuahua`` → ``Chihuahua``; ``n02085782-Japanese_spaniel`` → ``Japanese spaniel``."""
    _, _, breed = folder.partition("-")
    return (breed or folder).replace("_", " ")


def _cell_strings(mat: dict[str, Any], key: str, path: Path) -> list[str]:
    if key not in mat:
        raise DatasetLayoutError(f"{path}: no '{key}' variable (has {sorted(k for k in mat if k[0] != '_')})")
    cells = np.asarray(mat[key]).reshape(-1)
    out = []
    for row, cell in enumerate(cells):
        value = np.asarray(cell).reshape(-1)
        if value.size != 1:
            raise DatasetLayoutError(f"{path}: {key}[{row}] should hold one string, got {value!r}")
        out.append(str(value[0]))
    return out


def read_split(path: Path) -> DogsSplit:
    """Parse ``lists/train_list.mat`` or ``lists/test_list.mat`` (MATLAB cells of strings and labels)."""
    import scipy.io

    if not path.is_file():
        raise DatasetLayoutError(f"{path}: list file not found; {EXPECTED_LAYOUT}")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises several types for a damaged file
        raise DatasetLayoutError(f"{path}: not a readable MATLAB file ({error})") from error
    files = _cell_strings(mat, "file_list", path)
    annotations = (
        _cell_strings(mat, "annotation_list", path)
        if "annotation_list" in mat
        else [f.rsplit(".", 1)[0] for f in files]
    )
    if "labels" not in mat:
        raise DatasetLayoutError(f"{path}: no 'labels' variable; {EXPECTED_LAYOUT}")
    raw = np.asarray(mat["labels"]).reshape(-1)
    if not (len(files) == len(annotations) == len(raw)):
        raise DatasetLayoutError(
            f"{path}: file_list, annotation_list and labels differ in length "
            f"({len(files)}, {len(annotations)}, {len(raw)})"
        )
    labels = []
    for row, value in enumerate(raw):
        if value != int(value) or value < 1:
            raise DatasetLayoutError(f"{path}: labels[{row}] = {value}; expected an integer class 1..120")
        labels.append(int(value) - 1)
    return DogsSplit(files, annotations, labels)


def read_annotation_box(path: Path) -> Box:
    """The union of the object boxes of a PASCAL-VOC XML file (all dogs in an image share the breed)."""
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise AnnotationError(f"{path}: not valid XML ({error})") from error
    boxes = []
    for index, obj in enumerate(root.iter("object")):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"{path}: object {index} has no <bndbox>")
        try:
            coords = [float(bndbox.findtext(tag, "")) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as error:
            raise AnnotationError(
                f"{path}: object {index} <bndbox> needs numeric xmin, ymin, xmax, ymax ({error})"
            ) from error
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise AnnotationError(f"{path}: object {index} has an empty box {coords}")
        boxes.append(coords)
    if not boxes:
        raise AnnotationError(f"{path}: no <object> with a <bndbox>")
    array = np.asarray(boxes)
    # VOC boxes are 1-based inclusive pixel indices
    return (
        float(array[:, 0].min() - 1),
        float(array[:, 1].min() - 1),
        float(array[:, 2].max()),
        float(array[:, 3].max()),
    )


def class_names_from(splits: list[DogsSplit], source: Path) -> list[str]:
    """Breed names indexed by label, from the folder of the files carrying each label."""
    folders: dict[int, str] = {}
    for split in splits:
        for file, label in zip(split.files, split.labels):
            folder = file.split("/", 1)[0]
            if folders.setdefault(label, folder) != folder:
                raise DatasetLayoutError(
                    f"{source}: label {label + 1} is used for both {folders[label]} and {folder}"
                )
    count = max(folders) + 1
    missing = sorted(set(range(count)) - set(folders))
    if missing:
        raise DatasetLayoutError(f"{source}: labels {[m + 1 for m in missing]} have no images")
    return [breed_name(folders[label]) for label in range(count)]


class StanfordDogsDataModule(ImageDataModule):
    """Stanford Dogs from its official files: train (with a seeded validation split carved from it) and
    test from ``lists/*.mat``, 120 breed names from the folder names.

    Args:
        root: the folder holding ``Images/``, ``Annotation/`` and ``lists/``.
        crop_to_box: crop each image to its annotated dog box (the union of the boxes) first.
        **kwargs: the ``ImageDataModule`` options (input_size, batch_size, num_workers, val_fraction, ...).
    """

    def __init__(self, root: str, crop_to_box: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.crop_to_box = crop_to_box
        self._parsed: dict[str, DogsSplit] | None = None
        self.class_names = None

    def parsed(self) -> dict[str, DogsSplit]:
        if self._parsed is None:
            if not (self.root / "Images").is_dir():
                raise DatasetLayoutError(f"{self.root / 'Images'}: folder not found; {EXPECTED_LAYOUT}")
            self._parsed = {
                "train": read_split(self.root / "lists" / "train_list.mat"),
                "test": read_split(self.root / "lists" / "test_list.mat"),
            }
            self.class_names = class_names_from(list(self._parsed.values()), self.root / "lists")
        return self._parsed

    def load_splits(self) -> dict[str, tuple[list[Path], list[Any], list[Box | None] | None]]:
        splits = {}
        for name, split in self.parsed().items():
            paths = [self.root / "Images" / file for file in split.files]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DatasetLayoutError(
                    f"{missing[0]}: listed in lists/{name}_list.mat but not found "
                    f"({len(missing)} missing); {EXPECTED_LAYOUT}"
                )
            boxes = None
            if self.crop_to_box:
                boxes = [read_annotation_box(self.root / "Annotation" / a) for a in split.annotations]
            splits[name] = (paths, list(split.labels), boxes)
        return splits

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and (self.predict_dir or self.predict_list):
            # class names only; a checkpoint carries them when the dataset is not on this machine
            with contextlib.suppress(DatasetLayoutError):
                self.parsed()
        else:
            self.parsed()
        super().setup(stage)
