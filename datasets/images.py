"""Image decoding shared by every dataset: colour-mode normalisation, fast reduced-size JPEG decoding,
and one policy for corrupt files."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from mobilenets.backbone.errors import MobilenetsError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
# Truncated files must fail loudly rather than decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class CorruptImageError(MobilenetsError, OSError):
    """An image file that cannot be decoded; the message names the file."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` in a stable (sorted) order."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(root).glob(pattern) if p.is_file() and is_image_file(p))


def images_in_folder(folder: str | Path, what: str, error: type[Exception] = FileNotFoundError) -> list[Path]:
    """The images under ``folder`` (recursive, sorted); ``error`` naming the folder and ``what`` it was
    given as when it is not a folder or holds no images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{folder}: {what} is not a folder (expected a folder of images)")
    paths = list_images(folder)
    if not paths:
        raise error(f"{folder}: {what} holds no images")
    return paths


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


JPEG_MAGIC = b"\xff\xd8\xff"


def _jpeg_scale(limit: float) -> int:
    """The coarsest JPEG DCT scale (8, 4, 2 or 1) not above ``limit``.

    Only powers of two: libjpeg-turbo's M/8 scales (5/8, 3/4, ...) have no SIMD code and decode slower
    than the full image.
    """
    return next((s for s in (8, 4, 2) if s <= limit), 1)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as error:  # a directory, no permission, an I/O error
        raise CorruptImageError(f"{path}: cannot read image ({error})") from error


def _decode(path: Path, scale_of: Callable[[int, int], int]) -> tuple[np.ndarray, int, int]:
    """``(rgb, full_width, full_height)`` of ``path``, a JPEG decoded at the DCT scale that
    ``scale_of(width, height)`` picks from the header (it is called exactly once).

    JPEGs go to libjpeg-turbo straight into an RGB array (simplejpeg: no PIL image object, no mode
    conversion); other formats, CMYK/YCCK data and anything simplejpeg rejects are decoded by PIL from the
    same bytes, so a corrupt file fails with PIL's message as ``CorruptImageError`` naming the file.
    """
    data = _read_bytes(path)
    scale = None
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None
        if colorspace is not None:
            scale = scale_of(width, height)
            if colorspace in ("YCbCr", "Gray"):
                with contextlib.suppress(ValueError):
                    # simplejpeg picks the largest factor whose output meets both minimums: exactly 1/scale
                    rgb = simplejpeg.decode_jpeg(
                        data, colorspace="RGB", min_height=-(-height // scale), min_width=-(-width // scale)
                    )
                    return rgb, width, height
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if scale is None:
                scale = scale_of(width, height)
            if scale > 1 and image.format == "JPEG":
                image.draft("RGB", (width // scale, height // scale))
            image.load()
            return np.asarray(to_rgb(image)), width, height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{path}: cannot decode image ({error})") from error


def load_rgb(path: str | Path, min_size: int | None = None) -> np.ndarray:
    """Decode ``path`` as an RGB ``uint8`` array of shape (H, W, 3).

    With ``min_size``, JPEGs much larger than needed are decoded at a reduced DCT scale (1/2, 1/4, 1/8)
    while keeping the shorter side at least ``min_size``.
    Raises ``CorruptImageError`` naming the file when it cannot be decoded.
    """
    return _decode(Path(path), lambda w, h: _jpeg_scale(min(w, h) / min_size) if min_size else 1)[0]


Box = tuple[float, float, float, float]


def load_rgb_region(
    path: str | Path, choose_box: Callable[[int, int], Box], min_output: int | None = None
) -> np.ndarray:
    """Decode only what is needed of ``path``: the region ``choose_box(width, height)`` as RGB uint8.

    ``choose_box`` receives the full image size (read from the header, before decoding) and returns
    ``(x0, y0, x1, y1)`` in those pixels; it is called once. A JPEG is then decoded at the coarsest DCT
    scale (1/2, 1/4, 1/8) that still leaves the region at least ``min_output`` pixels on each side, which
    is what makes large photos cheap. Raises ``CorruptImageError`` naming the file when it cannot be
    decoded.
    """
    chosen: list[Box] = []

    def scale_of(width: int, height: int) -> int:
        box = choose_box(width, height)
        chosen.append(box)
        x0, y0, x1, y1 = box
        return _jpeg_scale(min(x1 - x0, y1 - y0) / min_output) if min_output else 1

    rgb, width, height = _decode(Path(path), scale_of)
    x0, y0, x1, y1 = chosen[0]
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
    # a bar on a terminal (none in logs): checking VGGFace2 before a faces fit takes about half an hour
    for index, path in enumerate(tqdm(paths, desc=f"checking {what}", unit="image", disable=None)):
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
            log.warning("skipped corrupt image %s (%s)", path, error)
    if skipped:
        log.warning("skipped %d corrupt %s (skip_corrupt: true)", skipped, what)
    return kept, skipped
