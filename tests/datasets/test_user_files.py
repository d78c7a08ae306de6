"""Files as users write them: a UTF-8 byte-order mark and CRLF line endings (Excel, Notepad) read like plain
UTF-8 with LF; COCO training annotations with a repeated image id are refused; what a loader drops or skips
is named in the log, not only counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mobilenets.datasets.coco import CocoFormatError, load_coco_json
from mobilenets.datasets.faces import parse_pairs, read_identity_csv
from mobilenets.datasets.folder import read_label_csv
from mobilenets.datasets.geotags import read_geotags
from mobilenets.datasets.images import check_images
from mobilenets.datasets.s2cells import Partition
from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.datasets.synthetic.folder import make_image_folder, make_label_csv, make_truncated_jpeg


def windows_copy(path: Path) -> Path:
    """The same text with a byte-order mark and CRLF line endings, beside the original."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\n", "\r\n")
    copy = path.with_name("windows_" + path.name)
    copy.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return copy


def test_label_csv(tmp_path: Path) -> None:
    csv_path = make_label_csv(tmp_path, ["cat", "dog"], per_class=2)
    assert read_label_csv(windows_copy(csv_path)) == read_label_csv(csv_path)
    assert read_label_csv(csv_path)[1] == ["cat", "cat", "dog", "dog"]


def test_identity_csv_and_pairs(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    make_identity_folders(root, num_identities=4, images_per_identity=2, size=32, seed=0)
    files = sorted(root.glob("*/*.jpg"))
    identity_csv = tmp_path / "ids.csv"
    identity_csv.write_text("".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in files))
    plain = read_identity_csv(identity_csv)
    assert read_identity_csv(windows_copy(identity_csv)) == plain and len(plain) == len(files)
    pairs = tmp_path / "pairs.txt"
    make_lfw_pairs(pairs, root, folds=2, pairs_per_fold=1, seed=0)
    assert parse_pairs(windows_copy(pairs), root) == parse_pairs(pairs, root)


def test_geotags_and_partition(tmp_path: Path) -> None:
    geotags = tmp_path / "geo.csv"
    geotags.write_text("IMG_ID,LAT,LON\na.jpg,48.85,2.29\nb.jpg,-33.86,151.2\nc.jpg,40.7,-74.0\n")
    plain, windows = read_geotags(geotags), read_geotags(windows_copy(geotags))
    assert np.array_equal(plain.lat, windows.lat) and plain.images == windows.images == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
    ]
    from mobilenets.datasets.s2cells import build_partition

    partition_csv = tmp_path / "partition.csv"
    build_partition(plain.lat, plain.lon, 10, 1, 0, 30).write_csv(partition_csv)
    a, b = Partition.read_csv(partition_csv), Partition.read_csv(windows_copy(partition_csv))
    assert a.tokens == b.tokens and np.array_equal(a.photos, b.photos)


def _coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = tmp_path / "instances.json"
    categories = [{"id": 1, "name": "shape"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_training_annotations_refuse_a_repeated_image_id(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8},
              {"id": 2, "file_name": "b.jpg", "width": 8, "height": 8},
              {"id": 1, "file_name": "c.jpg", "width": 8, "height": 8}]  # fmt: skip
    path = _coco(tmp_path, images, [])
    with pytest.raises(CocoFormatError, match=r"instances\.json: images\[2\] repeats image id 1"):
        load_coco_json(path)


def test_a_dropped_box_and_a_skipped_image_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mobilenets.datasets.coco import CategoryMap, CocoStats, boxes_for_image

    stats = CocoStats()
    annotations = [{"id": 7, "bbox": [2.0, 2.0, 4.0, 4.0], "category_id": 1},
                   {"id": 8, "bbox": [30.0, 1.0, 5.0, 5.0], "category_id": 1}]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mobilenets"):
        boxes, _ = boxes_for_image(annotations, 10.0, 10.0, CategoryMap((1,), ("shape",)), stats)
    assert len(boxes) == 1 and stats.degenerate_dropped == 1
    assert "dropped annotation id 8: box [30.0, 1.0, 5.0, 5.0] is under 1 px" in caplog.text
    folder = make_image_folder(tmp_path / "images", ["a"], per_class=2, size=(32, 24))
    broken = make_truncated_jpeg(folder / "a" / "broken.jpg", size=(32, 24))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mobilenets"):
        kept, skipped = check_images(sorted(folder.glob("a/*.jpg")), skip_corrupt=True)
    assert skipped == 1 and len(kept) == 2
    assert f"skipped corrupt image {broken}" in caplog.text
