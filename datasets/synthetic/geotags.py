"""Small generated geotagged photo sets in the MP-16 / Im2GPS format (``IMG_ID,LAT,LON`` + JPEG files) whose look
depends on where each photo was "taken": each region has its own colours and stripe texture, so a
classifier over S2 cells can learn to place them (demo and tests). With ``clutter`` a photo is a cluttered
scene instead: its region's landmarks at a random place and size among a stranger's object."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.datasets.synthetic.drawing import (
    SHAPES,
    add_noise,
    class_colour,
    draw_shape,
    grating,
    hsv_colour,
    pixel_grid,
    random_colour,
    textured_background,
)

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
    rgb = hsv_colour(hue, 0.75, 0.9)
    angle = math.pi * ((index * 0.382) % 1.0)
    frequency = 2.0 + 3.0 * ((index * 0.618) % 1.0)
    return rgb, angle, frequency


def geo_image(rng: np.random.Generator, index: int, count: int, size: int) -> Image.Image:
    """A photo "from" region ``index``: its colour with jitter, its stripes at a random phase, noise."""
    rgb, angle, frequency = region_style(index, count)
    yy, xx = pixel_grid(size, size, np.float64)
    stripes = 0.5 + 0.5 * grating(xx / size, yy / size, angle, frequency, rng.uniform(0, 2 * math.pi))
    colour = np.clip(np.array(rgb) + rng.normal(0, 0.06, 3), 0, 1)
    image = colour[None, None, :] * (0.55 + 0.45 * stripes[..., None])
    return Image.fromarray(add_noise(image, rng, 0.05, peak=1.0))


def landmark_scene(rng: np.random.Generator, index: int, count: int, size: int) -> Image.Image:
    """A cluttered photo "from" region ``index``: a textured scene tinted by its climate (shared with
    other regions), one or two of its landmarks (its shape and jittered colour) at a random place and size,
    and a stranger's object of any shape and colour that may hide part of them."""
    climate = np.array(hsv_colour((index % 4) / 4 + 0.1, 0.5, 1.0))
    scene = textured_background(rng, size, size).astype(np.float64) * (0.55 + 0.45 * climate)
    image = Image.fromarray(scene.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    landmark = SHAPES[(index // 3 + index) % len(SHAPES)]
    base = class_colour(index)

    def place(low: float, high: float) -> tuple[int, int, int, int]:
        w, h = (int(size * rng.uniform(low, high)) for _ in range(2))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        return x0, y0, x0 + w - 1, y0 + h - 1

    objects = [
        (landmark, tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in base), place(0.25, 0.55))
        for _ in range(int(rng.integers(1, 3)))
    ]
    stranger = (SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng), place(0.2, 0.45))
    objects.insert(int(rng.integers(0, len(objects) + 1)), stranger)
    for kind, colour, box in objects:
        draw_shape(draw, kind, box, colour)
    pixels = np.asarray(image, dtype=np.float64) * rng.uniform(0.75, 1.2)  # lighting
    return Image.fromarray(add_noise(pixels, rng, 5))


def sample_around(
    rng: np.random.Generator, lat: float, lon: float, spread_km: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` coordinates scattered around (lat, lon) with a Gaussian of ``spread_km``; longitudes wrapped."""
    lats = np.clip(lat + rng.normal(0, spread_km / KM_PER_DEGREE, n), -89.9, 89.9)
    scale = KM_PER_DEGREE * max(math.cos(math.radians(lat)), 0.05)
    lons = lon + rng.normal(0, spread_km / scale, n)
    return lats, (lons + 180.0) % 360.0 - 180.0


def make_geotags(
    root: str | Path,
    num_regions: int = 8,
    train_per_region: int = 40,
    val_per_region: int = 6,
    test_per_region: int = 6,
    image_size: int = 48,
    spread_km: float = 30.0,
    seed: int = 0,
    clutter: bool = False,
) -> GeoDataset:
    """Write ``images/<hh>/<hh>/<id>.jpg`` and ``train.csv``/``val.csv``/``test.csv`` (IMG_ID,LAT,LON);
    ``clutter``: cluttered scenes (``landmark_scene``) instead of ``geo_image``'s coloured stripes."""
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
                draw = landmark_scene if clutter else geo_image
                draw(rng, index, num_regions, image_size).save(path, quality=90)
                rows.append(f"{name},{a:.6f},{b:.6f}")
        files[split] = root / f"{split}.csv"
        write_text_atomic(files[split], "\n".join(rows) + "\n")
    return GeoDataset(root, files["train"], files["val"], files["test"], image_root, regions)
