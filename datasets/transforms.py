"""The albumentations pipelines of the suite: the one module that knows the augmentation library."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch

#: Inputs scaled to [-1, 1]: what timm's and Keras' MobileNet v1 ImageNet weights expect.
MINUS_ONE_ONE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
#: The eval pipeline resizes the shorter side to input_size / CROP_FRACTION, then centre-crops.
CROP_FRACTION = 0.875
#: ITU-R BT.601 luma weights of R, G, B (what OpenCV's and PIL's RGB-to-grey conversions use).
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """An (H, W, C) array as a contiguous (C, H, W) tensor of the same dtype."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


Box = tuple[float, float, float, float]


class ClassificationTransform:
    """Image array (H, W, 3) uint8 → normalised (3, ρ, ρ) float tensor.

    Train: random resized crop to ρ, horizontal flip, light colour jitter.
    Eval: resize the shorter side to ρ / 0.875, centre crop ρ.

    ``backend="fast"`` (default) runs the same steps as a few fused OpenCV/LUT operations and splits them
    into ``crop_box`` (chosen from the image size alone, before decoding, so a JPEG can be decoded at a
    reduced DCT scale) and ``finish`` (resize, flip, jitter, normalise the crop); ``"albumentations"``
    runs the reference ``A.Compose`` pipeline. Colour jitter of the fast backend is brightness, contrast
    and saturation (no hue shift). Pass ``rng`` to make one call reproducible (per-sample seeding keeps
    augmentations identical across worker counts and resumed runs).
    """

    def __init__(
        self,
        input_size: int,
        train: bool,
        mean: Sequence[float] = MINUS_ONE_ONE[0],
        std: Sequence[float] = MINUS_ONE_ONE[1],
        hflip: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        backend: Literal["fast", "albumentations"] = "fast",
    ) -> None:
        if backend not in ("fast", "albumentations"):
            raise ValueError(f"backend must be 'fast' or 'albumentations', got {backend!r}")
        self.input_size = input_size
        self.train = train
        self.backend = backend
        self.hflip = hflip
        self.scale = scale
        self.ratio = (3 / 4, 4 / 3)
        std_array = np.asarray(std, dtype=np.float32)
        self._norm_scale = torch.from_numpy(1.0 / (255.0 * std_array)).view(3, 1, 1)
        self._norm_shift = torch.from_numpy(np.asarray(mean, dtype=np.float32) / std_array).view(3, 1, 1)
        normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
        if train:
            steps: list = [A.RandomResizedCrop(size=(input_size, input_size), scale=scale)]
            if hflip:
                steps.append(A.HorizontalFlip(p=0.5))
            steps += [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8), normalize]
        else:
            resize_to = round(input_size / CROP_FRACTION)
            steps = [
                A.SmallestMaxSize(max_size=resize_to),
                A.CenterCrop(height=input_size, width=input_size),
                normalize,
            ]
        self.pipeline = A.Compose(steps)

    @property
    def decode_size(self) -> int:
        """The shorter side the decoder may reduce a JPEG to without losing resolution."""
        return self.input_size if self.train else round(self.input_size / CROP_FRACTION)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        if self.backend == "albumentations":
            if rng is not None:
                self.pipeline.set_random_seed(int(rng.integers(2**31)))
            return to_chw_tensor(self.pipeline(image=image)["image"])
        rng = rng if rng is not None else np.random.default_rng()
        height, width = image.shape[:2]
        x0, y0, x1, y1 = self.crop_box(width, height, rng)
        crop = image[int(y0) : max(round(y1), int(y0) + 1), int(x0) : max(round(x1), int(x0) + 1)]
        return self.finish(crop, rng)

    # ----------------------------------------------------------------- fast backend
    def crop_box(self, width: int, height: int, rng: np.random.Generator, within: Box | None = None) -> Box:
        """The region of a ``width`` x ``height`` image (optionally inside ``within``) that becomes the
        output: a random resized crop when training, the centre ρ/0.875 crop when evaluating."""
        bx0, by0, bx1, by1 = within if within is not None else (0.0, 0.0, float(width), float(height))
        w, h = bx1 - bx0, by1 - by0
        if not self.train:
            side = min(w, h) * CROP_FRACTION
            return (bx0 + (w - side) / 2, by0 + (h - side) / 2, bx0 + (w + side) / 2, by0 + (h + side) / 2)
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):  # the sampling of Inception's random-sized crop
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                return (bx0 + x, by0 + y, bx0 + x + cw, by0 + y + ch)
        aspect = w / h  # fallback: the largest centred crop within the allowed ratios
        if aspect < self.ratio[0]:
            cw, ch = w, w / self.ratio[0]
        elif aspect > self.ratio[1]:
            cw, ch = h * self.ratio[1], h
        else:
            cw, ch = w, h
        return (bx0 + (w - cw) / 2, by0 + (h - ch) / 2, bx0 + (w + cw) / 2, by0 + (h + ch) / 2)

    def finish(self, crop: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Resize a crop (from ``crop_box``) to ρ x ρ, then flip, jitter (train) and normalise."""
        rng = rng if rng is not None else np.random.default_rng()
        size = self.input_size
        shrink = min(crop.shape[0], crop.shape[1]) / size
        interpolation = cv2.INTER_AREA if shrink > 2 else cv2.INTER_LINEAR
        image = cv2.resize(crop, (size, size), interpolation=interpolation)  # OpenCV reads the view
        if self.train:
            if self.hflip and rng.random() < 0.5:
                image = cv2.flip(image, 1)
            if rng.random() < 0.8:
                image = self._jitter(image, rng)
        # transposing the uint8 pixels first keeps the float passes on contiguous memory (~3x faster)
        return to_chw_tensor(image).to(torch.float32).mul_(self._norm_scale).sub_(self._norm_shift)

    @staticmethod
    def _jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
        brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
        # Brightness, contrast around the mean grey and saturation towards the grey are each affine in
        # RGB, so their composition is one 3x4 colour matrix: a single saturating pass over the pixels.
        grey = np.asarray(GREY_WEIGHTS, dtype=np.float64)
        mean_grey = float(grey @ np.asarray(cv2.mean(image)[:3]))
        towards_grey = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), grey)
        matrix = np.empty((3, 4))
        matrix[:, :3] = brightness * contrast * towards_grey
        matrix[:, 3] = (1 - contrast) * brightness * mean_grey
        return cv2.transform(image, matrix)


# --------------------------------------------------------------------------- detection
#: SSD's sampler (Liu et al. 2016): keep the whole image, or a crop whose IoU with some box is at least one
#: of these.
SSD_CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9)


def ssd_random_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    min_ious: Sequence[float | None] = SSD_CROP_MIN_IOUS,
    scale: tuple[float, float] = (0.3, 1.0),
    aspect: tuple[float, float] = (0.5, 2.0),
    trials: int = 50,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSD's random crop with minimum-IoU constraints on (H, W, C) ``image`` and xyxy pixel ``boxes``.

    A crop is accepted when its IoU with at least one box reaches the drawn minimum and at least one box
    centre lies inside it; boxes whose centre leaves the crop are dropped, the others clipped to it.
    Images without boxes are returned unchanged.
    """
    if len(boxes) == 0:
        return image, boxes, labels
    height, width = image.shape[:2]
    for _ in range(8):
        min_iou = min_ious[int(rng.integers(len(min_ious)))]
        if min_iou is None:
            return image, boxes, labels
        for _ in range(trials):
            w = width * rng.uniform(*scale)
            h = height * rng.uniform(*scale)
            if not aspect[0] <= w / h <= aspect[1]:
                continue
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            crop = np.array([x0, y0, x0 + w, y0 + h])
            inter_wh = np.clip(
                np.minimum(boxes[:, 2:], crop[2:]) - np.maximum(boxes[:, :2], crop[:2]), 0, None
            )
            inter = inter_wh[:, 0] * inter_wh[:, 1]
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            iou = inter / (areas + w * h - inter)
            if iou.max() < min_iou:
                continue
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = np.all((centres > crop[:2]) & (centres < crop[2:]), axis=1)
            if not inside.any():
                continue
            left, top = int(x0), int(y0)
            right, bottom = max(int(np.ceil(x0 + w)), left + 1), max(int(np.ceil(y0 + h)), top + 1)
            kept = boxes[inside].copy()
            kept[:, 0::2] = np.clip(kept[:, 0::2] - left, 0, right - left)
            kept[:, 1::2] = np.clip(kept[:, 1::2] - top, 0, bottom - top)
            return image[top:bottom, left:right], kept, labels[inside]
    return image, boxes, labels


class DetectionTransform:
    """Image (H, W, 3) uint8 + xyxy pixel boxes + labels → float (3, H', W') tensor in [0, 1] + boxes, labels.

    The detectors normalise and resize inside (torchvision's transform), so evaluation images pass through
    untouched and detections come back in original pixel coordinates. Training geometry lives here:

    - ``ssd``: photometric distortion, SSD random crop with minimum-IoU constraints, horizontal flip, resize
      to ``input_size`` x ``input_size``;
    - ``frcnn``: horizontal flip and scale jitter (shorter side drawn from ``input_size`` x ``jitter``,
      longer side at most ``max_size``);
    - ``none``: no augmentation.

    Boxes that leave the image or shrink under 1 px are dropped (albumentations' bbox filtering).
    """

    def __init__(
        self,
        kind: str,
        input_size: int,
        train: bool,
        max_size: int | None = None,
        jitter: Sequence[float] = (0.8, 0.9, 1.0, 1.1, 1.2),
        seed: int | None = None,
    ) -> None:
        if kind not in ("ssd", "frcnn", "none"):
            raise ValueError(f"detection augmentation must be 'ssd', 'frcnn' or 'none', got {kind!r}")
        self.kind = kind
        self.train = train and kind != "none"
        self.rng = np.random.default_rng(seed)
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_area=1.0, clip=True)
        steps: list = []
        if self.train and kind == "ssd":
            steps = [
                A.RandomBrightnessContrast(brightness_limit=0.125, contrast_limit=0.5, p=0.5),
                A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=30, val_shift_limit=0, p=0.5),
                A.HorizontalFlip(p=0.5),
                A.Resize(height=input_size, width=input_size),
            ]
        elif self.train:
            steps = [A.HorizontalFlip(p=0.5)]
        self.bbox_params = bbox_params
        self.jitter_sizes = sorted({max(round(input_size * j), 32) for j in jitter})
        self.max_size = max_size
        self.pipeline = A.Compose(steps, bbox_params=bbox_params) if steps else None

    def _scale_jitter(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Resize so the shorter side is a random jitter size, the longer side at most ``max_size``."""
        height, width = image.shape[:2]
        target = self.jitter_sizes[int(rng.integers(len(self.jitter_sizes)))]
        scale = target / min(height, width)
        if self.max_size:
            scale = min(scale, self.max_size / max(height, width))
        size = (max(round(height * scale), 1), max(round(width * scale), 1))
        resize = A.Compose([A.Resize(height=size[0], width=size[1])], bbox_params=self.bbox_params)
        out = resize(image=image, bboxes=boxes, labels=labels)
        return (
            out["image"],
            np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(out["labels"]),
        )

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With ``rng`` (a sample's own, from its seeded key) every random choice, albumentations' included,
        follows from it; without, from this transform's own generator."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        rng = rng if rng is not None else self.rng
        if self.train and self.kind == "ssd":
            image, boxes, labels = ssd_random_crop(image, boxes, labels, rng)
        elif self.train:
            image, boxes, labels = self._scale_jitter(image, boxes, labels, rng)
        if self.pipeline is not None:
            self.pipeline.set_random_seed(int(rng.integers(2**31)))
            out = self.pipeline(image=image, bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return tensor, torch.from_numpy(boxes), torch.from_numpy(labels)
