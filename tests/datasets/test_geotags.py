import numpy as np
import pytest
import torch

from mobilenets.datasets.geotags import GeotagDataModule, GeotagError, read_geotags, resolve_image_paths
from mobilenets.datasets.s2cells import build_partition
from mobilenets.datasets.synthetic.geotags import make_geotags


def test_reads_mp16_style_csv_and_tsv_with_custom_columns(tmp_path) -> None:
    csv_path = tmp_path / "mp16.csv"
    csv_path.write_text("IMG_ID,AUTHOR,LAT,LON\na/b/1.jpg,x,48.85,2.35\na/b/2.jpg,y,-33.9,151.2\n\n")
    table = read_geotags(csv_path)
    assert table.images == ["a/b/1.jpg", "a/b/2.jpg"]
    np.testing.assert_allclose(table.lat, [48.85, -33.9])
    np.testing.assert_array_equal(table.lines, [2, 3])

    tsv_path = tmp_path / "yfcc.tsv"
    tsv_path.write_text("photo\tlatitude\tlongitude\n1.jpg\t10.5\t-180\n2.jpg\t-90\t180\n")
    table = read_geotags(tsv_path, image_column="photo", lat_column="latitude", lon_column="longitude")
    np.testing.assert_allclose(table.lon, [-180, 180])
    coordinates_only = read_geotags(
        tsv_path, image_column=None, lat_column="latitude", lon_column="longitude"
    )
    assert len(coordinates_only) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("c.jpg,91.0,0.0", "line 3: latitude 91.0 outside"),
        ("c.jpg,10.0,-180.5", "line 3: longitude -180.5 outside"),
        ("c.jpg,nan,0.0", "line 3: coordinates .* not finite"),
        ("c.jpg,abc,0.0", "line 3: latitude/longitude 'abc'"),
        ("c.jpg,1.0", "line 3: expected at least 3 fields"),
        (",1.0,2.0", "line 3: empty IMG_ID"),
    ],
)
def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path, row: str, message: str) -> None:
    path = tmp_path / "tags.csv"
    path.write_text(f"IMG_ID,LAT,LON\na.jpg,1.0,2.0\n{row}\nb.jpg,3.0,4.0\n")
    with pytest.raises(GeotagError, match=message) as error:
        read_geotags(path)
    assert str(path) in str(error.value)
    table = read_geotags(path, skip_invalid_rows=True)
    assert table.images == ["a.jpg", "b.jpg"]
    assert table.skipped_rows == 1


def test_missing_columns_and_files(tmp_path) -> None:
    path = tmp_path / "tags.csv"
    path.write_text("id,lat,lng\na.jpg,1,2\n")
    with pytest.raises(GeotagError, match=r"line 1: missing column\(s\) \['IMG_ID', 'LAT', 'LON'\]"):
        read_geotags(path)
    with pytest.raises(GeotagError, match="not found"):
        read_geotags(tmp_path / "nope.csv")


def test_missing_image_files_raise_or_are_skipped(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    path = tmp_path / "tags.csv"
    path.write_text("IMG_ID,LAT,LON\nimg/a.jpg,1,2\nimg/missing.jpg,3,4\n")
    table = read_geotags(path)
    with pytest.raises(GeotagError, match=r"line 3: image file .*missing.jpg not found"):
        resolve_image_paths(table, None)
    kept, paths = resolve_image_paths(table, None, skip_missing_images=True)
    assert kept.skipped_missing == 1 and paths == [tmp_path / "img" / "a.jpg"]
    np.testing.assert_array_equal(kept.lines, [2])


def test_datamodule_labels_photos_with_the_partition(tmp_path) -> None:
    data = make_geotags(
        tmp_path, num_regions=3, train_per_region=10, val_per_region=2, test_per_region=2, image_size=32
    )
    train = read_geotags(data.train_csv)
    # a stray training photo far from every region lands in a discarded cell
    with data.train_csv.open("a") as handle:
        handle.write(f"{train.images[0]},-60.0,-100.0\n")
    partition = build_partition(train.lat, train.lon, max_photos=6, min_photos=2)
    partition_path = tmp_path / "partition.csv"
    partition.write_csv(partition_path)
    module = GeotagDataModule(
        partition=str(partition_path),
        train_csv=str(data.train_csv),
        val_csv=str(data.val_csv),
        test_csv=str(data.test_csv),
        image_root=str(data.image_root),
        input_size=32,
        batch_size=4,
    )
    module.setup("fit")
    train_set = module.datasets["train"]
    expected = partition.assign(train.lat, train.lon)
    assert len(train_set) == int((expected >= 0).sum())  # the stray and discarded photos are dropped
    np.testing.assert_array_equal(train_set.labels, expected[expected >= 0])
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["latlon"].dtype == torch.float64
    assert (batch["label"] >= 0).all() and (batch["label"] < len(partition)).all()
    module.setup("test")
    test_set = module.datasets["test"]
    assert len(test_set) == 6  # test photos outside the partition stay, with label -1
