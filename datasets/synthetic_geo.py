"""Small geotagged photo sets in the MP-16 / Im2GPS format (``IMG_ID,LAT,LON`` + JPEG files) whose look
depends on where each photo was "taken": each region has its own colours and stripe texture, so a
classifier over S2 cells can learn to place them (demo and tests)."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mobilenets.datasets.atomic import write_text_atomic

#: Places spread over every continent, one across the antimeridian (Fiji) and one far north (Svalbard).
REGIONS: tuple[tuple[str, float, float], ...] = (
    ("Paris", 48.86, 2.35),
    ("New York", 40.71, -74.01),
    ("Tokyo", 35.68, 139.69),
    ("Sydney", -33.87, 151.21),
    ("Nairobi", -1.29, 36.82),
    ("Rio de Janeiro", -22.91, -43.17),
    ("Fiji", -17.71, 179.99),
    ("Delhi", 28.61, 77.21),
    ("Los Angeles", 34.05, -118.24),
    ("Cairo", 30.04, 31.24),
    ("Svalbard", 78.22, 15.65),
    ("Lima", -12.05, -77.04),
)
KM_PER_DEGREE = 6371.0 * math.pi / 180.0


@dataclass(frozen=True)
class GeoDataset:
    """Paths of a generated set: the geotag files and the folder their ``IMG_ID`` paths are relative to."""

    root: Path
    train_csv: Path
    val_csv: Path
    test_csv: Path
    image_root: Path
    regions: tuple[tuple[str, float, float], ...]


def region_style(index: int, count: int) -> tuple[tuple[float, float, float], float, float]:
    """(RGB base colour in [0, 1], stripe angle in radians, stripe frequency) of region ``index``."""
    hue = index / max(count, 1)
    rgb = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    angle = math.pi * ((index * 0.382) % 1.0)
    frequency = 2.0 + 3.0 * ((index * 0.618) % 1.0)
    return rgb, angle, frequency


def geo_image(rng: np.random.Generator, index: int, count: int, size: int) -> Image.Image:
    """A photo "from" region ``index``: its colour with jitter, its stripes at a random phase, noise."""
    rgb, angle, frequency = region_style(index, count)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * math.pi)
    along = math.cos(angle) * xx + math.sin(angle) * yy
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * along + phase)
    colour = np.clip(np.array(rgb) + rng.normal(0, 0.06, 3), 0, 1)
    image = colour[None, None, :] * (0.55 + 0.45 * stripes[..., None])
    image += rng.normal(0, 0.05, image.shape)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def sample_around(
    rng: np.random.Generator, lat: float, lon: float, spread_km: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` coordinates scattered around (lat, lon) with a Gaussian of ``spread_km``; longitudes wrapped."""
    lats = np.clip(lat + rng.normal(0, spread_km / KM_PER_DEGREE, n), -89.9, 89.9)
    scale = KM_PER_DEGREE * max(math.cos(math.radians(lat)), 0.05)
    lons = lon + rng.normal(0, spread_km / scale, n)
    return lats, (lons + 180.0) % 360.0 - 180.0


def write_geotag_dataset(
    root: str | Path,
    num_regions: int = 8,
    train_per_region: int = 40,
    val_per_region: int = 6,
    test_per_region: int = 6,
    image_size: int = 48,
    spread_km: float = 30.0,
    seed: int = 0,
) -> GeoDataset:
    """Write ``images/<hh>/<hh>/<id>.jpg`` and ``train.csv``/``val.csv``/``test.csv`` (IMG_ID,LAT,LON)."""
    if not 1 <= num_regions <= len(REGIONS):
        raise ValueError(f"num_regions must be in 1..{len(REGIONS)}, got {num_regions}")
    root = Path(root)
    image_root = root / "images"
    rng = np.random.default_rng(seed)
    regions = REGIONS[:num_regions]
    next_id = 1_000_000
    files = {}
    for split, per_region in (
        ("train", train_per_region),
        ("val", val_per_region),
        ("test", test_per_region),
    ):
        rows = ["IMG_ID,LAT,LON"]
        for index, (_, lat, lon) in enumerate(regions):
            lats, lons = sample_around(rng, lat, lon, spread_km, per_region)
            for a, b in zip(lats.tolist(), lons.tolist()):
                digest = f"{(next_id * 2654435761) % (1 << 32):08x}"
                name = f"{digest[:2]}/{digest[2:4]}/{next_id}.jpg"
                next_id += 1
                path = image_root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                geo_image(rng, index, num_regions, image_size).save(path, quality=90)
                rows.append(f"{name},{a:.6f},{b:.6f}")
        files[split] = root / f"{split}.csv"
        write_text_atomic(files[split], "\n".join(rows) + "\n")
    return GeoDataset(root, files["train"], files["val"], files["test"], image_root, regions)
