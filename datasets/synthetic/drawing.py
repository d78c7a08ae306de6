"""What the generators draw: colours, backgrounds, gratings, shapes and sensor noise.

Every function takes its randomness from the caller's ``numpy.random.Generator``, so a generator's seed fixes
its data.
"""

from __future__ import annotations

import colorsys
import math
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Shape = Literal["ellipse", "rectangle", "triangle", "diamond"]
#: The shapes ``shape_polygon`` and ``draw_shape`` know, in the order classes cycle through them.
SHAPES: tuple[Shape, ...] = ("ellipse", "rectangle", "triangle", "diamond")


def hsv_colour(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    """An RGB colour in [0, 1] from hue, saturation and value in [0, 1]."""
    return colorsys.hsv_to_rgb(hue % 1.0, saturation, value)


def class_colour(label: int) -> tuple[int, int, int]:
    """A saturated 8-bit colour per class; golden-ratio hues stay far apart for any class count."""
    r, g, b = hsv_colour(label * 0.618034, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    """An 8-bit RGB colour with each channel drawn uniformly from [low, high)."""
    return tuple(int(c) for c in rng.integers(low, high, size=3))  # type: ignore[return-value]


def pixel_grid(height: int, width: int, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx): the row and column coordinate of every pixel."""
    yy, xx = np.mgrid[0:height, 0:width].astype(dtype)
    return yy, xx


def grating(xx: np.ndarray, yy: np.ndarray, angle: float, frequency: float, phase: float = 0.0) -> np.ndarray:
    """A sine grating in [-1, 1] across direction ``angle`` with ``frequency`` cycles per unit of xx/yy."""
    return np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)


def add_noise(image: np.ndarray, rng: np.random.Generator, std: float, peak: float = 255.0) -> np.ndarray:
    """``image`` (values in [0, peak]) plus Gaussian sensor noise, clipped and returned as uint8 pixels."""
    noisy = np.array(image, copy=True)
    noisy += rng.normal(0, std, noisy.shape)
    return (np.clip(noisy, 0, peak) * (255.0 / peak)).astype(np.uint8)


def flat_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uniform random grey-ish colour under strong pixel noise, (height, width, 3) uint8."""
    colour = rng.integers(60, 200, size=3)
    return add_noise(np.broadcast_to(colour, (height, width, 3)).astype(np.float64), rng, 25)


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluttered background: a colour gradient, low-frequency blobs, stripes and pixel noise (uint8)."""
    yy, xx = pixel_grid(height, width)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    coarse = rng.normal(0, 18, size=(height // 16 + 2, width // 16 + 2, 3))
    image += np.kron(coarse, np.ones((16, 16, 1)))[:height, :width]
    period = rng.uniform(6, 20)
    angle = rng.uniform(0, math.pi)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    image += stripes[..., None] * rng.uniform(4, 14)
    return add_noise(image, rng, 6)


def shape_polygon(kind: Shape, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    """The outline of ``kind`` filling the box (x, y, w, h); an ellipse is a 24-gon."""
    if kind == "rectangle":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if kind == "triangle":
        return [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    if kind == "diamond":
        return [(x + w / 2, y), (x + w, y + h / 2), (x + w / 2, y + h), (x, y + h / 2)]
    cx, cy = x + w / 2, y + h / 2
    return [
        (cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
        for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)
    ]


def shape_area(kind: Shape, w: float, h: float) -> float:
    """The exact area of ``kind`` filling a w x h box."""
    return {
        "rectangle": w * h,
        "triangle": 0.5 * w * h,
        "diamond": 0.5 * w * h,
        "ellipse": math.pi * w * h / 4,
    }[kind]


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: Shape, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    """Fill ``kind`` into the pixel box (x0, y0, x1, y1), corners inclusive, with PIL's own primitives."""
    x0, y0, x1, y1 = box
    if kind == "ellipse":
        draw.ellipse(box, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    else:
        draw.polygon(
            [((x0 + x1) // 2, y0), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)],
            fill=fill,
        )


def ellipse_box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    """The bounding box PIL wants for an ellipse of centre (cx, cy) and radii (rx, ry)."""
    return (cx - rx, cy - ry, cx + rx, cy + ry)


def draw_class_image(
    label: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """An image of class ``label`` (noisy background, one object) and the object's box (x0, y0, x1, y1).

    Each class is learnable: its object has its own colour, shape and stripe direction.
    """
    width, height = size
    image = Image.fromarray(flat_background(rng, height, width))
    draw = ImageDraw.Draw(image)
    bw = int(width * rng.uniform(0.45, 0.8))
    bh = int(height * rng.uniform(0.45, 0.8))
    x0 = int(rng.integers(0, width - bw + 1))
    y0 = int(rng.integers(0, height - bh + 1))
    box = (x0, y0, x0 + bw, y0 + bh)
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in class_colour(label))
    x1, y1 = x0 + bw - 1, y0 + bh - 1
    draw_shape(draw, SHAPES[label % len(SHAPES)], (x0, y0, x1, y1), colour)
    # stripes whose direction depends on the class: a texture cue beside colour and shape
    stripe = tuple(max(c - 90, 0) for c in colour)
    step = max(bw, bh) // 6 + 2
    vertical = (label // len(SHAPES)) % 2 == 0
    for offset in range(0, bw if vertical else bh, step):
        if vertical:
            draw.line([(x0 + offset, y0 + bh // 4), (x0 + offset, y1 - bh // 4)], fill=stripe, width=2)
        else:
            draw.line([(x0 + bw // 4, y0 + offset), (x1 - bw // 4, y0 + offset)], fill=stripe, width=2)
    return image, box
