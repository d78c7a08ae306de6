"""Small generated class datasets in the generic layouts: a folder per class, and a ``path,label`` CSV;
plus the awkward files real folders hold (odd colour modes, truncated JPEGs)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from mobilenets.datasets.synthetic.drawing import draw_class_image


def make_image_folder(
    root: Path,
    class_names: list[str],
    per_class: int = 8,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
    split_layout: bool = False,
    val_per_class: int = 2,
) -> Path:
    """A folder per class (``root/<class>/`` or, with ``split_layout``, ``root/train|val/<class>/``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": per_class, "val": val_per_class} if split_layout else {"": per_class}
    for split, count in splits.items():
        for label, name in enumerate(class_names):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image, _ = draw_class_image(label, size, rng)
                image.save(folder / f"{index:04d}.jpg", quality=90)
    return root


def make_label_csv(root: Path, class_names: list[str], per_class: int = 8, seed: int = 0) -> Path:
    """``root/images/*.jpg`` plus ``root/labels.csv`` with columns path,label; returns the CSV."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(class_names):
        for index in range(per_class):
            image, _ = draw_class_image(label, (96, 72), rng)
            file = f"images/{label:02d}_{index:04d}.jpg"
            image.save(root / file, quality=90)
            rows.append((file, name))
    path = root / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def make_colour_mode_variants(folder: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[Path]:
    """The same kind of image saved as grayscale JPEG, CMYK JPEG, RGBA PNG and palette PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = draw_class_image(0, size, np.random.default_rng(seed))
    variants = {
        "gray.jpg": image.convert("L"),
        "cmyk.jpg": image.convert("CMYK"),
        "rgba.png": image.convert("RGBA"),
        "palette.png": image.convert("P"),
    }
    paths = []
    for name, variant in variants.items():
        variant.save(folder / name)
        paths.append(folder / name)
    return paths


def make_truncated_jpeg(path: Path, size: tuple[int, int] = (96, 72), keep: float = 0.5) -> Path:
    """A JPEG cut short after ``keep`` of its bytes (what an interrupted download leaves)."""
    image, _ = draw_class_image(1, size, np.random.default_rng(1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)
