import json

import numpy as np
import pytest
import s2sphere

from mobilenets.datasets.s2cells import (
    MAX_LEVEL,
    Partition,
    PartitionError,
    build_partition,
    cell_levels,
    cell_token,
    lat_lon_to_xyz,
    leaf_cell_ids,
    leaf_centers_xyz,
    parent_ids,
    token_to_cell_id,
    xyz_to_lat_lon,
)


def s2_leaf(lat: float, lon: float) -> int:
    return s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)).id()


def awkward_points(rng: np.random.Generator, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points plus poles, the antimeridian, cube-face edges and corners."""
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    special = [
        (90, 0), (-90, 0), (90, 180), (-90, -37), (0, 180), (0, -180), (12.5, 180), (-40, -180),
        (0, 45), (0, -45), (0, 135), (0, -135), (0, 0), (0, 90), (0, -90),
        (35.264389682754654, 45), (-35.264389682754654, -135), (35.264389682754654, -135),
        (45, 0), (-45, 90), (45, 180), (89.999999999, 179.99999999), (-89.99999, -179.9999999),
    ]  # fmt: skip
    # points on the face edges |x| = |z|, |y| = |z| and |x| = |y| (ties decide the face)
    t = rng.uniform(-45, 45, 300)
    edge_lat = np.degrees(np.arctan(np.cos(np.radians(t)))) * rng.choice([-1, 1], t.size)
    edge_lon = t + rng.choice([0, 90, 180, -90], t.size)
    edge_lon = (edge_lon + 180) % 360 - 180
    lat = np.concatenate([lat, [p[0] for p in special], edge_lat, np.zeros(50)])
    lon = np.concatenate(
        [lon, [p[1] for p in special], edge_lon, rng.choice([45.0, -45.0, 135.0, -135.0], 50)]
    )
    return lat, lon


def test_leaf_ids_equal_s2sphere_including_poles_antimeridian_and_face_edges() -> None:
    lat, lon = awkward_points(np.random.default_rng(1))
    ours = leaf_cell_ids(lat, lon)
    theirs = np.array([s2_leaf(a, b) for a, b in zip(lat.tolist(), lon.tolist())], dtype=np.uint64)
    mismatches = np.flatnonzero(ours != theirs)
    assert mismatches.size == 0, [(lat[k], lon[k]) for k in mismatches[:5]]
    assert ours.dtype == np.uint64
    assert (cell_levels(ours) == MAX_LEVEL).all()
    # face 5 ids exceed 2**63: they must survive as unsigned
    assert ours.max() > np.uint64(1 << 63)


def test_parents_levels_and_tokens_equal_s2sphere() -> None:
    lat, lon = awkward_points(np.random.default_rng(2), 200)
    leaves = leaf_cell_ids(lat, lon)
    for level in (0, 1, 5, 13, 29):
        ours = parent_ids(leaves, level)
        theirs = [s2sphere.CellId(int(c)).parent(level) for c in leaves]
        assert ours.tolist() == [c.id() for c in theirs]
        assert (cell_levels(ours) == level).all()
        assert [cell_token(c) for c in ours.tolist()] == [c.to_token() for c in theirs]
        assert all(token_to_cell_id(c.to_token()) == c.id() for c in theirs)
        # the parent contains the leaf (s2sphere's own test of containment)
        assert all(p.contains(s2sphere.CellId(int(c))) for p, c in zip(theirs, leaves))
    with pytest.raises(ValueError, match="not an S2 cell token"):
        token_to_cell_id("zz")
    with pytest.raises(ValueError, match="valid S2 cell"):
        token_to_cell_id("f")  # face 7


def test_leaf_centres_match_s2sphere_and_round_trip() -> None:
    lat, lon = awkward_points(np.random.default_rng(3), 300)
    leaves = leaf_cell_ids(lat, lon)
    centres = leaf_centers_xyz(leaves)
    theirs = np.array(
        [[p[0], p[1], p[2]] for p in (s2sphere.CellId(int(c)).to_point() for c in leaves.tolist())]
    )
    np.testing.assert_allclose(centres, theirs, atol=1e-15)
    back_lat, _ = xyz_to_lat_lon(lat_lon_to_xyz(lat, lon))
    np.testing.assert_allclose(back_lat, lat, atol=1e-9)


def clustered_points(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cities of different sizes, scattered strays, and 120 photos at one spot (cannot be split)."""
    centres = [
        (48.85, 2.35, 900),
        (40.7, -74.0, 500),
        (-33.9, 151.2, 200),
        (-17.7, 179.95, 150),
        (64.1, -21.9, 40),
    ]
    lats, lons = [], []
    for lat, lon, n in centres:
        lats.append(lat + rng.normal(0, 0.3, n))
        lons.append(lon + rng.normal(0, 0.3, n))
    lats.append(np.degrees(np.arcsin(rng.uniform(-1, 1, 60))))
    lons.append(rng.uniform(-180, 180, 60))
    lats.append(np.full(120, 35.6812))
    lons.append(np.full(120, 139.7671))
    lat = np.clip(np.concatenate(lats), -90, 90)
    lon = (np.concatenate(lons) + 180) % 360 - 180
    return lat, lon


def test_partition_invariants() -> None:
    lat, lon = clustered_points(np.random.default_rng(4))
    max_photos, min_photos, max_level = 60, 8, 14
    partition = build_partition(lat, lon, max_photos, min_photos, min_level=1, max_level=max_level)
    leaves = leaf_cell_ids(lat, lon)
    cells = partition.cell_ids

    # every photo lies in at most one kept cell (brute force over all cells), and exactly where assign says
    inside = np.stack(
        [parent_ids(leaves, int(level)) == cell for cell, level in zip(cells, partition.levels)]
    )
    assert inside.sum(axis=0).max() == 1
    assignment = partition.assign(lat, lon)
    np.testing.assert_array_equal(np.where(inside.any(axis=0), inside.argmax(axis=0), -1), assignment)
    # counts sum: kept + discarded = all photos, each cell's count = photos assigned to it
    np.testing.assert_array_equal(
        partition.photos, np.bincount(assignment[assignment >= 0], minlength=len(cells))
    )
    assert partition.photos.sum() + partition.discarded_photos == lat.size
    assert partition.discarded_photos == int((assignment < 0).sum()) > 0
    # no kept cell above max_photos unless at the finest level; none below min_photos
    over = partition.photos > max_photos
    assert over.any() and (partition.levels[over] == max_level).all()  # the 120 photos at one spot
    assert (partition.photos >= min_photos).all()

    def photos_in(cell_id: int, level: int) -> int:
        return int((parent_ids(leaves, level) == np.uint64(cell_id)).sum())

    for cell, level in zip(cells.tolist(), partition.levels.tolist()):
        s2cell = s2sphere.CellId(cell)
        assert s2cell.level() == level
        # every ancestor down to min_level was split because it held more than max_photos
        for coarser in range(1, level):
            ancestor = s2cell.parent(coarser)
            assert ancestor.contains(s2cell)
            assert photos_in(ancestor.id(), coarser) > max_photos
    # a discarded photo's cell stopped splitting with fewer than min_photos
    for k in np.flatnonzero(assignment < 0)[:20]:
        level = 1
        while photos_in(int(parent_ids(leaves[k : k + 1], level)[0]), level) > max_photos:
            level += 1
        assert photos_in(int(parent_ids(leaves[k : k + 1], level)[0]), level) < min_photos

    # cell locations: mean of the photos' unit vectors
    xyz = lat_lon_to_xyz(lat, lon)
    for k in range(len(cells)):
        mean_lat, mean_lon = xyz_to_lat_lon(xyz[assignment == k].sum(axis=0)[None])
        assert abs(mean_lat[0] - partition.lat[k]) < 1e-6
        assert abs((mean_lon[0] - partition.lon[k] + 180) % 360 - 180) < 1e-6


def test_mean_location_across_the_antimeridian() -> None:
    rng = np.random.default_rng(5)
    lon = np.concatenate([rng.uniform(179.5, 180, 50), rng.uniform(-180, -179.5, 50)])
    lat = rng.uniform(-1, 1, 100)
    partition = build_partition(lat, lon, max_photos=1000, min_photos=1)
    assert len(partition) == 1 and partition.levels[0] == 0
    assert abs(partition.lon[0]) > 179.0  # averaging longitudes would give about 0
    assert abs(partition.lat[0]) < 0.5


def test_partition_settings_are_checked() -> None:
    with pytest.raises(PartitionError, match="min_photos"):
        build_partition(np.zeros(3), np.zeros(3), max_photos=10, min_photos=20)
    with pytest.raises(PartitionError, match="min_level"):
        build_partition(np.zeros(3), np.zeros(3), min_level=5, max_level=4)


def test_partition_csv_and_geojson(tmp_path) -> None:
    lat, lon = clustered_points(np.random.default_rng(6))
    partition = build_partition(lat, lon, 100, 10)
    path = tmp_path / "cells.csv"
    partition.write_csv(path)
    again = Partition.read_csv(path)
    np.testing.assert_array_equal(again.cell_ids, partition.cell_ids)
    np.testing.assert_array_equal(again.photos, partition.photos)
    np.testing.assert_allclose(again.lat, partition.lat, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file

    geojson = partition.geojson()
    assert len(geojson["features"]) == len(partition)
    feature = geojson["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    vertex = s2sphere.LatLng.from_point(
        s2sphere.Cell(s2sphere.CellId(int(partition.cell_ids[0]))).get_vertex(0)
    )
    assert ring[0][1] == pytest.approx(vertex.lat().degrees, abs=1e-5)
    assert (ring[0][0] - vertex.lng().degrees) % 360 == pytest.approx(0, abs=1e-5)
    assert feature["properties"]["token"] == partition.tokens[0]
    partition.write_geojson(tmp_path / "cells.geojson")
    assert json.loads((tmp_path / "cells.geojson").read_text())["type"] == "FeatureCollection"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1,zz,3,10,1.0,2.0", "line 3: 'zz' is not an S2 cell token"),
        ("1,{token},5,10,1.0,2.0", "line 3: level 5 but token"),
        ("1,{token},{level},10,95.0,2.0", "line 3: cell location"),
        ("7,{token},{level},10,1.0,2.0", "line 3: class 7, expected 1"),
    ],
)
def test_malformed_partition_rows_name_file_and_line(tmp_path, line: str, message: str) -> None:
    first = s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(10, 10)).parent(3)
    second = s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(-40, 100)).parent(4)
    path = tmp_path / "bad.csv"
    text = "class,token,level,photos,lat,lon\n" + f"0,{first.to_token()},3,10,10.0,10.0\n"
    path.write_text(text + line.format(token=second.to_token(), level=4) + "\n")
    with pytest.raises(PartitionError, match=message) as error:
        Partition.read_csv(path)
    assert str(path) in str(error.value)


def test_overlapping_partition_cells_are_rejected(tmp_path) -> None:
    parent = s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(10, 10)).parent(3)
    child = parent.child_begin()
    path = tmp_path / "overlap.csv"
    path.write_text(
        "class,token,level,photos,lat,lon\n"
        f"0,{child.to_token()},4,10,10.0,10.0\n1,{parent.to_token()},3,10,10.0,10.0\n"
    )
    with pytest.raises(PartitionError, match="overlap|sorted"):
        Partition.read_csv(path)
    with pytest.raises(PartitionError, match="not found"):
        Partition.read_csv(tmp_path / "missing.csv")
