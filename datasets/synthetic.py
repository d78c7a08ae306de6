"""Small generated datasets in the exact on-disk formats of the real ones (for the demo and the tests).

Fine-grained classification: the Stanford Dogs layout (Images/, Annotation/ PASCAL-VOC XML,
lists/*.mat written with scipy.io.savemat as MATLAB cells), a folder per class, and ``path,label`` CSVs.
Each class is learnable: its object has its own colour, shape and stripe direction.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: The first breeds of the real dataset (wnid-folder names); further classes get made-up names.
REAL_BREED_FOLDERS = (
    "n02085620-Chihuahua",
    "n02085782-Japanese_spaniel",
    "n02085936-Maltese_dog",
    "n02086079-Pekinese",
    "n02086240-Shih-Tzu",
    "n02086646-Blenheim_spaniel",
    "n02086910-papillon",
    "n02087046-toy_terrier",
    "n02087394-Rhodesian_ridgeback",
    "n02088094-Afghan_hound",
    "n02088238-basset",
    "n02088364-beagle",
)

_SHAPES = ("ellipse", "rectangle", "triangle", "diamond")


def breed_folder(label: int) -> str:
    if label < len(REAL_BREED_FOLDERS):
        return REAL_BREED_FOLDERS[label]
    return f"n0299{label:04d}-synthetic_breed_{label}"


def class_colour(label: int) -> tuple[int, int, int]:
    hue = (label * 0.618034) % 1.0  # golden-ratio hues stay far apart for any class count
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_class_image(
    label: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """An image of class ``label`` (noisy background, one object) and the object's box (x0, y0, x1, y1)."""
    width, height = size
    background = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 25, size=(height, width, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    bw = int(width * rng.uniform(0.45, 0.8))
    bh = int(height * rng.uniform(0.45, 0.8))
    x0 = int(rng.integers(0, width - bw + 1))
    y0 = int(rng.integers(0, height - bh + 1))
    box = (x0, y0, x0 + bw, y0 + bh)
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in class_colour(label))
    shape = _SHAPES[label % len(_SHAPES)]
    x1, y1 = x0 + bw - 1, y0 + bh - 1
    if shape == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    else:
        draw.polygon(
            [((x0 + x1) // 2, y0), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)],
            fill=colour,
        )
    # stripes whose direction depends on the class: a texture cue beside colour and shape
    stripe = tuple(max(c - 90, 0) for c in colour)
    step = max(bw, bh) // 6 + 2
    vertical = (label // len(_SHAPES)) % 2 == 0
    for offset in range(0, bw if vertical else bh, step):
        if vertical:
            draw.line([(x0 + offset, y0 + bh // 4), (x0 + offset, y1 - bh // 4)], fill=stripe, width=2)
        else:
            draw.line([(x0 + bw // 4, y0 + offset), (x1 - bw // 4, y0 + offset)], fill=stripe, width=2)
    return image, box


def voc_xml(
    filename: str, folder: str, size: tuple[int, int], name: str, box: tuple[int, int, int, int]
) -> str:
    """A PASCAL-VOC annotation like Stanford Dogs' (1-based inclusive box corners)."""
    x0, y0, x1, y1 = box
    return (
        "<annotation>\n"
        f"\t<folder>{folder}</folder>\n"
        f"\t<filename>{filename}</filename>\n"
        "\t<source>\n\t\t<database>ImageNet database</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segment>0</segment>\n"
        "\t<object>\n"
        f"\t\t<name>{name}</name>\n"
        "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
        f"\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n"
        "\t</object>\n"
        "</annotation>\n"
    )


def _cell_column(strings: list[str]) -> np.ndarray:
    cells = np.empty((len(strings), 1), dtype=object)
    for row, value in enumerate(strings):
        cells[row, 0] = np.array([value])
    return cells


def write_dogs_list(path: Path, files: list[str], labels: list[int]) -> None:
    """A lists/*.mat file exactly like the real ones: cells (N, 1) of strings and labels (N, 1) doubles."""
    import scipy.io

    annotations = [f.rsplit(".", 1)[0] for f in files]
    scipy.io.savemat(
        path,
        {
            "file_list": _cell_column(files),
            "annotation_list": _cell_column(annotations),
            "labels": np.asarray(labels, dtype=np.float64).reshape(-1, 1),
        },
    )


@dataclass(frozen=True)
class GeneratedDogs:
    """What ``make_stanford_dogs`` wrote."""

    root: Path
    class_names: list[str]
    num_train: int
    num_test: int


def make_stanford_dogs(
    root: Path,
    num_classes: int = 4,
    train_per_class: int = 12,
    test_per_class: int = 4,
    size: tuple[int, int] = (120, 90),
    seed: int = 0,
    quality: int = 90,
) -> GeneratedDogs:
    """Write a Stanford-Dogs-layout dataset under ``root`` (labels 1..num_classes, real breed folders)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    counter = 0
    for label in range(num_classes):
        folder = breed_folder(label)
        wnid = folder.split("-", 1)[0]
        (root / "Images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "Annotation" / folder).mkdir(parents=True, exist_ok=True)
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for _ in range(count):
                counter += 1
                stem = f"{wnid}_{counter}"
                image, box = draw_class_image(label, size, rng)
                image.save(root / "Images" / folder / f"{stem}.jpg", quality=quality)
                xml = voc_xml(stem, wnid, size, folder.split("-", 1)[1], box)
                (root / "Annotation" / folder / stem).write_text(xml)
                lists[split][0].append(f"{folder}/{stem}.jpg")
                lists[split][1].append(label + 1)
    for split, (files, labels) in lists.items():
        write_dogs_list(root / "lists" / f"{split}_list.mat", files, labels)
    all_files = lists["train"][0] + lists["test"][0]
    write_dogs_list(root / "lists" / "file_list.mat", all_files, lists["train"][1] + lists["test"][1])
    names = [breed_folder(label).split("-", 1)[1].replace("_", " ") for label in range(num_classes)]
    return GeneratedDogs(root, names, len(lists["train"][0]), len(lists["test"][0]))


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


def write_colour_mode_variants(folder: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[Path]:
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


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (96, 72), keep: float = 0.5) -> Path:
    """A JPEG cut short after ``keep`` of its bytes (what an interrupted download leaves)."""
    image, _ = draw_class_image(1, size, np.random.default_rng(1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)
