"""Geotagged photos from CSV/TSV metadata (MP-16 / YFCC100M style ``IMG_ID,LAT,LON``; Im2GPS test lists in
the same form), labelled with the cells of an S2 partition, as a LightningDataModule."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.base import BaseDataModule, SampleKey
from mobilenets.datasets.images import check_images, images_in_folder, load_rgb
from mobilenets.datasets.s2cells import Partition
from mobilenets.datasets.transforms import MINUS_ONE_ONE, ClassificationTransform

log = logging.getLogger(__name__)

TSV_SUFFIXES = frozenset({".tsv", ".tab"})


class GeotagError(MobilenetsError, ValueError):
    """A geotag file or row that cannot be used; the message names the file, the line and the problem."""


@dataclass
class GeotagTable:
    """Rows of one geotag file: image path or id, latitude and longitude (degrees), and file line numbers.

    ``lat``/``lon`` are NaN where the file has no coordinates (prediction lists). The ``skipped_*``
    counts say what the skip options dropped.
    """

    path: Path
    images: list[str]
    lat: np.ndarray
    lon: np.ndarray
    lines: np.ndarray
    skipped_rows: int = 0
    skipped_missing: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: np.ndarray) -> GeotagTable:
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        images = [self.images[k] for k in index]
        return GeotagTable(
            self.path,
            images,
            self.lat[index],
            self.lon[index],
            self.lines[index],
            self.skipped_rows,
            self.skipped_missing,
            self.skipped_reasons,
        )


def detect_delimiter(path: Path, first_line: str) -> str:
    """Tab for .tsv/.tab files or a header with tabs and no commas; comma otherwise."""
    if path.suffix.lower() in TSV_SUFFIXES:
        return "\t"
    return "\t" if "\t" in first_line and "," not in first_line else ","


def check_coordinate(lat: float, lon: float) -> str | None:
    """Why (lat, lon) is not a coordinate in degrees, or None when it is."""
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return f"coordinates ({lat}, {lon}) are not finite"
    if not -90.0 <= lat <= 90.0:
        return f"latitude {lat} outside [-90, 90]"
    if not -180.0 <= lon <= 180.0:
        return f"longitude {lon} outside [-180, 180]"
    return None


def read_geotags(
    path: str | Path,
    image_column: str | None = "IMG_ID",
    lat_column: str = "LAT",
    lon_column: str = "LON",
    delimiter: str | None = None,
    skip_invalid_rows: bool = False,
    require_coordinates: bool = True,
) -> GeotagTable:
    """Read a geotag CSV/TSV with a header row.

    Coordinates must be finite with latitude in [-90, 90] and longitude in [-180, 180]; a bad row raises
    ``GeotagError`` naming the file and line, or with ``skip_invalid_rows`` is skipped and counted.
    ``image_column=None`` reads coordinates only (what ``geo partition`` needs). Without
    ``require_coordinates`` a file lacking the coordinate columns is accepted (coordinates NaN).
    """
    path = Path(path)
    if not path.is_file():
        raise GeotagError(f"{path}: geotag file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        first_line = handle.readline()
        handle.seek(0)
        sep = delimiter or detect_delimiter(path, first_line)
        reader = csv.reader(handle, delimiter=sep)
        header = next(reader, None)
        if not header:
            raise GeotagError(
                f"{path}: empty file; expected a header row with {lat_column!r} and {lon_column!r}"
            )
        header = [h.strip() for h in header]
        wanted = [c for c in (image_column, lat_column, lon_column) if c is not None]
        missing = [c for c in wanted if c not in header]
        has_coordinates = lat_column in header and lon_column in header
        if missing and (require_coordinates or image_column in missing):
            raise GeotagError(
                f"{path}: line 1: missing column(s) {missing}; the header has {header} "
                f"(set image_column/lat_column/lon_column, or delimiter for a {'TSV' if sep == ',' else 'CSV'})"
            )
        image_index = header.index(image_column) if image_column is not None else -1
        lat_index = header.index(lat_column) if has_coordinates else -1
        lon_index = header.index(lon_column) if has_coordinates else -1
        needed = max(image_index, lat_index, lon_index) + 1
        # One cheap pass over the rows; numbers are parsed and checked for all rows at once afterwards.
        images: list[str] = []
        lat_text: list[str] = []
        lon_text: list[str] = []
        lines: list[int] = []
        short_rows: dict[int, str] = {}
        for row in reader:
            if len(row) < needed:
                if not any(value.strip() for value in row):
                    continue
                short_rows[len(lines)] = f"expected at least {needed} fields, got {len(row)}"
                row = ["nan"] * needed
            lines.append(reader.line_num)
            if image_index >= 0:
                images.append(row[image_index].strip())
            if has_coordinates:
                lat_text.append(row[lat_index])
                lon_text.append(row[lon_index])
    count = len(lines)
    if has_coordinates:
        lat, lat_bad = _parse_floats(lat_text)
        lon, lon_bad = _parse_floats(lon_text)
    else:
        lat, lon = np.full(count, np.nan), np.full(count, np.nan)
        lat_bad = lon_bad = np.zeros(count, dtype=bool)
    not_numbers = lat_bad | lon_bad
    with np.errstate(invalid="ignore"):
        bad = not_numbers | (
            has_coordinates
            & ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
        )
    if image_index >= 0:
        bad |= np.array([not name for name in images], dtype=bool)
    if short_rows:
        bad[list(short_rows)] = True

    def problem(k: int) -> str:
        if k in short_rows:
            return short_rows[k]
        if not_numbers[k]:
            return f"latitude/longitude {lat_text[k]!r}, {lon_text[k]!r} are not numbers"
        if has_coordinates and (reason := check_coordinate(float(lat[k]), float(lon[k]))):
            return reason
        return f"empty {image_column}"

    bad_rows = np.flatnonzero(bad)
    if bad_rows.size and not skip_invalid_rows:
        k = int(bad_rows[0])
        raise GeotagError(f"{path}: line {lines[k]}: {problem(k)} (set skip_invalid_rows to skip such rows)")
    reasons = [f"line {lines[k]}: {problem(int(k))}" for k in bad_rows[:5]]
    if bad_rows.size:
        log.warning("%s: skipped %d invalid rows (first: %s)", path, bad_rows.size, "; ".join(reasons))
    table = GeotagTable(
        path,
        images if image_column is not None else [""] * count,
        lat,
        lon,
        np.array(lines, dtype=np.int64),
        skipped_rows=int(bad_rows.size),
        skipped_reasons=reasons,
    )
    return table.subset(~bad) if bad_rows.size else table


def _parse_floats(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Numbers of a column and a mask of the entries that are not numbers (NaN there)."""
    try:
        return np.array(texts, dtype=np.float64), np.zeros(len(texts), dtype=bool)
    except ValueError:
        values = np.full(len(texts), np.nan)
        failed = np.zeros(len(texts), dtype=bool)
        for k, text in enumerate(texts):
            try:
                values[k] = float(text)
            except ValueError:
                failed[k] = True
        return values, failed


def resolve_image_paths(
    table: GeotagTable, image_root: str | Path | None, skip_missing_images: bool = False
) -> tuple[GeotagTable, list[Path]]:
    """Image files of the rows (relative to ``image_root``, default the file's folder).

    A missing file raises ``GeotagError`` naming the geotag file, line and image path, or with
    ``skip_missing_images`` the row is dropped and counted in ``skipped_missing``.
    """
    root = Path(image_root) if image_root is not None else table.path.parent
    paths = [root / name for name in table.images]
    exists = np.array([p.is_file() for p in paths], dtype=bool)
    if exists.all():
        return table, paths
    first = int(np.flatnonzero(~exists)[0])
    if not skip_missing_images:
        raise GeotagError(
            f"{table.path}: line {table.lines[first]}: image file {paths[first]} not found "
            f"({int((~exists).sum())} missing in all; set skip_missing_images to skip them)"
        )
    log.warning("%s: skipped %d rows whose image file is missing", table.path, int((~exists).sum()))
    kept = table.subset(exists)
    kept.skipped_missing = int((~exists).sum())
    return kept, [p for p, ok in zip(paths, exists) if ok]


class GeotagDataset(Dataset):
    """Images with their cell label (-1 outside the partition) and true coordinates."""

    def __init__(
        self,
        paths: list[Path],
        lat: np.ndarray,
        lon: np.ndarray,
        labels: np.ndarray,
        transform: ClassificationTransform,
    ) -> None:
        self.paths = paths
        self.latlon = np.stack([lat, lon], axis=1).astype(np.float64)
        self.labels = labels.astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = load_rgb(self.paths[index], min_size=self.transform.decode_size)
        return {
            "image": self.transform(image, np.random.default_rng(seed)),
            "label": int(self.labels[index]),
            "latlon": torch.from_numpy(self.latlon[index]),
            "path": str(self.paths[index]),
        }


class GeotagDataModule(BaseDataModule):
    """Geotag CSV/TSV files + image folder → batches labelled with the cells of a partition file.

    Training photos outside every kept cell (in discarded cells) are dropped and counted; validation and
    test photos keep label -1 there (their distance in km still counts).

    Args:
        partition: the cell CSV written by ``mobilenets geo partition`` (the same file as the model's).
        train_csv, val_csv, test_csv: geotag files (``image_column``, ``lat_column``, ``lon_column``).
        predict_dir: a folder of images to predict (searched recursively, sorted).
        predict_csv: a geotag file to predict (coordinates optional; with them, distances are reported).
        image_root: folder the image column is relative to (default: each geotag file's folder).
        delimiter: field separator; default tab for .tsv/.tab files, else detected from the header.
        skip_invalid_rows: skip and count rows with bad coordinates instead of failing.
        skip_missing_images: skip and count rows whose image file does not exist instead of failing.
        skip_corrupt: check every image decodes at setup; skip and count the corrupt ones.
        input_size: the network's input resolution.
        batch_size, num_workers, mean, std, seed: the ``BaseDataModule`` options.
    """

    #: GeotagDataset draws each sample's augmentation from the seed in its key
    seeded_keys = True

    def __init__(
        self,
        partition: str,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        predict_dir: str | None = None,
        predict_csv: str | None = None,
        image_root: str | None = None,
        image_column: str = "IMG_ID",
        lat_column: str = "LAT",
        lon_column: str = "LON",
        delimiter: str | None = None,
        skip_invalid_rows: bool = False,
        skip_missing_images: bool = False,
        skip_corrupt: bool = False,
        input_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        mean: tuple[float, float, float] = MINUS_ONE_ONE[0],
        std: tuple[float, float, float] = MINUS_ONE_ONE[1],
        seed: int = 0,
    ) -> None:
        super().__init__(input_size, batch_size, num_workers, mean, std, predict_dir, seed)
        self.save_hyperparameters()
        self.predict_csv = predict_csv
        self.partition_path = partition
        self._partition: Partition | None = None
        self.datasets: dict[str, GeotagDataset] = {}

    @property
    def partition(self) -> Partition:
        if self._partition is None:
            self._partition = Partition.read_csv(self.partition_path)
        return self._partition

    def _load(self, path: str, train: bool, require_coordinates: bool = True) -> GeotagDataset:
        hp = self.hparams
        table = read_geotags(
            path,
            hp.image_column,
            hp.lat_column,
            hp.lon_column,
            hp.delimiter,
            hp.skip_invalid_rows,
            require_coordinates,
        )
        table, paths = resolve_image_paths(table, hp.image_root, hp.skip_missing_images)
        if hp.skip_corrupt:
            kept, _ = check_images(paths, skip_corrupt=True, what=f"images of {path}")
            table, paths = table.subset(np.array(kept, dtype=np.int64)), [paths[k] for k in kept]
        if np.isnan(table.lat).any():
            labels = np.full(len(table), -1, dtype=np.int64)
        else:
            labels = self.partition.assign(table.lat, table.lon)
        if train:
            outside = labels < 0
            if outside.all():
                raise GeotagError(
                    f"{path}: none of its {len(table)} photos falls in a cell of {self.partition_path}; "
                    "was the partition built from this file?"
                )
            if outside.any():
                log.info("%s: %d training photos in discarded cells are not used", path, int(outside.sum()))
                keep = np.flatnonzero(~outside)
                table, paths, labels = table.subset(keep), [paths[k] for k in keep], labels[keep]
        transform = ClassificationTransform(self.input_size, train=train, mean=self.mean, std=self.std)
        return GeotagDataset(paths, table.lat, table.lon, labels, transform)

    def _load_predict(self) -> GeotagDataset:
        if self.predict_dir:
            paths = images_in_folder(self.predict_dir, "predict_dir", GeotagError)
            nan = np.full(len(paths), np.nan)
            transform = ClassificationTransform(self.input_size, train=False, mean=self.mean, std=self.std)
            return GeotagDataset(paths, nan, nan, np.full(len(paths), -1), transform)
        if self.predict_csv:
            return self._load(self.predict_csv, train=False, require_coordinates=False)
        raise GeotagError("predict needs predict_dir (a folder of images) or predict_csv (a geotag file)")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and "train" not in self.datasets:
            if not hp.train_csv:
                raise GeotagError("train_csv is required to fit")
            self.datasets["train"] = self._load(hp.train_csv, train=True)
        if stage in (None, "fit", "validate") and hp.val_csv and "val" not in self.datasets:
            self.datasets["val"] = self._load(hp.val_csv, train=False)
        if stage in (None, "test") and "test" not in self.datasets:
            if not hp.test_csv:
                raise GeotagError("test_csv is required to test")
            self.datasets["test"] = self._load(hp.test_csv, train=False)
        if stage in (None, "predict") and "predict" not in self.datasets:
            self.datasets["predict"] = self._load_predict()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.datasets["val"]) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"])
