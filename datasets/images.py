"""Image decoding shared by every dataset: colour-mode normalisation, fast reduced-size JPEG decoding,
and one policy for corrupt files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
# Truncated files must fail loudly rather than decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class CorruptImageError(OSError):
    """An image file that cannot be decoded; the message names the file."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` in a stable (sorted) order."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(root).glob(pattern) if p.is_file() and is_image_file(p))


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images as plain RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_rgb(path: str | Path, min_size: int | None = None) -> np.ndarray:
    """Decode ``path`` as an RGB ``uint8`` array of shape (H, W, 3).

    With ``min_size``, JPEGs much larger than needed are decoded at a reduced scale (libjpeg's DCT
    scaling via ``Image.draft``) while keeping the shorter side at least ``min_size``.
    Raises ``CorruptImageError`` naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()
            return np.asarray(to_rgb(image))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{path}: cannot decode image ({error})") from error


Box = tuple[float, float, float, float]


def load_rgb_region(
    path: str | Path, choose_box: Callable[[int, int], Box], min_output: int | None = None
) -> np.ndarray:
    """Decode only what is needed of ``path``: the region ``choose_box(width, height)`` as RGB uint8.

    ``choose_box`` receives the full image size (read from the header, before decoding) and returns
    ``(x0, y0, x1, y1)`` in those pixels. A JPEG is then decoded at the coarsest DCT scale (1/2, 1/4,
    1/8) that still leaves the region at least ``min_output`` pixels on each side, which is what makes
    large photos cheap. Raises ``CorruptImageError`` naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            x0, y0, x1, y1 = choose_box(width, height)
            scale = 1
            if min_output and image.format == "JPEG":
                limit = min(x1 - x0, y1 - y0) / min_output
                scale = next((s for s in (8, 4, 2) if s <= limit), 1)
                if scale > 1:
                    image.draft("RGB", (width // scale, height // scale))
            image.load()
            rgb = np.asarray(to_rgb(image))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{path}: cannot decode image ({error})") from error
    sx, sy = rgb.shape[1] / width, rgb.shape[0] / height
    left, top = min(int(x0 * sx), rgb.shape[1] - 1), min(int(y0 * sy), rgb.shape[0] - 1)
    right, bottom = max(round(x1 * sx), left + 1), max(round(y1 * sy), top + 1)
    return rgb[top:bottom, left:right]


def _decode_fully(path: Path) -> None:
    # verify() reads chunk structure only and misses a JPEG cut short; decoding the scans finds that.
    # A 1/8-scale draft decode walks every scan at a fraction of the cost of a full decode.
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft(image.mode, (max(image.size[0] // 8, 1), max(image.size[1] // 8, 1)))
        image.load()


def check_images(paths: Iterable[Path], skip_corrupt: bool, what: str = "images") -> tuple[list[int], int]:
    """Indices of decodable images among ``paths``; corrupt ones raise, or are skipped and counted.

    Returns ``(kept indices, number skipped)``. The count is logged, never dropped silently.
    """
    kept: list[int] = []
    skipped = 0
    for index, path in enumerate(paths):
        try:
            _decode_fully(Path(path))
            kept.append(index)
        except FileNotFoundError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            if not skip_corrupt:
                raise CorruptImageError(
                    f"{path}: cannot decode image ({error}); set skip_corrupt: true to skip such files"
                ) from error
            skipped += 1
    if skipped:
        log.warning("skipped %d corrupt %s (skip_corrupt: true)", skipped, what)
    return kept, skipped
