"""MobileNet v1 (Howard et al. 2017, Table 1) with the paper's width/resolution multipliers and ablations.

Every task of the suite talks to the backbone through one contract:

- ``forward_features(x)`` returns the last feature map (stride 32);
- ``forward_taps(x, names)`` returns an ``OrderedDict`` of named intermediate maps;
- ``feature_info`` lists every tap with its channels and stride;
- ``forward_head(features, pre_logits=False)``, ``reset_classifier(n)``, ``num_classes=0`` for headless use;
- ``freeze(k)`` freezes the stem and the first ``k`` separable blocks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mobilenets.backbone.errors import MobilenetsError

Activation = Literal["relu", "relu6"]
Padding = Literal["torch", "tf"]

#: (pointwise output channels, depthwise stride) of the 13 separable blocks of Table 1.
#: The paper prints "s2" for block 13; every implementation (and the 7x7 avg pool) uses s1.
BLOCK_SPECS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
STEM_CHANNELS = 32
#: Blocks 7-11 (1-based): the five 14x14x512 separable layers that the "shallow" ablation removes (Table 5).
SHALLOW_REMOVED_BLOCKS = frozenset({7, 8, 9, 10, 11})
MIN_INPUT_SIZE = 32


def scaled_channels(channels: int, width_mult: float, min_channels: int = 8) -> int:
    """Channels of one layer under width multiplier α: ``max(int(c·α), 8)``, TF-slim's rule.

    TF-slim's ``mobilenet_v1.py`` computes ``depth(d) = max(int(d * depth_multiplier), min_depth)`` with
    ``min_depth = 8``; the Keras application uses ``int(filters * alpha)``, identical for the released α.
    """
    return max(int(channels * width_mult), min_channels)


@dataclass(frozen=True)
class FeatureTap:
    """One named intermediate output of the backbone."""

    name: str
    channels: int
    stride: int


class MobileNetConfigError(MobilenetsError, ValueError):
    """A backbone option outside what the model supports."""


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's "SAME" padding, computed from the actual input size.

    For stride 2 and an even input TF pads one pixel on the right/bottom only, which differs from PyTorch's
    symmetric padding and shifts every output of weights trained in TensorFlow.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBNAct(nn.Sequential):
    """Convolution (no bias), batch norm and ReLU/ReLU6: every layer of Table 1 but the classifier."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: Activation = "relu",
        padding: Padding = "torch",
        bn_eps: float = 1e-5,
    ) -> None:
        if padding == "tf":
            conv: nn.Conv2d = Conv2dSame(
                in_channels, out_channels, kernel_size, stride, groups=groups, bias=False
            )
        else:
            conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
            )
        act = nn.ReLU6(inplace=True) if activation == "relu6" else nn.ReLU(inplace=True)
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels, eps=bn_eps), act=act))


class SeparableBlock(nn.Sequential):
    """A depthwise-separable block: 3x3 depthwise conv + BN + act, then 1x1 pointwise conv + BN + act."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activation: Activation,
        padding: Padding,
        bn_eps: float,
    ) -> None:
        super().__init__(
            OrderedDict(
                dw=ConvBNAct(in_channels, in_channels, 3, stride, in_channels, activation, padding, bn_eps),
                pw=ConvBNAct(in_channels, out_channels, 1, 1, 1, activation, padding, bn_eps),
            )
        )


class FullConvBlock(nn.Sequential):
    """Table 4's "Conv MobileNet": one standard 3x3 convolution in place of a separable block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activation: Activation,
        padding: Padding,
        bn_eps: float,
    ) -> None:
        super().__init__(
            OrderedDict(conv=ConvBNAct(in_channels, out_channels, 3, stride, 1, activation, padding, bn_eps))
        )


class MobileNetV1(nn.Module):
    """MobileNet v1 of Table 1 with width multiplier α, the paper's ablations and a timm-style contract.

    Args:
        num_classes: classifier outputs; 0 builds a headless backbone (``forward`` returns pooled features).
        width_mult: α > 0; each layer has ``max(int(c·α), 8)`` channels.
        dropout: dropout before the classifier (Keras uses 1e-3).
        activation: ``relu`` as in the paper, or ``relu6`` as in the released TF/Keras weights.
        padding: ``torch`` (symmetric) or ``tf`` (TensorFlow "SAME", for weights trained in TF).
        bn_eps: batch-norm epsilon (1e-5 PyTorch/timm, 1e-3 Keras).
        full_conv: Table 4's "Conv MobileNet" ablation.
        shallow: Table 5's "Shallow MobileNet" ablation (blocks 7-11 removed).
        in_channels: channels of the input image.

    The resolution multiplier ρ is the input size: any square or rectangular input of at least 32 px works.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.001,
        activation: Activation = "relu",
        padding: Padding = "torch",
        bn_eps: float = 1e-5,
        full_conv: bool = False,
        shallow: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not (isinstance(width_mult, int | float) and math.isfinite(width_mult) and width_mult > 0):
            raise MobileNetConfigError(f"width_mult (α) must be a finite number > 0, got {width_mult!r}")
        if activation not in ("relu", "relu6"):
            raise MobileNetConfigError(f"activation must be 'relu' or 'relu6', got {activation!r}")
        if padding not in ("torch", "tf"):
            raise MobileNetConfigError(f"padding must be 'torch' or 'tf', got {padding!r}")
        if num_classes < 0:
            raise MobileNetConfigError(f"num_classes must be >= 0 (0 = headless), got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise MobileNetConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.width_mult = float(width_mult)
        self.activation = activation
        self.padding = padding
        self.full_conv = full_conv
        self.shallow = shallow

        stem_channels = scaled_channels(STEM_CHANNELS, width_mult)
        self.stem = ConvBNAct(in_channels, stem_channels, 3, 2, 1, activation, padding, bn_eps)
        block_cls = FullConvBlock if full_conv else SeparableBlock
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        taps = [FeatureTap("stem", stem_channels, 2)]
        channels, stride = stem_channels, 2
        for index, (out_base, block_stride) in enumerate(BLOCK_SPECS, start=1):
            if shallow and index in SHALLOW_REMOVED_BLOCKS:
                continue
            out_channels = scaled_channels(out_base, width_mult)
            blocks[f"block{index}"] = block_cls(
                channels, out_channels, block_stride, activation, padding, bn_eps
            )
            channels, stride = out_channels, stride * block_stride
            taps.append(FeatureTap(f"block{index}", channels, stride))
        self.blocks = nn.Sequential(blocks)
        self.feature_info: list[FeatureTap] = taps
        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.num_classes = num_classes
        self.classifier: nn.Module = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init by fan-in keeps activations alive through 13 blocks even in eval mode; fan-out
                # ignores groups, making depthwise filters √C times too small (activations ~1e-17 at block 13).
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- contract
    @property
    def tap_names(self) -> list[str]:
        return [tap.name for tap in self.feature_info]

    def tap(self, name: str) -> FeatureTap:
        """The tap called ``name`` (``stem`` or ``block1`` .. ``block13``)."""
        for tap in self.feature_info:
            if tap.name == name:
                return tap
        raise KeyError(f"no feature tap {name!r}; this backbone has {self.tap_names}")

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch of shape (N, C, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"input of {x.shape[-2]}x{x.shape[-1]} px is too small: MobileNet needs at least "
                f"{MIN_INPUT_SIZE} px on each side"
            )

    def forward_taps(self, x: torch.Tensor, names: Sequence[str]) -> OrderedDict[str, torch.Tensor]:
        """Run the body up to the deepest of ``names`` and return those maps in the order given."""
        self.check_input(x)
        wanted = set(names)
        unknown = wanted - set(self.tap_names)
        if unknown:
            raise KeyError(f"unknown feature taps {sorted(unknown)}; this backbone has {self.tap_names}")
        found: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        if "stem" in wanted:
            found["stem"] = x
        for name, block in self.blocks.named_children():
            if len(found) == len(wanted):
                break
            x = block(x)
            if name in wanted:
                found[name] = x
        return OrderedDict((name, found[name]) for name in names)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (stride 32, ``num_features`` channels)."""
        self.check_input(x)
        return self.blocks(self.stem(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.global_pool(features).flatten(1)
        if pre_logits:
            return pooled
        return self.classifier(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs (0 = none)."""
        if num_classes < 0:
            raise MobileNetConfigError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes)
            nn.init.normal_(self.classifier.weight, 0.0, 0.01)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()

    def body_modules(self) -> list[nn.Module]:
        """The stem then each block, in order: what ``freeze`` counts."""
        return [self.stem, *self.blocks.children()]

    def freeze(self, num_blocks: int | None = None) -> None:
        """Freeze the stem and the first ``num_blocks`` blocks (all of the body when None).

        Frozen layers stop receiving gradients and their batch norms keep their running statistics
        (they stay in eval mode even when the model is put in training mode).
        """
        modules = self.body_modules()
        count = len(modules) if num_blocks is None else num_blocks + 1
        if not 0 <= count <= len(modules):
            raise MobileNetConfigError(f"can freeze 0..{len(modules) - 1} blocks, got {num_blocks}")
        for index, module in enumerate(modules):
            frozen = index < count
            for param in module.parameters():
                param.requires_grad_(not frozen)
            module._frozen = frozen  # type: ignore[assignment]
        self.train(self.training)

    def unfreeze(self) -> None:
        for module in self.body_modules():
            for param in module.parameters():
                param.requires_grad_(True)
            module._frozen = False  # type: ignore[assignment]
        self.train(self.training)

    def train(self, mode: bool = True) -> MobileNetV1:
        super().train(mode)
        for module in self.body_modules():
            if getattr(module, "_frozen", False):
                module.eval()
        return self
