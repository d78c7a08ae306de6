"""A small generated dataset in the Stanford Dogs layout: Images/, Annotation/ PASCAL-VOC XML, and
lists/*.mat written with scipy.io.savemat as MATLAB cells, exactly as released."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilenets.datasets.synthetic.drawing import draw_class_image

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


def breed_folder(label: int) -> str:
    """The ``<wnid>-<breed>`` folder of class ``label`` (0-based)."""
    if label < len(REAL_BREED_FOLDERS):
        return REAL_BREED_FOLDERS[label]
    return f"n0299{label:04d}-synthetic_breed_{label}"


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
