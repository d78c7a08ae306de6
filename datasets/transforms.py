"""The albumentations pipelines of the suite: the one module that knows the augmentation library."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

#: Inputs scaled to [-1, 1]: what timm's and Keras' MobileNet v1 ImageNet weights expect.
MINUS_ONE_ONE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
#: The eval pipeline resizes the shorter side to input_size / CROP_FRACTION, then centre-crops.
CROP_FRACTION = 0.875


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """A normalised float32 (H, W, C) array as a contiguous (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ClassificationTransform:
    """Image array (H, W, 3) uint8 → normalised (3, ρ, ρ) float tensor.

    Train: random resized crop to ρ, horizontal flip, light colour jitter.
    Eval: resize the shorter side to ρ / 0.875, centre crop ρ.
    """

    def __init__(
        self,
        input_size: int,
        train: bool,
        mean: Sequence[float] = MINUS_ONE_ONE[0],
        std: Sequence[float] = MINUS_ONE_ONE[1],
        hflip: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        self.input_size = input_size
        self.train = train
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

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return to_chw_tensor(self.pipeline(image=image)["image"])
