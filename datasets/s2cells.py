"""S2 cells for whole coordinate arrays, and PlaNet's adaptive partition of the sphere into classes.

Leaf cell ids are computed with numpy, step for step as the S2 reference (and ``s2sphere``) computes
``CellId.from_lat_lng(LatLng.from_degrees(lat, lon))``: point on the unit sphere, cube face, quadratic
(u, v) → (s, t) transform, integer (i, j) and the Hilbert-curve position through the same 4-bit lookup
table. The ids are bit-identical to s2sphere's (tested), about two orders of magnitude faster.

The partition follows Weyand et al. 2016 (PlaNet): start from the cells at ``min_level``, split every
cell holding more than ``max_photos`` photos into its four children, and discard cells left with fewer
than ``min_photos``. Each kept cell is a class; its location is the mean of its photos on the sphere.
``s2sphere`` is used only for cell geometry (polygon vertices for the GeoJSON).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import write_text_atomic

MAX_LEVEL = 30
POS_BITS = 2 * MAX_LEVEL + 1
NUM_FACES = 6
LOOKUP_BITS = 4
SWAP_MASK = 0x01
INVERT_MASK = 0x02
#: PlaNet's thresholds (Weyand et al. 2016): split above 10,000 photos, drop below 50 → 26,263 cells.
PLANET_MAX_PHOTOS = 10_000
PLANET_MIN_PHOTOS = 50
PARTITION_COLUMNS = ("class", "token", "level", "photos", "lat", "lon")
_CHUNK = 1 << 20
_U64 = np.uint64


class PartitionError(MobilenetsError, ValueError):
    """A partition file or partition request that is not valid; the message names the file and row."""


def _build_lookup_tables() -> tuple[np.ndarray, np.ndarray]:
    """S2's tables between (4 bits of i, 4 bits of j, orientation) and (8 bits of Hilbert position,
    orientation), both ways."""
    pos_to_ij = ((0, 1, 3, 2), (0, 2, 3, 1), (3, 2, 0, 1), (3, 1, 0, 2))
    pos_to_orientation = (SWAP_MASK, 0, 0, INVERT_MASK | SWAP_MASK)
    table = np.zeros(1 << (2 * LOOKUP_BITS + 2), dtype=np.int64)
    inverse = np.zeros_like(table)
    for orig in (0, SWAP_MASK, INVERT_MASK, SWAP_MASK | INVERT_MASK):
        stack = [(0, 0, 0, 0, orig)]  # level, i, j, pos, orientation
        while stack:
            level, i, j, pos, orientation = stack.pop()
            if level == LOOKUP_BITS:
                ij = (i << LOOKUP_BITS) + j
                table[(ij << 2) + orig] = (pos << 2) + orientation
                inverse[(pos << 2) + orig] = (ij << 2) + orientation
                continue
            order = pos_to_ij[orientation]
            for index in range(4):
                stack.append(
                    (
                        level + 1,
                        (i << 1) + (order[index] >> 1),
                        (j << 1) + (order[index] & 1),
                        (pos << 2) + index,
                        orientation ^ pos_to_orientation[index],
                    )
                )
    return table, inverse


LOOKUP_POS, LOOKUP_IJ = _build_lookup_tables()


def lat_lon_to_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors (N, 3) of latitudes/longitudes in degrees (as S2's ``LatLng.to_point``)."""
    # math.radians multiplies by pi/180 in this order; the same rounding keeps ids bit-identical
    phi = np.asarray(lat, dtype=np.float64) * (math.pi / 180.0)
    theta = np.asarray(lon, dtype=np.float64) * (math.pi / 180.0)
    cos_phi = np.cos(phi)
    return np.stack([np.cos(theta) * cos_phi, np.sin(theta) * cos_phi, np.sin(phi)], axis=-1)


def xyz_to_lat_lon(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude in degrees of (not necessarily unit) vectors (N, 3)."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))


def _uv_to_st(u: np.ndarray) -> np.ndarray:
    return np.where(u >= 0, 0.5 * np.sqrt(1 + 3 * np.abs(u)), 1 - 0.5 * np.sqrt(1 + 3 * np.abs(u)))


def _st_to_ij(s: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((1 << MAX_LEVEL) * s), 0, (1 << MAX_LEVEL) - 1).astype(np.int64)


def _xyz_to_face_uv(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    ax, ay, az = np.abs(x), np.abs(y), np.abs(z)
    # S2's largest_abs_component, ties included: x only when strictly largest, y over z only if strictly
    axis = np.where((ax > ay) & (ax > az), 0, np.where((ax <= ay) & (ay > az), 1, 2))
    coord = np.choose(axis, (x, y, z))
    face = axis + 3 * (coord < 0)
    # S2's ValidFaceXYZtoUV divides by the face's axis coordinate; "-x / y" there equals (-x) / y exactly
    u = np.choose(face, (y, -x, -x, z, z, -y)) / coord
    v = np.choose(face, (z, z, -y, y, -x, -x)) / coord
    return face, u, v


def _face_ij_to_id(face: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    n = face.astype(_U64) << _U64(POS_BITS - 1)
    bits = face & SWAP_MASK
    mask = (1 << LOOKUP_BITS) - 1
    for k in range(7, -1, -1):
        bits = bits + (((i >> (k * LOOKUP_BITS)) & mask) << (LOOKUP_BITS + 2))
        bits = bits + (((j >> (k * LOOKUP_BITS)) & mask) << 2)
        bits = LOOKUP_POS[bits]
        n |= (bits >> 2).astype(_U64) << _U64(k * 2 * LOOKUP_BITS)
        bits = bits & (SWAP_MASK | INVERT_MASK)
    return (n << _U64(1)) | _U64(1)


def _id_to_face_ij(cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(cell_ids, dtype=_U64)
    face = (ids >> _U64(POS_BITS)).astype(np.int64)
    bits = face & SWAP_MASK
    i = np.zeros(ids.size, dtype=np.int64)
    j = np.zeros(ids.size, dtype=np.int64)
    for k in range(7, -1, -1):
        nbits = MAX_LEVEL - 7 * LOOKUP_BITS if k == 7 else LOOKUP_BITS
        chunk = ((ids >> _U64(k * 2 * LOOKUP_BITS + 1)) & _U64((1 << (2 * nbits)) - 1)).astype(np.int64)
        bits = LOOKUP_IJ[bits + (chunk << 2)]
        i += (bits >> (LOOKUP_BITS + 2)) << (k * LOOKUP_BITS)
        j += ((bits >> 2) & ((1 << LOOKUP_BITS) - 1)) << (k * LOOKUP_BITS)
        bits = bits & (SWAP_MASK | INVERT_MASK)
    return face, i, j


def _st_to_uv(s: np.ndarray) -> np.ndarray:
    return np.where(s >= 0.5, (1.0 / 3.0) * (4 * s * s - 1), (1.0 / 3.0) * (1 - 4 * (1 - s) * (1 - s)))


def leaf_centers_xyz(leaf_ids: np.ndarray) -> np.ndarray:
    """Unit vectors (N, 3) of the centres of leaf cells (about 1 cm across): S2's ``to_point``."""
    face, i, j = _id_to_face_ij(leaf_ids)
    u = _st_to_uv((2 * i + 1) / float(1 << (MAX_LEVEL + 1)))
    v = _st_to_uv((2 * j + 1) / float(1 << (MAX_LEVEL + 1)))
    one = np.ones_like(u)
    x = np.choose(face, (one, -u, -u, -one, v, v))
    y = np.choose(face, (u, one, -v, -v, -one, u))
    z = np.choose(face, (v, v, one, -u, -u, -one))
    xyz = np.stack([x, y, z], axis=1)
    return xyz / np.linalg.norm(xyz, axis=1, keepdims=True)


def xyz_to_leaf_ids(xyz: np.ndarray) -> np.ndarray:
    """Leaf (level-30) S2 cell ids, ``uint64``, of points (N, 3) on the sphere."""
    face, u, v = _xyz_to_face_uv(np.asarray(xyz, dtype=np.float64).reshape(-1, 3))
    return _face_ij_to_id(face, _st_to_ij(_uv_to_st(u)), _st_to_ij(_uv_to_st(v)))


def leaf_cell_ids(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Leaf S2 cell ids (``uint64``) of latitude/longitude arrays in degrees, computed in chunks.

    Equal to ``s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)).id()``.
    """
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    if lat.shape != lon.shape:
        raise ValueError(f"lat and lon differ in length: {lat.size} vs {lon.size}")
    out = np.empty(lat.size, dtype=_U64)
    for start in range(0, lat.size, _CHUNK):
        stop = start + _CHUNK
        out[start:stop] = xyz_to_leaf_ids(lat_lon_to_xyz(lat[start:stop], lon[start:stop]))
    return out


def lsb_for_level(level: int | np.ndarray) -> np.ndarray:
    """The lowest set bit of a cell id at ``level``: ``1 << 2 * (30 - level)`` (``uint64``)."""
    return _U64(1) << (_U64(2) * (_U64(MAX_LEVEL) - np.asarray(level, dtype=_U64)))


def parent_ids(cell_ids: np.ndarray, level: int | np.ndarray) -> np.ndarray:
    """Ancestors at ``level`` of cell ids (at that level or finer): ``(id & -lsb) | lsb`` in bits."""
    lsb = lsb_for_level(level)
    return (np.asarray(cell_ids, dtype=_U64) & ~(lsb - _U64(1))) | lsb


def cell_levels(cell_ids: np.ndarray) -> np.ndarray:
    """Level (0-30) of each cell id, from the position of its lowest set bit."""
    ids = np.asarray(cell_ids, dtype=_U64)
    lowest = ids & (~ids + _U64(1))  # two's complement: isolates the lowest set bit
    return (MAX_LEVEL - np.log2(lowest.astype(np.float64)).astype(np.int64) // 2).astype(np.int64)


def cell_ranges(cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(range_min, range_max): the first and last leaf id inside each cell."""
    ids = np.asarray(cell_ids, dtype=_U64)
    lowest = ids & (~ids + _U64(1))
    return ids - (lowest - _U64(1)), ids + (lowest - _U64(1))


def is_valid_cell_id(cell_id: int) -> bool:
    """A face below 6 and the lowest set bit at an even position (S2's ``CellId.is_valid``)."""
    return (
        0 < cell_id < (1 << 64)
        and (cell_id >> POS_BITS) < NUM_FACES
        and bool((cell_id & -cell_id) & 0x1555555555555555)
    )


def cell_token(cell_id: int) -> str:
    """S2's token: the id in hex without trailing zeros ("X" for the invalid id 0)."""
    return format(int(cell_id), "016x").rstrip("0") or "X"


def token_to_cell_id(token: str) -> int:
    """Inverse of ``cell_token``; raises ``ValueError`` for text that is not a valid cell's token."""
    text = token.strip().lower()
    if not text or len(text) > 16 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{token!r} is not an S2 cell token (1-16 hex digits)")
    cell_id = int(text.ljust(16, "0"), 16)
    if not is_valid_cell_id(cell_id):
        raise ValueError(f"{token!r} is not the token of a valid S2 cell")
    return cell_id


def assign_to_cells(leaf_ids: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Index into ``cell_ids`` (disjoint cells sorted by id) of the cell holding each leaf, or -1."""
    range_min, range_max = cell_ranges(cell_ids)
    leaf_ids = np.asarray(leaf_ids, dtype=_U64)
    index = np.searchsorted(range_min, leaf_ids, side="right").astype(np.int64) - 1
    inside = index >= 0
    inside[inside] = leaf_ids[inside] <= range_max[index[inside]]
    return np.where(inside, index, -1)


# ---------------------------------------------------------------------------------------------- partition
@dataclass(frozen=True)
class PartitionSettings:
    """PlaNet's thresholds and the levels the adaptive split runs between."""

    max_photos: int = PLANET_MAX_PHOTOS
    min_photos: int = PLANET_MIN_PHOTOS
    min_level: int = 0
    max_level: int = MAX_LEVEL

    def check(self) -> None:
        if self.max_photos < 1:
            raise PartitionError(f"max_photos must be >= 1, got {self.max_photos}")
        if self.min_photos < 0:
            raise PartitionError(f"min_photos must be >= 0, got {self.min_photos}")
        if self.min_photos > self.max_photos:
            raise PartitionError(
                f"min_photos ({self.min_photos}) above max_photos ({self.max_photos}) would drop every cell"
            )
        if not 0 <= self.min_level <= self.max_level <= MAX_LEVEL:
            raise PartitionError(
                f"need 0 <= min_level <= max_level <= {MAX_LEVEL}, got {self.min_level} and {self.max_level}"
            )


@dataclass
class Partition:
    """Kept cells sorted by id; row ``k`` is class ``k``.

    ``lat``/``lon`` are the mean location of each cell's photos (the location a prediction of that class
    stands for); ``photos`` their count. The ``discarded_*`` fields describe what the build dropped.
    """

    cell_ids: np.ndarray
    levels: np.ndarray
    photos: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    settings: PartitionSettings | None = None
    discarded_cells: int = 0
    discarded_photos: int = 0
    source: str = ""
    _tokens: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.cell_ids.size)

    @property
    def tokens(self) -> list[str]:
        if self._tokens is None:
            self._tokens = [cell_token(c) for c in self.cell_ids.tolist()]
        return self._tokens

    @property
    def centers(self) -> np.ndarray:
        """(num_cells, 2) mean latitude/longitude of each class, degrees."""
        return np.stack([self.lat, self.lon], axis=1)

    def assign(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Class index of each coordinate, -1 where it falls in no kept cell."""
        return assign_to_cells(leaf_cell_ids(lat, lon), self.cell_ids)

    def summary(self) -> str:
        kept = int(self.photos.sum())
        total = kept + self.discarded_photos
        levels = f"levels {self.levels.min()}-{self.levels.max()}" if len(self) else "no cells"
        text = f"{len(self)} cells ({levels}) holding {kept:,} of {total:,} photos"
        if self.discarded_cells:
            text += f"; {self.discarded_cells} cells with {self.discarded_photos:,} photos discarded"
        if self.settings:
            s = self.settings
            text += (
                f" [max_photos={s.max_photos}, min_photos={s.min_photos}, "
                f"min_level={s.min_level}, max_level={s.max_level}]"
            )
        return text

    # ------------------------------------------------------------------ files
    def write_csv(self, path: str | Path) -> None:
        """``class,token,level,photos,lat,lon`` rows in class order, written atomically."""
        rows = [",".join(PARTITION_COLUMNS)]
        for k, (token, level, count, lat, lon) in enumerate(
            zip(self.tokens, self.levels.tolist(), self.photos.tolist(), self.lat.tolist(), self.lon.tolist())
        ):
            rows.append(f"{k},{token},{level},{count},{lat:.6f},{lon:.6f}")
        write_text_atomic(path, "\n".join(rows) + "\n")

    @classmethod
    def read_csv(cls, path: str | Path) -> Partition:
        """Read a file written by ``write_csv``; every problem names the file and line."""
        path = Path(path)
        if not path.is_file():
            raise PartitionError(
                f"{path}: partition file not found (build one with 'mobilenets geo partition')"
            )
        with path.open(newline="", encoding="utf-8-sig") as handle:  # a BOM is not part of the header
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise PartitionError(f"{path}: empty partition file")
            header = [h.strip() for h in header]
            missing = [c for c in PARTITION_COLUMNS if c not in header]
            if missing:
                raise PartitionError(
                    f"{path}: line 1: missing columns {missing}; expected {PARTITION_COLUMNS}"
                )
            col = {c: header.index(c) for c in PARTITION_COLUMNS}
            ids: list[int] = []
            levels: list[int] = []
            photos: list[int] = []
            lats: list[float] = []
            lons: list[float] = []
            for row in reader:
                line = reader.line_num
                if not row or all(not v.strip() for v in row):
                    continue
                if len(row) < len(header):
                    raise PartitionError(
                        f"{path}: line {line}: expected {len(header)} fields, got {len(row)}"
                    )
                try:
                    cell_id = token_to_cell_id(row[col["token"]])
                    index, level, count = (int(row[col[c]]) for c in ("class", "level", "photos"))
                    lat, lon = float(row[col["lat"]]), float(row[col["lon"]])
                except ValueError as error:
                    raise PartitionError(f"{path}: line {line}: {error}") from error
                if index != len(ids):
                    raise PartitionError(
                        f"{path}: line {line}: class {index}, expected {len(ids)} (rows in order)"
                    )
                true_level = int(cell_levels(np.array([cell_id], dtype=_U64))[0])
                if level != true_level:
                    raise PartitionError(
                        f"{path}: line {line}: level {level} but token {row[col['token']]} is a level-"
                        f"{true_level} cell"
                    )
                if not (
                    math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180
                ):
                    raise PartitionError(
                        f"{path}: line {line}: cell location ({lat}, {lon}) is not a coordinate"
                    )
                ids.append(cell_id)
                levels.append(level)
                photos.append(count)
                lats.append(lat)
                lons.append(lon)
        if not ids:
            raise PartitionError(f"{path}: partition file has no cells")
        cell_ids = np.array(ids, dtype=_U64)
        if np.any(cell_ids[1:] <= cell_ids[:-1]):
            raise PartitionError(f"{path}: cells must be sorted by id without duplicates")
        range_min, range_max = cell_ranges(cell_ids)
        overlap = np.flatnonzero(range_max[:-1] >= range_min[1:])
        if overlap.size:
            k = int(overlap[0])
            raise PartitionError(
                f"{path}: line {k + 3}: cell {cell_token(ids[k + 1])} overlaps cell {cell_token(ids[k])}"
            )
        return cls(
            cell_ids,
            np.array(levels, dtype=np.int64),
            np.array(photos, dtype=np.int64),
            np.array(lats),
            np.array(lons),
            source=str(path),
        )

    def geojson(self, edge_points: int = 0) -> dict:
        """A GeoJSON FeatureCollection of the cells' polygons (vertices from s2sphere).

        Cell edges are geodesics; coarse cells get extra points along each edge (``edge_points``, by
        default more for coarser levels) so that a flat map draws them bent as they are. Longitudes of a
        polygon are unwrapped to be continuous, so a cell across the antimeridian has some beyond ±180.
        """
        import s2sphere

        features = []
        for k, (cell_id, token) in enumerate(zip(self.cell_ids.tolist(), self.tokens)):
            cell = s2sphere.Cell(s2sphere.CellId(cell_id))
            corners = [cell.get_vertex(v) for v in range(4)]
            corners = [np.array([p[0], p[1], p[2]]) for p in corners]
            steps = edge_points or max(1, 16 >> int(self.levels[k]))
            ring = []
            for v in range(4):
                a, b = corners[v], corners[(v + 1) % 4]
                for t in np.arange(steps) / steps:
                    ring.append((1 - t) * a + t * b)  # normalised below: points on the great circle
            lat, lon = xyz_to_lat_lon(np.array(ring))
            lon = np.degrees(np.unwrap(np.radians(lon)))
            coordinates = [[round(float(x), 6), round(float(y), 6)] for x, y in zip(lon, lat)]
            coordinates.append(coordinates[0])
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [coordinates]},
                    "properties": {
                        "class": k,
                        "token": token,
                        "level": int(self.levels[k]),
                        "photos": int(self.photos[k]),
                        "lat": float(self.lat[k]),
                        "lon": float(self.lon[k]),
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}

    def write_geojson(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.geojson()))


def _mean_locations(xyz_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean direction of summed unit vectors (handles the antimeridian, unlike averaging longitudes)."""
    return xyz_to_lat_lon(xyz_sums)


def build_partition(
    lat: np.ndarray,
    lon: np.ndarray,
    max_photos: int = PLANET_MAX_PHOTOS,
    min_photos: int = PLANET_MIN_PHOTOS,
    min_level: int = 0,
    max_level: int = MAX_LEVEL,
) -> Partition:
    """PlaNet's adaptive partition of photo coordinates (degrees) into S2 cells.

    Starting from the cells at ``min_level``, a cell with more than ``max_photos`` photos is split into
    its four children (never beyond ``max_level``); a cell that is not split is kept if it holds at
    least ``min_photos`` photos and discarded otherwise. Vectorised: one sort of the leaf ids, then per
    level one pass over the photos still in cells that were split.
    """
    settings = PartitionSettings(max_photos, min_photos, min_level, max_level)
    settings.check()
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    sorted_leaves = np.sort(leaf_cell_ids(lat, lon))
    if sorted_leaves.size:
        starts = np.concatenate([[0], np.flatnonzero(sorted_leaves[1:] != sorted_leaves[:-1]) + 1])
    else:
        starts = np.zeros(0, dtype=np.int64)
    unique = sorted_leaves[starts]
    counts = np.diff(np.append(starts, sorted_leaves.size)).astype(np.int64)

    kept_ids: list[np.ndarray] = []
    kept_levels: list[np.ndarray] = []
    discarded_cells = 0
    active = np.arange(unique.size)
    for level in range(min_level, max_level + 1):
        if active.size == 0:
            break
        parents = parent_ids(unique[active], level)
        run_starts = np.concatenate([[0], np.flatnonzero(parents[1:] != parents[:-1]) + 1])
        cell_counts = np.add.reduceat(counts[active], run_starts)
        cells = parents[run_starts]
        split = cell_counts > max_photos if level < max_level else np.zeros(cells.size, dtype=bool)
        keep = ~split & (cell_counts >= min_photos)
        discarded_cells += int(np.count_nonzero(~split & ~keep))
        kept_ids.append(cells[keep])
        kept_levels.append(np.full(int(keep.sum()), level, dtype=np.int64))
        run_lengths = np.diff(np.append(run_starts, active.size))
        active = active[np.repeat(split, run_lengths)]

    cell_ids = np.concatenate(kept_ids) if kept_ids else np.zeros(0, dtype=_U64)
    levels = np.concatenate(kept_levels) if kept_levels else np.zeros(0, dtype=np.int64)
    cell_order = np.argsort(cell_ids)
    cell_ids, levels = cell_ids[cell_order], levels[cell_order]
    # Kept cells are disjoint leaf ranges, i.e. contiguous runs of the sorted distinct leaves. A photo's
    # position is taken as its leaf cell's centre (< 1 cm off), which avoids a permutation of all photos.
    range_min, range_max = cell_ranges(cell_ids)
    first = np.searchsorted(unique, range_min, side="left")
    stop = np.searchsorted(unique, range_max, side="right")
    cumulative_counts = np.concatenate([[0], np.cumsum(counts)])
    photos = cumulative_counts[stop] - cumulative_counts[first]
    cumulative = np.zeros((unique.size + 1, 3))
    for start in range(0, unique.size, _CHUNK):
        end = min(start + _CHUNK, unique.size)
        cumulative[start + 1 : end + 1] = (
            np.cumsum(leaf_centers_xyz(unique[start:end]) * counts[start:end, None], axis=0)
            + cumulative[start]
        )
    sums = cumulative[stop] - cumulative[first]
    mean_lat, mean_lon = _mean_locations(sums)
    return Partition(
        cell_ids=cell_ids,
        levels=levels,
        photos=photos,
        lat=mean_lat,
        lon=mean_lon,
        settings=settings,
        discarded_cells=discarded_cells,
        discarded_photos=int(lat.size - photos.sum()),
    )


def cells_at_level(lat: Iterable[float], lon: Iterable[float], level: int) -> np.ndarray:
    """Ids of the cells at ``level`` containing each coordinate (a fixed-level grid, for baselines)."""
    return parent_ids(leaf_cell_ids(np.asarray(lat), np.asarray(lon)), level)
