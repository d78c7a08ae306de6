"""Structured generated images in the ImageFolder layout (``root/class_<k>/<n>.jpg``): oriented colour
gratings with a random disc, one orientation and tint per class.

Used where real photos are not available (tests, the speed report): to calibrate int8 quantisation and
to measure int8/float agreement on images with real spatial structure rather than white noise, and to
give randomly initialised models realistic batch-norm statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mobilenets.datasets.synthetic.drawing import add_noise, grating, pixel_grid


def pattern_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``: a grating at the class's angle over the class's
    tint, with random frequency, phase and contrast, plus a random disc and pixel noise."""
    angle = np.pi * label / num_classes + rng.normal(0, 0.05)
    frequency = rng.uniform(3, 9) / size
    yy, xx = pixel_grid(size, size)
    wave = grating(xx, yy, angle, frequency, rng.uniform(0, 2 * np.pi))
    tint = np.array([np.cos(2 * np.pi * (label / num_classes + k / 3)) for k in range(3)], np.float32)
    contrast = 0.3 * rng.uniform(0.6, 1.0)
    image = 0.5 + 0.2 * tint + contrast * wave[..., None] * (0.7 + 0.3 * tint)
    cy, cx = rng.uniform(0, size, 2).tolist()
    radius = rng.uniform(size / 12, size / 6)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image[disc] = rng.uniform(0, 1, 3)
    return add_noise(image, rng, 0.03, peak=1.0)


def make_calibration_patterns(
    root: str | Path, per_class: int, num_classes: int = 5, size: int = 64, seed: int = 0
) -> list[tuple[Path, int]]:
    """Write ``per_class`` JPEGs for each of ``num_classes`` classes under ``root/class_<k>/``.

    Returns (path, label) pairs in a stable order.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    samples: list[tuple[Path, int]] = []
    for label in range(num_classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            path = folder / f"{index:04d}.jpg"
            Image.fromarray(pattern_image(label, num_classes, size, rng)).save(path, quality=92)
            samples.append((path, label))
    return samples
