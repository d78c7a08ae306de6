"""Stanford Dogs layout: the generator writes the real formats and the datamodule reads them."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from mobilenets.datasets.image_list import DatasetLayoutError, stratified_split
from mobilenets.datasets.stanford_dogs import (
    AnnotationError,
    StanfordDogsDataModule,
    breed_name,
    read_annotation_box,
    read_split,
)
from mobilenets.datasets.synthetic.drawing import class_colour
from mobilenets.datasets.synthetic.stanford_dogs import make_stanford_dogs


@pytest.fixture(scope="module")
def dogs(tmp_path_factory: pytest.TempPathFactory):
    return make_stanford_dogs(
        tmp_path_factory.mktemp("dogs"), num_classes=3, train_per_class=6, test_per_class=2, size=(80, 60)
    )


def copy_of(dogs, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dogs.root, tmp_path / "copy"))


def test_generated_lists_have_the_real_mat_layout(dogs) -> None:
    mat = scipy.io.loadmat(dogs.root / "lists" / "train_list.mat")
    assert mat["file_list"].shape == (18, 1) and mat["file_list"].dtype == object
    assert mat["annotation_list"].shape == (18, 1)
    assert mat["labels"].shape == (18, 1) and mat["labels"].dtype == np.float64
    first = str(mat["file_list"][0, 0][0])
    assert first == "n02085620-Chihuahua/n02085620_1.jpg"
    assert str(mat["annotation_list"][0, 0][0]) == "n02085620-Chihuahua/n02085620_1"
    assert sorted(set(mat["labels"].ravel().tolist())) == [1.0, 2.0, 3.0]
    assert (dogs.root / "Images" / first).is_file()
    assert (dogs.root / "lists" / "file_list.mat").is_file()


def test_read_split_and_class_names(dogs) -> None:
    split = read_split(dogs.root / "lists" / "test_list.mat")
    assert len(split.files) == 6 and split.labels == [0, 0, 1, 1, 2, 2]
    module = StanfordDogsDataModule(str(dogs.root), input_size=32, num_workers=0, val_fraction=0.2)
    module.setup("fit")
    assert module.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    assert len(module.datasets["train"]) + len(module.datasets["val"]) == 18
    module.setup("test")
    assert len(module.datasets["test"]) == 6
    assert breed_name("n02085782-Japanese_spaniel") == "Japanese spaniel"


def test_annotation_box_is_read_zero_based(dogs) -> None:
    path = next((dogs.root / "Annotation" / "n02085620-Chihuahua").iterdir())
    bndbox = ET.parse(path).getroot().find("object/bndbox")
    xmin, ymin, xmax, ymax = (int(bndbox.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
    assert read_annotation_box(path) == (xmin - 1, ymin - 1, xmax, ymax)


def test_crop_to_box_crops_to_the_dog(dogs) -> None:
    module = StanfordDogsDataModule(
        str(dogs.root), crop_to_box=True, input_size=32, num_workers=0, val_fraction=0.0
    )
    module.setup("test")
    dataset = module.datasets["test"]
    assert dataset.boxes[0] is not None
    sample = dataset[0]
    assert sample["image"].shape == (3, 32, 32)
    assert sample["target"] == 0 and sample["path"].endswith(".jpg")
    # the crop is mostly the class-coloured object; the full image mostly the grey noisy background
    uncropped = StanfordDogsDataModule(str(dogs.root), input_size=32, num_workers=0, val_fraction=0.0)
    uncropped.setup("test")
    colour = torch.tensor(class_colour(0), dtype=torch.float32)

    def distance(image: torch.Tensor) -> float:
        return float(((image.mean(dim=(1, 2)) + 1) * 127.5 - colour).norm())

    assert distance(dataset[0]["image"]) < 0.7 * distance(uncropped.datasets["test"][0]["image"])


def test_missing_list_file_shows_the_expected_layout(dogs, tmp_path: Path) -> None:
    root = copy_of(dogs, tmp_path)
    (root / "lists" / "test_list.mat").unlink()
    module = StanfordDogsDataModule(str(root), num_workers=0)
    with pytest.raises(DatasetLayoutError, match=r"(?s)test_list\.mat: list file not found.*Annotation"):
        module.setup("fit")


def test_missing_images_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"Images: folder not found; expected the Stanford Dogs"):
        StanfordDogsDataModule(str(tmp_path), num_workers=0).setup("fit")


def test_listed_image_that_is_missing_is_named(dogs, tmp_path: Path) -> None:
    root = copy_of(dogs, tmp_path)
    victim = root / "Images" / "n02085782-Japanese_spaniel"
    first = sorted(victim.iterdir())[0]
    first.unlink()
    with pytest.raises(
        DatasetLayoutError, match=rf"{first.name}: listed in lists/\w+_list.mat but not found"
    ):
        StanfordDogsDataModule(str(root), num_workers=0).setup("fit")


def test_bad_labels_and_xml_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mat"
    scipy.io.savemat(bad, {"file_list": np.array([[np.array(["a/b.jpg"])]], dtype=object), "labels": [[0.5]]})
    with pytest.raises(DatasetLayoutError, match=r"bad.mat: labels\[0\] = 0.5"):
        read_split(bad)
    xml = tmp_path / "n0_1"
    xml.write_text("<annotation><object><bndbox><xmin>3</xmin></bndbox></object></annotation>")
    with pytest.raises(AnnotationError, match=r"n0_1: object 0 <bndbox> needs numeric"):
        read_annotation_box(xml)
    xml.write_text("<annotation><object>")
    with pytest.raises(AnnotationError, match=r"n0_1: not valid XML"):
        read_annotation_box(xml)


def test_validation_split_is_seeded_stratified_and_disjoint() -> None:
    targets = [0] * 10 + [1] * 10 + [2] * 3
    train, val = stratified_split(targets, 0.2, seed=1)
    assert not set(train) & set(val) and sorted(train + val) == list(range(23))
    assert sorted(targets[i] for i in val) == [0, 0, 1, 1, 2]
    assert stratified_split(targets, 0.2, seed=1) == (train, val)
    assert stratified_split(targets, 0.2, seed=2) != (train, val)


def test_training_batches_are_normalised_to_minus_one_one(dogs) -> None:
    module = StanfordDogsDataModule(str(dogs.root), input_size=32, batch_size=4, num_workers=0)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= -1.0 and float(batch["image"].max()) <= 1.0
    assert batch["target"].dtype == torch.int64
