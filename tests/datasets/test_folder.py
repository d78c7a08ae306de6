"""A user's folder / CSV datasets, the shared image-list dataset, decoding and the fast transform."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenets.datasets import images
from mobilenets.datasets.folder import CsvDataModule, FolderDataModule
from mobilenets.datasets.image_list import (
    DatasetLayoutError,
    ImageDataModule,
    ImageListDataset,
)
from mobilenets.datasets.images import (
    CorruptImageError,
    check_images,
    images_in_folder,
    list_images,
    load_rgb,
    load_rgb_region,
)
from mobilenets.datasets.synthetic.folder import (
    make_colour_mode_variants,
    make_image_folder,
    make_label_csv,
    make_truncated_jpeg,
)
from mobilenets.datasets.transforms import ClassificationTransform

NAMES = ["spaniel", "beagle", "collie"]


def test_folder_per_class_names_are_sorted_and_val_is_carved(tmp_path: Path) -> None:
    make_image_folder(tmp_path, NAMES, per_class=5, size=(40, 30))
    module = FolderDataModule(str(tmp_path), input_size=32, num_workers=0, val_fraction=0.2)
    module.setup("fit")
    assert module.class_names == ["beagle", "collie", "spaniel"]
    train, val = module.datasets["train"], module.datasets["val"]
    assert len(train) == 12 and len(val) == 3
    assert sorted(val.targets) == [0, 1, 2]
    for path, target in zip(train.paths, train.targets):
        assert path.parent.name == module.class_names[target]
    module.setup("test")  # no test/ folder: the validation split is tested
    assert module.datasets["test"].paths == val.paths


def test_split_folders_are_used_as_given(tmp_path: Path) -> None:
    make_image_folder(tmp_path, NAMES, per_class=3, size=(40, 30), split_layout=True, val_per_class=1)
    module = FolderDataModule(str(tmp_path), input_size=32, num_workers=0)
    module.setup("fit")
    assert len(module.datasets["train"]) == 9 and len(module.datasets["val"]) == 3
    assert all("/val/" in str(p) for p in module.datasets["val"].paths)


def test_empty_class_folder_shows_the_expected_layout(tmp_path: Path) -> None:
    make_image_folder(tmp_path, NAMES, per_class=2, size=(40, 30))
    (tmp_path / "husky").mkdir()
    with pytest.raises(
        DatasetLayoutError, match=r"(?s)husky: class folder holds no images.*<root>/<class name>"
    ):
        FolderDataModule(str(tmp_path), num_workers=0).setup("fit")
    with pytest.raises(DatasetLayoutError, match=r"nowhere: dataset folder not found"):
        FolderDataModule(str(tmp_path / "nowhere"), num_workers=0).setup("fit")


def test_csv_labels_and_errors(tmp_path: Path) -> None:
    csv_file = make_label_csv(tmp_path, NAMES, per_class=4)
    module = CsvDataModule(str(csv_file), input_size=32, num_workers=0, val_fraction=0.25)
    module.setup("fit")
    assert module.class_names == ["beagle", "collie", "spaniel"]
    sample = module.datasets["train"][0]
    assert sample["image"].shape == (3, 32, 32)
    assert module.class_names[sample["target"]] == NAMES[int(Path(sample["path"]).name[:2])]

    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nimages/00_0000.jpg,beagle\n")
    with pytest.raises(DatasetLayoutError, match=r"bad.csv: header is \['file', 'class'\]"):
        CsvDataModule(str(bad), num_workers=0).setup("fit")
    bad.write_text("path,label\nimages/00_0000.jpg,beagle\nimages/missing.jpg,beagle\n")
    with pytest.raises(DatasetLayoutError, match=r"bad.csv: row 3: image .*missing.jpg not found"):
        CsvDataModule(str(bad), num_workers=0).setup("fit")


def test_colour_modes_become_rgb(tmp_path: Path) -> None:
    paths = make_colour_mode_variants(tmp_path)
    for path in paths:
        image = load_rgb(path)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8, path.name
    dataset = ImageListDataset(paths, [0] * len(paths), ClassificationTransform(32, train=False))
    assert all(dataset[i]["image"].shape == (3, 32, 32) for i in range(len(paths)))
    # an RGBA pixel with alpha 0 is composited on white
    transparent = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(transparent)
    assert load_rgb(transparent)[0, 0].tolist() == [255, 255, 255]


def test_corrupt_images_raise_or_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    make_image_folder(tmp_path / "data", ["a", "b"], per_class=3, size=(64, 48))
    truncated = make_truncated_jpeg(tmp_path / "data" / "a" / "broken.jpg", size=(64, 48))
    (tmp_path / "data" / "b" / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match=r"broken.jpg: cannot decode image"):
        load_rgb(truncated)
    # verify() alone misses a JPEG cut short; the check decodes the scans
    with pytest.raises(CorruptImageError, match=r"broken.jpg.*skip_corrupt: true"):
        check_images([truncated], skip_corrupt=False)

    strict = FolderDataModule(str(tmp_path / "data"), input_size=32, num_workers=0, val_fraction=0.0)
    strict.setup("fit")
    with pytest.raises(CorruptImageError, match=r"(broken|garbage).jpg: cannot decode image"):
        [strict.datasets["train"][i] for i in range(len(strict.datasets["train"]))]

    with caplog.at_level(logging.WARNING):
        lenient = FolderDataModule(
            str(tmp_path / "data"), input_size=32, num_workers=0, val_fraction=0.0, skip_corrupt=True
        )
        lenient.setup("fit")
    dataset = lenient.datasets["train"]
    assert len(dataset) == 6 and dataset.skipped == 2
    assert "skipped 2 corrupt" in caplog.text
    assert all(dataset[i]["image"].shape == (3, 32, 32) for i in range(len(dataset)))


def test_region_decode_uses_a_reduced_dct_scale(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    gradient = np.linspace(0, 255, 1600, dtype=np.float32)
    Image.fromarray(np.stack([np.tile(gradient, (1200, 1))] * 3, -1).astype(np.uint8)).save(path)
    region = load_rgb_region(path, lambda w, h: (0.0, 0.0, float(w), float(h)), min_output=224)
    assert region.shape == (300, 400, 3)  # 1/4 scale keeps the shorter side >= 224
    half = load_rgb_region(path, lambda w, h: (800.0, 0.0, 1600.0, 1200.0), min_output=224)
    assert half.shape == (600, 400, 3)  # the right half: 800 px wide needs 1/2 scale to keep 224
    assert half[:, :, 0].mean() > region[:, :, 0].mean()  # the brighter half of the gradient
    full = load_rgb_region(path, lambda w, h: (0.0, 0.0, 300.0, 300.0), min_output=224)
    assert full.shape == (300, 300, 3)  # a small region needs full resolution


def test_turbo_jpeg_path_matches_pil_and_falls_back_for_cmyk(tmp_path: Path, monkeypatch) -> None:
    turbo_decodes: list[int] = []
    decode_jpeg = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(
        images.simplejpeg, "decode_jpeg", lambda *a, **k: turbo_decodes.append(1) or decode_jpeg(*a, **k)
    )
    rng = np.random.default_rng(1)
    base = np.linspace(0, 220, 320, dtype=np.float32)[None, :, None] + rng.normal(0, 12, (240, 320, 3))
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    with Image.open(path) as image:
        reference = np.asarray(image.convert("RGB")).astype(int)
    ours = load_rgb(path).astype(int)
    assert len(turbo_decodes) == 1  # libjpeg-turbo decoded it, not PIL
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 2 and np.abs(ours - reference).mean() < 0.2
    half = load_rgb(path, min_size=100)  # 240 / 2 = 120 >= 100; 240 / 4 = 60 is too small
    assert half.shape == (120, 160, 3)
    # CMYK JPEGs are not for libjpeg-turbo's RGB output: PIL decodes them, still as RGB
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(pixels).convert("CMYK").save(cmyk, quality=90)
    turbo_decodes.clear()
    assert load_rgb(cmyk).shape == (240, 320, 3)
    assert not turbo_decodes


def test_region_decode_chooses_the_box_once_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((200, 300, 3), 90, np.uint8)).save(path)
    sizes: list[tuple[int, int]] = []

    def choose(width: int, height: int) -> tuple[float, float, float, float]:
        sizes.append((width, height))
        return (10.0, 20.0, 110.0, 120.0)

    region = load_rgb_region(path, choose, min_output=48)
    assert sizes == [(300, 200)]
    assert region.shape == (50, 50, 3)  # 100 px box at 1/2 scale stays >= 48


def test_truncated_jpeg_fails_on_both_decoders(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        load_rgb(path)
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        load_rgb_region(path, lambda w, h: (0.0, 0.0, float(w), float(h)), min_output=32)


def test_fast_eval_transform_matches_the_albumentations_pipeline() -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((90, 120, 3)) * 40 + np.linspace(0, 200, 120)[None, :, None]).astype(np.uint8)
    fast = ClassificationTransform(64, train=False)(image)
    reference = ClassificationTransform(64, train=False, backend="albumentations")(image)
    assert fast.shape == reference.shape == (3, 64, 64)
    assert float((fast - reference).abs().mean()) < 0.05


def test_train_transform_is_reproducible_from_a_seed() -> None:
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    transform = ClassificationTransform(48, train=True)
    first = transform(image, np.random.default_rng(7))
    assert torch.equal(first, transform(image, np.random.default_rng(7)))
    assert not torch.equal(first, transform(image, np.random.default_rng(8)))
    assert first.shape == (3, 48, 48) and float(first.min()) >= -1.0 and float(first.max()) <= 1.0


def test_predict_from_a_folder_or_a_list(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", NAMES, per_class=2, size=(40, 30))
    listing = tmp_path / "to_predict.txt"
    listing.write_text("# images\ndata/beagle/0000.jpg\n\ndata/collie/0001.jpg\n")
    module = FolderDataModule(str(tmp_path / "data"), input_size=32, num_workers=0, predict_list=str(listing))
    batch = next(iter(module.predict_dataloader()))
    assert [Path(p).parent.name for p in batch["path"]] == ["beagle", "collie"]
    assert batch["target"].tolist() == [-1, -1]
    by_dir = FolderDataModule(
        str(tmp_path / "data"), input_size=32, num_workers=0, predict_dir=str(tmp_path / "data" / "collie")
    )
    assert len(by_dir.predict_dataloader().dataset) == 2
    with pytest.raises(DatasetLayoutError, match=r"nothing.txt: predict list not found"):
        FolderDataModule(
            str(tmp_path / "data"), num_workers=0, predict_list=str(tmp_path / "nothing.txt")
        ).predict_dataloader()


def test_base_datamodule_is_reusable_for_other_targets(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["x"], per_class=4, size=(40, 30))
    paths = sorted(tmp_path.glob("x/*.jpg"))

    class VectorTargets(ImageDataModule):
        def load_splits(self):
            return {"train": (paths, [torch.tensor([float(i), 1.0]) for i in range(4)], None)}

    module = VectorTargets(input_size=32, batch_size=4, num_workers=0, val_fraction=0.0)
    batch = next(iter(module.train_dataloader()))
    assert batch["target"].shape == (4, 2)
    assert sorted(batch["target"][:, 0].tolist()) == [0.0, 1.0, 2.0, 3.0]


def test_predicting_needs_no_training_data_on_disk(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "new", ["x"], per_class=3, size=(40, 30))
    module = FolderDataModule(
        str(tmp_path / "gone"), input_size=32, num_workers=0, predict_dir=str(tmp_path / "new")
    )
    module.setup("predict")
    assert len(module.predict_dataloader().dataset) == 3


def test_images_in_folder_names_the_folder_and_what_it_was_given_as(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"nowhere: --images is not a folder"):
        images_in_folder(tmp_path / "nowhere", "--images", DatasetLayoutError)
    with pytest.raises(FileNotFoundError, match=r"empty: predict_dir holds no images"):
        images_in_folder(tmp_path / "empty", "predict_dir")
    make_image_folder(tmp_path / "photos", NAMES, per_class=1)
    assert images_in_folder(tmp_path / "photos", "predict_dir") == list_images(tmp_path / "photos")
