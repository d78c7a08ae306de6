"""CelebA's released annotation layout: parsing, malformed files (errors name file and line), the
datamodule with unlabeled folders, and the drawn-faces generator."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilenets.datasets.celeba import (
    ATTRIBUTE_FILE,
    CELEBA_ATTRIBUTES,
    IMAGE_DIR,
    PARTITION_FILE,
    CelebA,
    CelebADataModule,
    CelebAFormatError,
    CelebANotFoundError,
    attribute_transform,
    parse_attribute_file,
    read_celeba,
)
from mobilenets.datasets.synthetic.celeba import make_celeba, make_unlabeled_faces


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("celeba")
    labels = make_celeba(root, 20, size=(40, 48), fractions=(0.6, 0.2))
    return root, labels


def _copy(root: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def _edit_line(path: Path, number: int, edit) -> None:  # type: ignore[no-untyped-def]
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def test_released_layout_parses_with_multiple_spaces(celeba: tuple[Path, np.ndarray]) -> None:
    root, labels = celeba
    text = (root / ATTRIBUTE_FILE).read_text().splitlines()
    assert text[0] == "20" and "  1" in text[2]  # count line; values padded with two spaces as released
    table = parse_attribute_file(root / ATTRIBUTE_FILE)
    assert table.attributes == list(CELEBA_ATTRIBUTES)
    assert table.names[0] == "000001.jpg" and table.lines[0] == 3
    np.testing.assert_array_equal(table.labels, (labels > 0).astype(np.uint8))
    index = read_celeba(root)
    assert [len(index.paths[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    np.testing.assert_array_equal(index.labels["val"], (labels[12:16] > 0))
    assert index.paths["test"][0] == root / IMAGE_DIR / "000017.jpg"


def test_tabs_and_trailing_spaces_are_whitespace(tmp_path: Path) -> None:
    path = tmp_path / ATTRIBUTE_FILE
    path.write_text("2\nA  B\t\na.jpg\t1  -1 \n\nb.jpg -1 1\n")
    table = parse_attribute_file(path)
    assert table.attributes == ["A", "B"] and table.names == ["a.jpg", "b.jpg"]
    assert table.labels.tolist() == [[1, 0], [0, 1]] and table.lines == [3, 5]


@pytest.mark.parametrize(
    ("line", "edit", "message"),
    [
        (5, lambda s: s.rsplit(" ", 1)[0], r"list_attr_celeba\.txt:5: 000003\.jpg has 39 values, expected 40"),
        (6, lambda s: s[:-2] + " 0", r"list_attr_celeba\.txt:6: 000004\.jpg has value '0' for Young, expected -1 or 1"),
        (3, lambda s: s.replace(" 1", " x", 1), r"list_attr_celeba\.txt:3: 000001\.jpg has value 'x'"),
        (1, lambda s: "21", r"list_attr_celeba\.txt:1: the count line says 21 images, the file lists 20"),
        (1, lambda s: "many", r"list_attr_celeba\.txt:1: expected the number of images"),
        (4, lambda s: "000001.jpg" + s[10:], r"list_attr_celeba\.txt:4: 000001\.jpg is listed twice \(first on line 3\)"),
    ],
)  # fmt: skip
def test_malformed_attribute_file_names_file_and_line(
    celeba: tuple[Path, np.ndarray], tmp_path: Path, line: int, edit, message: str
) -> None:  # type: ignore[no-untyped-def]
    root = _copy(celeba[0], tmp_path)
    _edit_line(root / ATTRIBUTE_FILE, line, edit)
    with pytest.raises(CelebAFormatError, match=message):
        read_celeba(root)


def test_partition_file_errors(celeba: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    root = _copy(celeba[0], tmp_path)
    partition = root / PARTITION_FILE
    original = partition.read_text()
    _edit_line(partition, 2, lambda s: s[:-1] + "3")
    with pytest.raises(CelebAFormatError, match=r"list_eval_partition\.txt:2: 000002\.jpg has partition '3'"):
        read_celeba(root)
    # an image listed in the partition file but not in the attribute file
    partition.write_text(original + "999999.jpg 2\n")
    with pytest.raises(
        CelebAFormatError, match=r"list_eval_partition\.txt:21: 999999\.jpg is not in list_attr"
    ):
        read_celeba(root)
    # an attribute row without a partition
    partition.write_text("\n".join(original.splitlines()[:-1]) + "\n")
    with pytest.raises(CelebAFormatError, match=r"list_attr_celeba\.txt:22: 000020\.jpg has no partition"):
        read_celeba(root)
    partition.write_text(original.replace("000005.jpg 0", "000005.jpg 0 extra"))
    with pytest.raises(CelebAFormatError, match=r"list_eval_partition\.txt:5: expected '<image> <0\|1\|2>'"):
        read_celeba(root)


def test_missing_images_raise_or_are_skipped_and_counted(
    celeba: tuple[Path, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(celeba[0], tmp_path)
    (root / IMAGE_DIR / "000004.jpg").unlink()
    (root / IMAGE_DIR / "000018.jpg").unlink()
    with pytest.raises(CelebANotFoundError, match=r"list_attr_celeba\.txt:6: image 000004\.jpg not found"):
        read_celeba(root)
    index = read_celeba(root, skip_missing=True)
    assert index.skipped_missing == 2
    assert [len(index.paths[s]) for s in ("train", "val", "test")] == [11, 4, 3]
    assert "skipped 2 listed images" in caplog.text
    labels = celeba[1]
    np.testing.assert_array_equal(index.labels["train"][3], labels[4] > 0)  # rows stay aligned
    with pytest.raises(CelebANotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        read_celeba(tmp_path / "nowhere")


def test_dataset_sample(celeba: tuple[Path, np.ndarray]) -> None:
    root, labels = celeba
    dataset = CelebA(root, "val", attribute_transform(32, False, (0.5,) * 3, (0.5,) * 3))
    sample = dataset[1]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert float(sample["image"].min()) >= -1.0 and float(sample["image"].max()) <= 1.0
    torch.testing.assert_close(sample["labels"], torch.from_numpy((labels[13] > 0).astype(np.float32)))
    assert sample["labeled"] and sample["path"].endswith("000014.jpg")


def test_datamodule_with_nested_unlabeled_folder(celeba: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    root, _ = celeba
    extra = make_unlabeled_faces(tmp_path / "extra", 5, size=(40, 48))
    assert any("sub" in str(p) for p in extra)
    dm = CelebADataModule(
        str(root), input_size=32, batch_size=4, num_workers=0, unlabeled_dirs=[str(tmp_path / "extra")]
    )
    dm.setup("fit")
    paths = dm.image_paths
    assert len(paths) == 25 and sorted(paths[20:]) == sorted(extra)
    assert dm.attribute_names == list(CELEBA_ATTRIBUTES)
    assert len(dm.datasets["train"]) == 17
    seen = {}
    for batch in dm.train_dataloader():
        for index, path, labeled in zip(batch["index"].tolist(), batch["path"], batch["labeled"].tolist()):
            seen[index] = (path, labeled)
    # drop_last may leave one batch out; every index seen maps back to its path
    assert all(Path(p) == paths[i] and labeled == (i < 20) for i, (p, labeled) in seen.items())
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == [12, 13, 14, 15] and val["labels"].shape == (4, 40)
    dm.set_teacher_transform(attribute_transform(48, False, (0.5,) * 3, (0.5,) * 3))
    sample = dm.datasets["test"][0]
    assert sample["teacher_image"].shape == (3, 48, 48) and sample["image"].shape == (3, 32, 32)
    with pytest.raises(CelebANotFoundError, match="unlabeled image folder not found"):
        CelebADataModule(str(root), unlabeled_dirs=[str(tmp_path / "none")]).setup("fit")


def test_training_batches_with_unlabeled_faces_are_the_same_in_every_run(
    celeba: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """Each training image's crop and flip follow from the seed and the epoch, through the labeled and the
    unlabeled parts alike: two runs train on the same batches, another seed on others."""
    root, _ = celeba
    make_unlabeled_faces(tmp_path / "extra", 5, size=(40, 48))

    def images(seed: int) -> torch.Tensor:
        dm = CelebADataModule(
            str(root), input_size=32, batch_size=4, num_workers=0, seed=seed,
            unlabeled_dirs=[str(tmp_path / "extra")],
        )  # fmt: skip
        dm.setup("fit")
        return torch.cat([batch["image"] for batch in dm.train_dataloader()])

    first = images(0)
    assert torch.equal(first, images(0))
    assert not torch.equal(first, images(1))


#: what the generator derives from drawn attributes instead of drawing (as in real faces, No_Beard and Bald
#: are the absence of a beard and of hair; Attractive follows from youth, smile, make-up and eye bags)
DERIVED = {"Attractive", "Bald", "No_Beard"}


@pytest.mark.parametrize("attribute", CELEBA_ATTRIBUTES)
def test_each_drawn_attribute_shows_in_the_evaluated_crop(attribute: str) -> None:
    """Flipping one attribute of a face changes it where a model looks (the centre crop of a 48 px input,
    the quick demo's student) by a visible patch, and a derived attribute changes nothing by itself."""
    from mobilenets.datasets.synthetic.celeba import HAIR, draw_face

    transform = attribute_transform(48, False, (0.5,) * 3, (0.5,) * 3)
    changed = []
    for seed in range(3):
        base = dict.fromkeys(CELEBA_ATTRIBUTES, False) | {"Brown_Hair": attribute not in HAIR, "Young": True}
        images = [
            transform(
                np.asarray(draw_face(base | {attribute: on}, (56, 68), np.random.default_rng(seed), True))
            )
            for on in (True, False)
        ]
        changed.append(int(((images[0] - images[1]).abs().amax(dim=0) > 0.3).sum()))
    if attribute in DERIVED:
        assert changed == [0, 0, 0]
    else:  # at least 12 of the crop's 2304 pixels, in every draw
        assert min(changed) >= 12, changed
