"""SSD300 on MobileNet as the TF Object Detection API's ``ssd_mobilenet_v1_coco`` builds it (Table 13).

Maps of the 11th (stride 16) and 13th (stride 32) pointwise convs, four extra layers (1x1 to d/2, 3x3 stride 2
to d; d = 512, 256, 256, 128, BN + ReLU6), six levels of TF-style anchors (scales 0.2..0.95, ratios 1, 2, 1/2,
3, 1/3 plus the in-between scale; (0.1, 1), (s, 2), (s, 1/2) on the lowest level) and 1x1 box predictors;
matching at IoU 0.5 and 3:1 hard-negative mining are torchvision's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDScoringHead
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from mobilenets.backbone.mobilenet import ConvBNAct, MobileNetV1
from mobilenets.tasks.base import Stage, TaskHead
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError
from mobilenets.tasks.detection.task import DetectionTask

#: SSD's box coder weights (the TF API's box coder scales y, x = 10, h, w = 5).
SSD_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# --------------------------------------------------------------------------- SSD parts
class TFSSDAnchorGenerator(nn.Module):
    """The TF Object Detection API's ``create_ssd_anchors`` grid, with torchvision's anchor interface.

    Level ``k`` has scale ``s_k = min + (max - min) k / (L - 1)``; its boxes are ``(s_k, r)`` for each
    aspect ratio plus ``(sqrt(s_k s_{k+1}), 1)``; the lowest level has only ``(0.1, 1), (s_0, 2), (s_0, 1/2)``.
    A box ``(s, r)`` is ``s·sqrt(r)`` wide and ``s/sqrt(r)`` high relative to the image, centred on each cell.
    ``forward(image_list, feature_maps)`` returns xyxy pixel anchors per image, as torchvision's SSD expects.
    """

    def __init__(
        self,
        num_levels: int = 6,
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
        interpolated_scale_aspect_ratio: float = 1.0,
        reduce_boxes_in_lowest_layer: bool = True,
    ) -> None:
        super().__init__()
        scales = [min_scale + (max_scale - min_scale) * k / max(num_levels - 1, 1) for k in range(num_levels)]
        scales.append(1.0)
        self.scales = scales
        self.box_specs: list[list[tuple[float, float]]] = []
        for k in range(num_levels):
            if k == 0 and reduce_boxes_in_lowest_layer:
                specs = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
            else:
                specs = [(scales[k], float(r)) for r in aspect_ratios]
                specs.append((math.sqrt(scales[k] * scales[k + 1]), interpolated_scale_aspect_ratio))
            self.box_specs.append(specs)
        # torchvision's SSD checks len(aspect_ratios) against the number of feature maps.
        self.aspect_ratios = [[r for _, r in specs] for specs in self.box_specs]

    def num_anchors_per_location(self) -> list[int]:
        return [len(specs) for specs in self.box_specs]

    def grid_anchors(
        self,
        grid_sizes: Sequence[Sequence[int]],
        image_size: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """All anchors (xyxy pixels) for feature maps of ``grid_sizes`` on an image of ``image_size`` (H, W),
        ordered level, row, column, box: the order of torchvision's SSD head outputs."""
        height, width = float(image_size[0]), float(image_size[1])
        levels = []
        for (rows, cols), specs in zip(grid_sizes, self.box_specs):
            cy = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows * height
            cx = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols * width
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            wh = torch.tensor(
                [(s * math.sqrt(r) * width, s / math.sqrt(r) * height) for s, r in specs], dtype=torch.float64
            )
            centres = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2)
            boxes = torch.cat((centres - wh / 2, centres + wh / 2), dim=-1)
            levels.append(boxes.reshape(-1, 4))
        return torch.cat(levels).to(dtype)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        anchors = self.grid_anchors(grid_sizes, image_list.tensors.shape[-2:], feature_maps[0].dtype)
        anchors = anchors.to(feature_maps[0].device)
        return [anchors for _ in image_list.image_sizes]


class SSDFeatureMaps(nn.Module):
    """Backbone taps plus SSD's extra layers; returns the ``OrderedDict`` of maps torchvision's SSD needs.

    Extra layer ``i``: 1x1 conv to ``d_i/2`` then 3x3 stride-2 conv to ``d_i``, each with BN and ReLU6;
    depths scale with α as the backbone's (``max(int(d·α), min_depth)``, TF's ``depth_fn``).
    """

    def __init__(
        self,
        body: MobileNetV1,
        taps: Sequence[str] = ("block11", "block13"),
        extra_depths: Sequence[int] = (512, 256, 256, 128),
        min_depth: int = 16,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.body = body
        self.taps = list(taps)
        alpha = body.width_mult
        channels = body.tap(self.taps[-1]).channels
        self.out_channels = [body.tap(name).channels for name in self.taps]
        extras = []
        for depth in extra_depths:
            middle = max(int(depth / 2 * alpha), min_depth)
            out = max(int(depth * alpha), min_depth)
            extras.append(
                nn.Sequential(
                    ConvBNAct(channels, middle, 1, activation="relu6", padding=body.padding, bn_eps=bn_eps),
                    ConvBNAct(middle, out, 3, 2, activation="relu6", padding=body.padding, bn_eps=bn_eps),
                )
            )
            self.out_channels.append(out)
            channels = out
        self.extras = nn.ModuleList(extras)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.from_taps(self.body.forward_taps(x, self.taps))

    def from_taps(self, taps: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The maps SSD predicts from, given the body's ``taps`` (a shared backbone computed them)."""
        maps = OrderedDict((name, taps[name]) for name in self.taps)
        y = maps[self.taps[-1]]
        for index, extra in enumerate(self.extras):
            y = extra(y)
            maps[f"extra{index + 1}"] = y
        return maps


class SSDBoxPredictor(nn.Module):
    """Class and box convolutions per level (the TF config's 1x1 ``convolutional_box_predictor``), with
    torchvision's ``SSDHead`` outputs: ``bbox_regression`` (N, A, 4) and ``cls_logits`` (N, A, C)."""

    def __init__(
        self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int, kernel_size: int = 1
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        cls = nn.ModuleList(
            nn.Conv2d(c, a * num_classes, kernel_size, padding=pad) for c, a in zip(in_channels, num_anchors)
        )
        reg = nn.ModuleList(
            nn.Conv2d(c, a * 4, kernel_size, padding=pad) for c, a in zip(in_channels, num_anchors)
        )
        for conv in [*cls, *reg]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        # Start every anchor at 99% background (the focal-loss paper's prior) so the first steps are not
        # spent unlearning a uniform class distribution over ~2k anchors.
        background_bias = math.log(0.99 * max(num_classes - 1, 1) / 0.01)
        for conv, anchors in zip(cls, num_anchors):
            conv.bias.data.view(anchors, num_classes)[:, 0] = background_bias
        self.classification_head = SSDScoringHead(cls, num_classes)
        self.regression_head = SSDScoringHead(reg, 4)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bbox_regression": self.regression_head(x), "cls_logits": self.classification_head(x)}


class SSDRawOutputs(nn.Module):
    """The exportable SSD: a normalised (N, 3, S, S) batch in, ``(box deltas (N, A, 4), class logits
    (N, A, C))`` out, before decoding and NMS (``ssd_postprocess`` finishes the job)."""

    def __init__(self, features: SSDFeatureMaps, head: SSDBoxPredictor) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(list(self.features(x).values()))
        return out["bbox_regression"], out["cls_logits"]


def ssd_preprocess(
    images: Sequence[torch.Tensor], size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[0, 1] images of any size → the normalised (N, 3, size, size) batch torchvision's SSD transform makes."""
    mean_t = torch.as_tensor(mean, dtype=images[0].dtype, device=images[0].device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=images[0].dtype, device=images[0].device)[:, None, None]
    batch = [
        F.interpolate(
            ((img - mean_t) / std_t)[None], size=(size, size), mode="bilinear", align_corners=False
        )[0]
        for img in images
    ]
    return torch.stack(batch)


def ssd_postprocess(
    raw_boxes: torch.Tensor,
    raw_scores: torch.Tensor,
    anchors: torch.Tensor,
    image_size: tuple[int, int],
    original_sizes: Sequence[tuple[int, int]] | None = None,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.6,
    topk_candidates: int = 100,
    detections_per_img: int = 100,
    box_coder_weights: tuple[float, float, float, float] = SSD_BOX_CODER_WEIGHTS,
) -> list[dict[str, torch.Tensor]]:
    """torchvision SSD's post-processing as a pure function, for exported networks.

    ``raw_boxes`` (N, A, 4) deltas and ``raw_scores`` (N, A, C) logits from ``SSDRawOutputs``; ``anchors``
    (A, 4) xyxy at ``image_size`` (H, W) = the network input. Per class: softmax score above
    ``score_thresh``, top ``topk_candidates``; then class-wise NMS, the best ``detections_per_img``, and
    boxes rescaled to ``original_sizes`` (H, W) when given. Returns torchvision's detection dicts.
    """
    coder = det_utils.BoxCoder(weights=box_coder_weights)
    probabilities = F.softmax(raw_scores, dim=-1)
    num_classes = probabilities.shape[-1]
    detections = []
    for index, (deltas, scores) in enumerate(zip(raw_boxes, probabilities)):
        boxes = clip_boxes_to_image(coder.decode_single(deltas, anchors), image_size)
        image_boxes, image_scores, image_labels = [], [], []
        for label in range(1, num_classes):
            score = scores[:, label]
            keep = score > score_thresh
            score, box = score[keep], boxes[keep]
            score, order = score.topk(min(topk_candidates, score.numel()))
            image_boxes.append(box[order])
            image_scores.append(score)
            image_labels.append(torch.full_like(score, label, dtype=torch.int64))
        all_boxes = torch.cat(image_boxes)
        all_scores = torch.cat(image_scores)
        all_labels = torch.cat(image_labels)
        keep = batched_nms(all_boxes, all_scores, all_labels, nms_thresh)[:detections_per_img]
        result_boxes = all_boxes[keep]
        if original_sizes is not None:
            height, width = original_sizes[index]
            ratio = torch.tensor(
                [width / image_size[1], height / image_size[0]] * 2, dtype=torch.float32, device=boxes.device
            )
            result_boxes = result_boxes * ratio
        detections.append({"boxes": result_boxes, "scores": all_scores[keep], "labels": all_labels[keep]})
    return detections


class SSDDetection(DetectionTask):
    """SSD300 on MobileNet (``ssd_mobilenet_v1_coco`` of the TF Object Detection API), Table 13's SSD row.

    Args:
        input_size: the square input the images are resized to (300).
        min_scale / max_scale: anchor scales of the lowest and highest level.
        head_kernel_size: kernel of the box predictors (1 in the TF config; 3 is torchvision's SSD head).
        iou_thresh: IoU for an anchor to match a ground-truth box.
        neg_pos_ratio: hard-negative mining ratio.
        topk_candidates: best boxes per class kept before NMS.
        extra_depths: depths ``d`` of the four extra layers (1x1 to d/2, 3x3 stride 2 to d).
    """

    def __init__(
        self,
        input_size: int = 300,
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        head_kernel_size: int = 1,
        iou_thresh: float = 0.5,
        neg_pos_ratio: float = 3.0,
        topk_candidates: int = 100,
        extra_depths: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_size=input_size, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        body = self.build_backbone(num_classes=0)
        features = SSDFeatureMaps(
            body, extra_depths=hp.extra_depths or (512, 256, 256, 128), bn_eps=hp.bn_eps
        )
        anchors = TFSSDAnchorGenerator(len(features.out_channels), hp.min_scale, hp.max_scale)
        head = SSDBoxPredictor(
            features.out_channels, anchors.num_anchors_per_location(), hp.num_classes, hp.head_kernel_size
        )
        mean, std = self.normalization
        self.model = SSD(
            features,
            anchors,
            (hp.input_size, hp.input_size),
            hp.num_classes,
            image_mean=list(mean),
            image_std=list(std),
            head=head,
            score_thresh=hp.score_thresh,
            nms_thresh=hp.nms_thresh,
            detections_per_img=hp.detections_per_img,
            iou_thresh=hp.iou_thresh,
            topk_candidates=hp.topk_candidates,
            positive_fraction=1.0 / (1.0 + hp.neg_pos_ratio),
            _skip_resize=True,  # training images come resized from the SSD pipeline
        )

    def table13_name(self) -> str:
        return f"SSD {self.hparams.input_size}"

    def anchors(self) -> torch.Tensor:
        """The (A, 4) xyxy anchors at ``input_size`` that ``ssd_postprocess`` needs."""
        size = self.hparams.input_size
        features = self.model.backbone
        was_training = features.training
        features.eval()
        with torch.no_grad():
            maps = features(torch.zeros(1, 3, size, size))
        features.train(was_training)
        return self.model.anchor_generator.grid_anchors([m.shape[-2:] for m in maps.values()], (size, size))

    def export_module(self) -> nn.Module:
        return SSDRawOutputs(self.model.backbone, self.model.head).eval()

    # ---------------------------------------------------------------- head on a shared backbone
    def task_head(self) -> TaskHead:
        features, head = self.model.backbone, self.model.head

        def forward(maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = head(list(features.from_taps(maps).values()))
            return out["bbox_regression"], out["cls_logits"]

        return TaskHead(
            module=nn.ModuleDict({"extras": features.extras, "head": head}),
            taps=tuple(features.taps),
            forward=forward,
            output_names=("box_deltas", "class_logits"),
        )

    def _head_anchors(self, device: torch.device) -> torch.Tensor:
        anchors = getattr(self, "_shared_anchors", None)
        if anchors is None:
            anchors = self._shared_anchors = self.anchors()
        return anchors.to(device)

    def _decode(
        self, raw: tuple[torch.Tensor, torch.Tensor], sizes: Any = None
    ) -> list[dict[str, torch.Tensor]]:
        hp = self.hparams
        size = int(hp.input_size)
        return ssd_postprocess(
            raw[0],
            raw[1],
            self._head_anchors(raw[0].device),
            (size, size),
            original_sizes=sizes,
            score_thresh=hp.score_thresh,
            nms_thresh=hp.nms_thresh,
            topk_candidates=hp.topk_candidates,
            detections_per_img=hp.detections_per_img,
        )

    def head_step(
        self, batch: Any, raw: tuple[torch.Tensor, torch.Tensor], stage: Stage
    ) -> torch.Tensor | None:
        """SSD's loss (torchvision's matching and hard-negative mining) on the raw head outputs of a
        ``(images, targets)`` batch; in evaluation, the decoded detections for COCO mAP."""
        images, targets = batch
        if stage != "train":
            self.collect_detections(self._decode(raw, [tuple(i.shape[-2:]) for i in images]), targets, stage)
            return None
        anchors = self._head_anchors(raw[0].device)
        matched = []
        for target in targets:
            if target["boxes"].numel() == 0:
                matched.append(torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device))
            else:
                matched.append(self.model.proposal_matcher(box_iou(target["boxes"], anchors)))
        clean = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        outputs = {"bbox_regression": raw[0], "cls_logits": raw[1]}
        losses = self.model.compute_loss(clean, outputs, [anchors] * len(targets), matched)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(targets))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    #: images of the current predict that ``head_predict`` numbered (their COCO image ids)
    _head_predicted = 0

    def on_predict_epoch_start(self) -> None:
        super().on_predict_epoch_start()
        self._head_predicted = 0

    def head_predict(self, batch: dict[str, Any], raw: tuple[torch.Tensor, torch.Tensor]) -> Any:
        """Detections of a folder batch of normalised ``input_size`` images (a multi-task predict), drawn on
        those images and kept for ``detections.json`` (boxes in ``input_size`` pixels)."""
        mean, std = self.normalization
        images = batch["image"]
        mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
        std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
        start = self._head_predicted
        infos = [{"path": str(path), "image_id": start + n} for n, path in enumerate(batch["path"])]
        self._head_predicted = start + len(infos)
        detections = self._decode(raw)
        self.write_detections([image * std_t + mean_t for image in images], infos, detections)
        return detections

    def adopt_export(self, path: Path, metadata: ExportMetadata, network: nn.Module) -> None:
        """The export's anchors and classes must be this config's; its categories and post-processing
        settings are adopted (as ``--ckpt_path`` adopts a checkpoint's)."""

        hp = self.hparams
        properties = metadata.properties
        anchors = self.anchors()
        scales = properties.get("anchor_scales", "")
        try:
            found_scales: Any = tuple(float(v) for v in scales.split(","))
        except ValueError:
            found_scales = scales
        checks: dict[str, tuple[Any, Any]] = {
            "metadata key 'num_anchors'": (str(anchors.shape[0]), properties.get("num_anchors", "").strip()),
            "metadata key 'anchor_scales'": ((float(hp.min_scale), float(hp.max_scale)), found_scales),
        }
        shape = network.session.get_outputs()[-1].shape if hasattr(network, "session") else []
        if len(shape) == 3 and isinstance(shape[2], int):
            checks["num_classes (class logits per anchor)"] = (hp.num_classes, shape[2])
        for what, (expected, found) in checks.items():
            if expected != found:
                raise ExportMismatchError(
                    f"{path}: {what}: this config expects {expected}, the export has {found or 'none'}"
                )
        try:
            settings = {
                "score_thresh": float(properties.get("score_thresh", hp.score_thresh)),
                "nms_thresh": float(properties.get("nms_thresh", hp.nms_thresh)),
                "topk_candidates": int(properties.get("topk_candidates", hp.topk_candidates)),
                "detections_per_img": int(properties.get("detections_per_img", hp.detections_per_img)),
            }
        except ValueError as error:
            raise ExportMismatchError(f"{path}: post-processing metadata is not numeric ({error})") from error
        hp.update(settings)
        if metadata.class_names:
            hp.class_names = list(metadata.class_names)
        if metadata.category_ids:
            hp.category_ids = list(metadata.category_ids)
        self._export_anchors = anchors

    def predict_detections(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """With an export attached: torchvision's SSD pre-processing, the exported raw outputs, then
        ``ssd_postprocess`` with this task's anchors and settings (the PyTorch detector's detections)."""
        network = self.exported_network
        if network is None:
            return super().predict_detections(images)
        hp = self.hparams
        size = int(hp.input_size)
        mean, std = self.normalization
        raw_boxes, raw_scores = network(ssd_preprocess(images, size, mean, std))
        return ssd_postprocess(
            raw_boxes,
            raw_scores,
            self._export_anchors.to(raw_boxes.device),
            (size, size),
            original_sizes=[(int(image.shape[-2]), int(image.shape[-1])) for image in images],
            score_thresh=hp.score_thresh,
            nms_thresh=hp.nms_thresh,
            topk_candidates=hp.topk_candidates,
            detections_per_img=hp.detections_per_img,
        )

    def export_record(self) -> ExportMetadata:
        hp = self.hparams
        record = replace(
            super().export_record(),
            class_names=tuple(map(str, hp.class_names)) if hp.class_names else None,
            category_ids=tuple(map(int, hp.category_ids)) if hp.category_ids else None,
        )
        return record.with_properties(
            outputs="box_deltas (N,A,4), class_logits (N,A,C): decode with ssd_postprocess",
            num_anchors=str(self.anchors().shape[0]),
            anchor_scales=f"{hp.min_scale},{hp.max_scale}",
            box_coder_weights=",".join(map(str, SSD_BOX_CODER_WEIGHTS)),
            score_thresh=str(hp.score_thresh),
            nms_thresh=str(hp.nms_thresh),
            topk_candidates=str(hp.topk_candidates),
            detections_per_img=str(hp.detections_per_img),
        )
