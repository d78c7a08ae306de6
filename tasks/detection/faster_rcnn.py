"""Faster R-CNN on MobileNet (the TF Object Detection API's MobileNet extractor), Table 13's rows.

The backbone up to the 11th pointwise conv (stride 16) feeds the RPN (grid anchors 0.25, 0.5, 1, 2 x 256 px,
ratios 1/2, 1, 2) and 14x14 RoIAlign; blocks 12 and 13 form the box head on each crop; 300 proposals. As in the
TF API's Faster R-CNN configs, both stages' localization losses weigh 2 against their classification losses and
crops take one bilinear sample per cell (``crop_and_resize``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.profile import Profile
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError
from mobilenets.tasks.detection.task import DetectionTask


# --------------------------------------------------------------------------- Faster R-CNN parts
class MobileNetRPNBackbone(nn.Module):
    """The backbone up to the 11th pointwise conv (stride 16), as torchvision's ``FasterRCNN`` wants it."""

    def __init__(self, body: MobileNetV1, tap: str = "block11") -> None:
        super().__init__()
        self.body = body
        self.tap_name = tap
        self.out_channels = body.tap(tap).channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.body.forward_taps(x, [self.tap_name])[self.tap_name])])


class MobileNetBoxHead(nn.Module):
    """Blocks 12 and 13 of the backbone run on each 14x14 RoI crop, then global average pooling."""

    def __init__(self, body: MobileNetV1, blocks: Sequence[str] = ("block12", "block13")) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[getattr(body.blocks, name) for name in blocks])
        self.out_channels = body.tap(blocks[-1]).channels

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(crops), 1).flatten(1)


class FasterRCNNDetection(DetectionTask):
    """Faster R-CNN on MobileNet (the TF Object Detection API's MobileNet extractor), Table 13's rows.

    Args:
        input_size: shorter image side (300 or 600 in the paper).
        max_size: longer side cap (default ``input_size`` x 1024 / 600, the TF config's ratio).
        num_proposals: RPN proposals kept after NMS, in training and at test time (300, the paper's).
        crop_size: RoIAlign output (14).
        anchor_scales / anchor_ratios: grid anchors, scales relative to a 256 px base.
        box_batch_size_per_image: RoIs sampled per image for the box head's loss.
        localization_loss_weight: weight of both stages' box-regression losses (2, the TF API's; with 1 a short
            fine-tune on generated shapes boxes them far more loosely: val AP75 0.08 against 0.31).
        sampling_ratio: bilinear samples per RoIAlign cell and side (1, as TF's ``crop_and_resize``; 2 makes a
            training step on CPU about 1.5x as costly: RoIAlign's backward pass dominates it).
    """

    def __init__(
        self,
        input_size: int = 600,
        max_size: int | None = None,
        num_proposals: int = 300,
        crop_size: int = 14,
        anchor_scales: list[float] | None = None,
        anchor_ratios: list[float] | None = None,
        box_batch_size_per_image: int = 64,
        localization_loss_weight: float = 2.0,
        sampling_ratio: int = 1,
        **kwargs: Any,
    ) -> None:
        if localization_loss_weight < 0:
            raise ValueError(f"localization_loss_weight must be >= 0, got {localization_loss_weight}")
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
        super().__init__(input_size=input_size, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        body = self.build_backbone(num_classes=0)
        backbone = MobileNetRPNBackbone(body)
        box_head = MobileNetBoxHead(body)
        scales = hp.anchor_scales or (0.25, 0.5, 1.0, 2.0)
        ratios = hp.anchor_ratios or (0.5, 1.0, 2.0)
        anchor_generator = AnchorGenerator(
            sizes=(tuple(int(256 * s) for s in scales),), aspect_ratios=(tuple(ratios),)
        )
        mean, std = self.normalization
        self.model = FasterRCNN(
            backbone,
            num_classes=None,
            min_size=hp.input_size,
            max_size=hp.max_size or round(hp.input_size * 1024 / 600),
            image_mean=list(mean),
            image_std=list(std),
            rpn_anchor_generator=anchor_generator,
            rpn_pre_nms_top_n_train=2000,
            rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_train=hp.num_proposals,
            rpn_post_nms_top_n_test=hp.num_proposals,
            box_roi_pool=MultiScaleRoIAlign(
                ["0"], output_size=hp.crop_size, sampling_ratio=hp.sampling_ratio
            ),
            box_head=box_head,
            box_predictor=FastRCNNPredictor(box_head.out_channels, hp.num_classes),
            box_score_thresh=hp.score_thresh,
            box_nms_thresh=hp.nms_thresh,
            box_detections_per_img=hp.detections_per_img,
            box_batch_size_per_image=hp.box_batch_size_per_image,
            _skip_resize=True,  # training images come scale-jittered from the Faster R-CNN pipeline
        )

    def weigh_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's losses with both stages' box regression weighted by ``localization_loss_weight``."""
        weight = self.hparams.localization_loss_weight
        return {k: v * weight if k in ("loss_box_reg", "loss_rpn_box_reg") else v for k, v in losses.items()}

    def table13_name(self) -> str:
        return f"Faster-RCNN {self.hparams.input_size}"

    def use_exported(self, path: str | Path) -> dict[str, str]:

        raise ExportMismatchError(
            f"{path}: Faster R-CNN cannot be served from an exported file (its proposal and RoI stages are "
            "not exported); predict with its .ckpt"
        )

    def profile(self) -> Profile:
        """As ``DetectionTask.profile`` with exactly ``num_proposals`` crops through the box head: the RPN's
        NMS is switched off while counting so a blank image still yields the paper's 300 proposals."""
        rpn = self.model.rpn
        saved = rpn.nms_thresh
        rpn.nms_thresh = 1.0
        try:
            return super().profile()
        finally:
            rpn.nms_thresh = saved
