"""PlaNet partition speed: leaf S2 cell ids and the adaptive partition of 1 M and 10 M photo coordinates.

Peer: s2sphere's ``CellId.from_lat_lng`` (pure Python), timed on a sample in the same run and extrapolated
per million; the sample's ids are also checked equal to ours. Target (issue 6): 1 M coordinates
partitioned in at most 10 s on the 2-core CI machine.

    .venv/bin/python benchmarks/geo_partition.py [--sizes 1000000 10000000] [--repeats 3] [--csv]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import s2sphere

from mobilenets.datasets.geotags import read_geotags
from mobilenets.datasets.s2cells import build_partition, leaf_cell_ids
from mobilenets.tasks.cli.geo import partition_main


def photo_coordinates(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Photo-like coordinates: 2,000 "cities" with heavy-tailed popularity plus 5% scattered anywhere."""
    rng = np.random.default_rng(seed)
    cities = 2000
    city_lat = np.degrees(np.arcsin(rng.uniform(-0.75, 0.95, cities)))
    city_lon = rng.uniform(-180, 180, cities)
    popularity = rng.pareto(1.1, cities) + 0.05
    city = rng.choice(cities, n, p=popularity / popularity.sum())
    spread = rng.choice([0.01, 0.1, 1.0], n, p=[0.5, 0.4, 0.1])
    lat = np.clip(city_lat[city] + rng.normal(0, 1, n) * spread, -90, 90)
    lon = city_lon[city] + rng.normal(0, 1, n) * spread
    scattered = rng.random(n) < 0.05
    lat[scattered] = np.degrees(np.arcsin(rng.uniform(-1, 1, scattered.sum())))
    lon[scattered] = rng.uniform(-180, 180, scattered.sum())
    return lat, (lon + 180) % 360 - 180


def median_time(function: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median wall-clock and median CPU seconds of ``repeats`` calls (CPU time shows the work itself when
    other jobs share the cores), and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def s2sphere_seconds_per_million(lat: np.ndarray, lon: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """The peer, one coordinate at a time: (wall, CPU) seconds per million; its ids must equal ours."""
    wall, cpu = time.perf_counter(), time.process_time()
    ids = [
        s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id()
        for a, b in zip(lat.tolist(), lon.tolist())
    ]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not np.array_equal(np.array(ids, dtype=np.uint64), ours):
        raise SystemExit("leaf ids differ from s2sphere's")
    return wall / lat.size * 1e6, cpu / lat.size * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is printed)")
    parser.add_argument(
        "--s2sphere-sample", type=int, default=50_000, help="coordinates s2sphere is timed on"
    )
    parser.add_argument("--max-photos", type=int, default=10_000)
    parser.add_argument("--min-photos", type=int, default=50)
    parser.add_argument("--csv", action="store_true", help="also time reading a 1 M-row IMG_ID,LAT,LON file")
    args = parser.parse_args()

    lat, lon = photo_coordinates(args.s2sphere_sample, seed=1)
    peer_per_million, peer_cpu_per_million = s2sphere_seconds_per_million(lat, lon, leaf_cell_ids(lat, lon))
    print(
        f"s2sphere leaf ids: {peer_per_million:.2f} s ({peer_cpu_per_million:.2f} CPU s) per million "
        f"(timed on {args.s2sphere_sample:,} coordinates; ids equal to ours)"
    )
    print(
        f"\n{'photos':>12}{'leaf ids (s)':>14}{'s2sphere (s)':>14}{'speed-up (CPU)':>16}"
        f"{'partition (s)':>15}{'(CPU s)':>9}{'cells':>8}{'levels':>8}{'target':>14}"
    )
    for n in args.sizes:
        lat, lon = photo_coordinates(n)
        leaf_s, leaf_cpu, _ = median_time(lambda lat=lat, lon=lon: leaf_cell_ids(lat, lon), args.repeats)
        part_s, part_cpu, partition = median_time(
            lambda lat=lat, lon=lon: build_partition(lat, lon, args.max_photos, args.min_photos), args.repeats
        )
        peer_s = peer_per_million * n / 1e6
        target = ("ok" if part_s <= 10 else "MISSED") + " (≤10 s)" if n == 1_000_000 else "-"
        levels = f"{partition.levels.min()}-{partition.levels.max()}"
        print(
            f"{n:>12,}{leaf_s:>14.2f}{peer_s:>14.1f}{peer_cpu_per_million * n / 1e6 / leaf_cpu:>15.0f}x"
            f"{part_s:>15.2f}{part_cpu:>9.2f}{len(partition):>8,}{levels:>8}{target:>14}"
        )
    print(
        f"(partition: max_photos={args.max_photos}, min_photos={args.min_photos}; medians of {args.repeats} runs)"
    )
    if args.csv:
        n = 1_000_000
        lat, lon = photo_coordinates(n)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "mp16.csv"
            rows = "\n".join(
                f"{k}.jpg,{a:.6f},{b:.6f}" for k, (a, b) in enumerate(zip(lat.tolist(), lon.tolist()))
            )
            path.write_text("IMG_ID,LAT,LON\n" + rows + "\n")
            read_s, read_cpu, _ = median_time(lambda: read_geotags(path, image_column=None), 1)
            command = [str(path), "--out", str(Path(folder) / "cells.csv")]
            command += ["--max-photos", str(args.max_photos), "--min-photos", str(args.min_photos)]
            with contextlib.redirect_stdout(io.StringIO()):
                total_s, total_cpu, _ = median_time(lambda: partition_main(command), 1)
        print(f"reading a {n:,}-row IMG_ID,LAT,LON CSV (rows checked): {read_s:.2f} s ({read_cpu:.2f} CPU s)")
        print(
            f"'mobilenets geo partition' on it (read, partition, write CSV + GeoJSON): "
            f"{total_s:.2f} s ({total_cpu:.2f} CPU s)"
        )


if __name__ == "__main__":
    main()
