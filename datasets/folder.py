"""A user's own image-label dataset: a folder per class, or CSV files of ``path,label``.

Class names are the folder names or the distinct labels, sorted, so the index of a class is stable
across runs and machines; the task saves them in its checkpoint.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mobilenets.datasets.image_list import DatasetLayoutError, ImageDataModule
from mobilenets.datasets.images import Box, list_images

FOLDER_LAYOUT = """expected a folder per class:
  <root>/<class name>/<image>.jpg            (validation carved from it with the seed)
or split folders, each with a folder per class:
  <root>/train/<class name>/<image>.jpg, <root>/val/<class name>/..., optional <root>/test/<class name>/..."""

CSV_LAYOUT = """expected a CSV file with a header row and the columns path,label, e.g.
  path,label
  images/0001.jpg,golden retriever
(relative paths are relative to image_root, or to the CSV file's folder)"""

SPLIT_FOLDERS = ("train", "val", "test")


def scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` of ``folder``'s subfolders; an empty class is an error."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: folder not found; {FOLDER_LAYOUT}")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetLayoutError(f"{folder}: no class folders found; {FOLDER_LAYOUT}")
    images = {}
    for class_folder in classes:
        found = list_images(class_folder)
        if not found:
            raise DatasetLayoutError(f"{class_folder}: class folder holds no images; {FOLDER_LAYOUT}")
        images[class_folder.name] = found
    return images


def is_split_layout(root: Path) -> bool:
    train = root / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


class FolderDataModule(ImageDataModule):
    """Images in a folder per class (optionally under ``train/``, ``val/``, ``test/``).

    Without ``val/`` a validation split is carved from train (``val_fraction``, seeded); without
    ``test/`` the test loop runs on the validation split.

    Args:
        root: the dataset folder.
        **kwargs: the ``ImageDataModule`` options (input_size, batch_size, num_workers, val_fraction, ...).
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)

    def load_splits(self) -> dict[str, tuple[list[Path], list[Any], list[Box | None] | None]]:
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.root}: dataset folder not found; {FOLDER_LAYOUT}")
        folders = (
            {s: self.root / s for s in SPLIT_FOLDERS if (self.root / s).is_dir()}
            if is_split_layout(self.root)
            else {"train": self.root}
        )
        scanned = {split: scan_class_folders(folder) for split, folder in folders.items()}
        self.class_names = sorted(scanned["train"])
        index = {name: i for i, name in enumerate(self.class_names)}
        splits = {}
        for split, classes in scanned.items():
            unknown = sorted(set(classes) - set(index))
            if unknown:
                raise DatasetLayoutError(
                    f"{folders[split]}: classes {unknown} do not exist in {folders['train']}"
                )
            paths = [p for name in classes for p in classes[name]]
            targets = [index[name] for name in classes for _ in classes[name]]
            splits[split] = (paths, targets, None)
        return splits


def read_label_csv(path: Path, image_root: Path | None = None) -> tuple[list[Path], list[str]]:
    """Paths and label strings of a ``path,label`` CSV; errors name the file and row."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: CSV file not found; {CSV_LAYOUT}")
    base = image_root if image_root is not None else path.parent
    paths, labels = [], []
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a BOM would rename the 'path' column
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetLayoutError(f"{path}: header is {reader.fieldnames}; {CSV_LAYOUT}")
        for row_number, row in enumerate(reader, start=2):
            file, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not file or not label:
                raise DatasetLayoutError(f"{path}: row {row_number} needs both a path and a label, got {row}")
            image = Path(file) if Path(file).is_absolute() else base / file
            if not image.is_file():
                raise DatasetLayoutError(f"{path}: row {row_number}: image {image} not found")
            paths.append(image)
            labels.append(label)
    if not paths:
        raise DatasetLayoutError(f"{path}: no rows; {CSV_LAYOUT}")
    return paths, labels


class CsvDataModule(ImageDataModule):
    """Images listed in CSV files of ``path,label`` (class names: the sorted distinct labels of train).

    Args:
        train_csv: the training list.
        val_csv: the validation list (carved from train with the seed when None).
        test_csv: the test list (the validation split is tested when None).
        image_root: folder relative paths start from (default: each CSV file's folder).
        **kwargs: the ``ImageDataModule`` options.
    """

    def __init__(
        self,
        train_csv: str,
        val_csv: str | None = None,
        test_csv: str | None = None,
        image_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.csv_files = {"train": train_csv, "val": val_csv, "test": test_csv}
        self.image_root = Path(image_root) if image_root else None

    def load_splits(self) -> dict[str, tuple[list[Path], list[Any], list[Box | None] | None]]:
        read = {
            split: read_label_csv(Path(file), self.image_root)
            for split, file in self.csv_files.items()
            if file
        }
        self.class_names = sorted(set(read["train"][1]))
        index = {name: i for i, name in enumerate(self.class_names)}
        splits = {}
        for split, (paths, labels) in read.items():
            unknown = sorted(set(labels) - set(index))
            if unknown:
                raise DatasetLayoutError(
                    f"{self.csv_files[split]}: labels {unknown} do not occur in {self.csv_files['train']}"
                )
            splits[split] = (paths, [index[label] for label in labels], None)
        return splits
