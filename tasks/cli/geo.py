"""``mobilenets geo``: PlaNet's tools. ``geo partition`` builds the adaptive S2 cell partition (the classes)
from a geotag CSV/TSV; ``geo cells`` prints the cell of coordinates. Also the demo's geolocation step."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from mobilenets.backbone.errors import ConfigError
from mobilenets.datasets.atomic import atomic_paths
from mobilenets.datasets.geotags import check_coordinate, read_geotags
from mobilenets.datasets.s2cells import (
    MAX_LEVEL,
    PLANET_MAX_PHOTOS,
    PLANET_MIN_PHOTOS,
    Partition,
    PartitionError,
    build_partition,
    cell_token,
    leaf_cell_ids,
    parent_ids,
)


def add_column_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lat-column", default="LAT", help="latitude column (default LAT)")
    parser.add_argument("--lon-column", default="LON", help="longitude column (default LON)")
    parser.add_argument(
        "--delimiter", default=None, help="field separator (default: tab for .tsv, else detected)"
    )
    parser.add_argument(
        "--skip-invalid-rows",
        action="store_true",
        help="skip and count rows with bad coordinates instead of failing",
    )


def partition_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mobilenets geo partition",
        description="PlaNet's adaptive S2 partition: split cells above --max-photos into their four children, "
        "drop cells below --min-photos. PlaNet used 10000/50 (26,263 cells from 91 M photos); public MP-16 "
        "partitions use max 5000/2000/1000 with min 50.",
    )
    parser.add_argument("geotags", type=Path, help="training geotag CSV/TSV (e.g. IMG_ID,LAT,LON)")
    parser.add_argument(
        "--out", type=Path, required=True, help="partition CSV to write (class,token,level,photos,lat,lon)"
    )
    parser.add_argument(
        "--geojson", type=Path, default=None, help="cell polygons (default: --out with .geojson)"
    )
    parser.add_argument("--no-geojson", action="store_true", help="do not write the GeoJSON")
    parser.add_argument(
        "--max-photos", type=int, default=PLANET_MAX_PHOTOS, help="split cells with more photos"
    )
    parser.add_argument(
        "--min-photos", type=int, default=PLANET_MIN_PHOTOS, help="discard cells with fewer photos"
    )
    parser.add_argument(
        "--min-level", type=int, default=0, help="level of the starting cells (0: the six faces)"
    )
    parser.add_argument("--max-level", type=int, default=MAX_LEVEL, help="never split beyond this level")
    add_column_options(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = read_geotags(
        args.geotags,
        image_column=None,
        lat_column=args.lat_column,
        lon_column=args.lon_column,
        delimiter=args.delimiter,
        skip_invalid_rows=args.skip_invalid_rows,
    )
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    partition = build_partition(
        table.lat, table.lon, args.max_photos, args.min_photos, args.min_level, args.max_level
    )
    build_s = time.perf_counter() - start
    if len(partition) == 0:
        raise PartitionError(
            f"{args.geotags}: no cell keeps {args.min_photos} photos ({len(table)} photos); lower --min-photos"
        )
    geojson = None if args.no_geojson else args.geojson or args.out.with_suffix(".geojson")
    # the CSV (the classes) and the GeoJSON (their polygons) are one result: both new, or both old
    with atomic_paths(args.out, *([geojson] if geojson else [])) as temps:
        partition.write_csv(temps[0])
        if geojson:
            partition.write_geojson(temps[1])
    print(f"read {len(table):,} coordinates from {args.geotags} in {read_s:.2f} s", end="")
    print(f" ({table.skipped_rows} invalid rows skipped)" if table.skipped_rows else "")
    print(f"partitioned in {build_s:.2f} s: {partition.summary()}")
    levels, counts = np.unique(partition.levels, return_counts=True)
    print("cells per level: " + ", ".join(f"{lv}: {n}" for lv, n in zip(levels.tolist(), counts.tolist())))
    print(f"wrote {args.out}")
    if geojson:
        print(f"wrote {geojson}")
    return 0


def cells_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mobilenets geo cells",
        description="S2 cell tokens of coordinates, and their class in a partition",
    )
    parser.add_argument(
        "coordinates", nargs="*", help="LAT,LON pairs in degrees, e.g. 48.8584,2.2945 -33.86,151.2"
    )
    parser.add_argument("--level", type=int, default=MAX_LEVEL, help="cell level to print (default leaf)")
    parser.add_argument("--partition", type=Path, default=None, help="also print the partition class")
    # "-33.86,151.2" would read as an option: take coordinate pairs out before argparse sees them
    pairs_text = [a for a in argv if re.fullmatch(r"[-+]?[\d.]+,[-+]?[\d.]+", a)]
    args = parser.parse_args([a for a in argv if a not in pairs_text])
    args.coordinates += pairs_text
    if not args.coordinates:
        parser.error("give at least one LAT,LON pair")
    try:
        pairs = [tuple(float(v) for v in text.split(",")) for text in args.coordinates]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        parser.error("coordinates must be LAT,LON pairs of numbers")
    for a, b in pairs:
        problem = check_coordinate(a, b)
        if problem:
            parser.error(problem)
    lat = np.array([p[0] for p in pairs])
    lon = np.array([p[1] for p in pairs])
    ids = parent_ids(leaf_cell_ids(lat, lon), args.level)
    classes = Partition.read_csv(args.partition).assign(lat, lon) if args.partition else None
    for n, (a, b) in enumerate(pairs):
        text = f"{a:.6f},{b:.6f}  level {args.level} cell {cell_token(int(ids[n]))}"
        if classes is not None:
            text += f"  class {classes[n]}" if classes[n] >= 0 else "  outside the partition"
        print(text)
    return 0


SUBCOMMANDS = {"partition": partition_main, "cells": cells_main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mobilenets geo {partition,cells} [options]\n")
        print("  partition  build PlaNet's adaptive S2 cell partition (the classes) from a geotag CSV/TSV")
        print("  cells      print the S2 cell (and partition class) of LAT,LON coordinates")
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise ConfigError(f"unknown subcommand {argv[0]!r}; choose from {list(SUBCOMMANDS)}")
    return SUBCOMMANDS[argv[0]](argv[1:])
