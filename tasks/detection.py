"""Object detection on the MobileNet backbone (paper Table 13) with torchvision's ``SSD`` and ``FasterRCNN``.

- ``SSDDetection``: SSD300 as the TF Object Detection API's ``ssd_mobilenet_v1_coco`` builds it — maps of
  the 11th (stride 16) and 13th (stride 32) pointwise convs, four extra layers (1x1 to d/2, 3x3 stride 2 to
  d; d = 512, 256, 256, 128, BN + ReLU6), six levels of TF-style anchors (scales 0.2..0.95, ratios 1, 2,
  1/2, 3, 1/3 plus the in-between scale; (0.1, 1), (s, 2), (s, 1/2) on the lowest level) and 1x1
  box predictors; matching at IoU 0.5 and 3:1 hard-negative mining are torchvision's.
- ``FasterRCNNDetection``: the backbone up to the 11th pointwise conv (stride 16) feeds the RPN (grid
  anchors 0.25, 0.5, 1, 2 x 256 px, ratios 1/2, 1, 2) and 14x14 RoIAlign; blocks 12 and 13 form the box
  head on each crop; 300 proposals.

Detections are in original-image pixels; ``to_coco_results`` turns them into COCO results that carry the
dataset's own category ids. Validation logs COCO mAP each epoch through ``detection_eval``.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDScoringHead
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image

from mobilenets.backbone.mobilenet import ConvBNAct, MobileNetV1
from mobilenets.backbone.profile import Profile, count_mult_adds, count_parameters
from mobilenets.datasets.atomic import atomic_path
from mobilenets.tasks.base import BaseTask, Stage
from mobilenets.tasks.detection_eval import PAPER_TABLE13, evaluate_detections, write_results_json

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
        maps = self.body.forward_taps(x, self.taps)
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


# --------------------------------------------------------------------------- tasks
class DetectionTask(BaseTask):
    """What SSD and Faster R-CNN share: the detector in ``self.model``, COCO mAP at each validation and test
    epoch, COCO results with the dataset's category ids, predictions drawn as PNGs.

    Args:
        num_classes: detector outputs including the background (91 = the TF API's COCO label map + 1, as in
            the paper; a dataset with K categories needs at least K + 1).
        class_names / category_ids: the dataset's categories by contiguous label (filled from the
            datamodule at fit time and saved in checkpoints; leave unset in configs).
        score_thresh, nms_thresh, detections_per_img: post-processing.
        predictions_dir: where ``predict`` writes PNGs and ``detections.json`` (default
            ``<default_root_dir>/predictions``).
        draw_score_thresh: detections below this score are not drawn (all are written to the JSON).
        recompute_bn_batches: before each validation during fit, re-estimate the batch-norm running
            statistics from this many training batches ("precise BN"; 0 = off). Short runs from scratch
            need it: their running averages lag far behind the quickly changing weights.
    """

    def __init__(
        self,
        num_classes: int = 91,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        score_thresh: float = 0.01,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        predictions_dir: str | None = None,
        draw_score_thresh: float = 0.3,
        recompute_bn_batches: int = 0,
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        super().__init__(**kwargs)
        self.model: nn.Module
        self._eval_results: dict[str, list[dict[str, Any]]] = {}
        self._eval_image_ids: dict[str, list[int]] = {}

    # the backbone lives inside the detector; BaseTask's freezing schedule reaches it here
    @property
    def backbone(self) -> MobileNetV1:  # type: ignore[override]
        return self.model.backbone.body

    def table13_name(self) -> str:
        raise NotImplementedError

    def paper_figures(self) -> tuple[float, float] | None:
        hp = self.hparams
        row = PAPER_TABLE13.get(self.table13_name())
        if row is None or hp.width_mult != 1.0 or hp.num_classes != 91:
            return None
        return row[1] * 1000, row[2]

    def profile_image(self) -> torch.Tensor:
        size = self.hparams.input_size
        return torch.zeros(3, size, size, device=self.device)

    def profile(self) -> Profile:
        """Mult-adds of convolutions and linear layers on one ``input_size`` x ``input_size`` image, and all
        parameters; resizing, anchors, box decoding, RoIAlign and NMS are not counted (no mult-adds of
        the paper's kind)."""
        return Profile(count_mult_adds(self.model, [self.profile_image()]), count_parameters(self))

    # ---------------------------------------------------------------- categories
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        categories = getattr(datamodule, "category_map", None) if datamodule is not None else None
        if categories is None:
            return
        if len(categories) + 1 > self.hparams.num_classes:
            raise ValueError(
                f"the dataset has {len(categories)} categories but the model's num_classes is "
                f"{self.hparams.num_classes}; it must be at least {len(categories) + 1} (background included)"
            )
        self.hparams.class_names = list(categories.names)
        self.hparams.category_ids = list(categories.category_ids)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("class_names", "category_ids"):
            if self.hparams.get(key) is None and saved.get(key) is not None:
                self.hparams[key] = saved[key]

    def category_id(self, label: int) -> int | None:
        ids = self.hparams.category_ids
        if ids is None:
            return label
        return ids[label - 1] if 1 <= label <= len(ids) else None

    def class_name(self, label: int) -> str:
        names = self.hparams.class_names
        return names[label - 1] if names and 1 <= label <= len(names) else f"class {label}"

    def to_coco_results(
        self, detections: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int], categories: Any = None
    ) -> list[dict[str, Any]]:
        """COCO results entries (``bbox`` as [x, y, w, h], the dataset's category ids). Labels of head
        outputs that no category uses (a 91-way head on 80 categories) are left out."""
        results = []
        for det, image_id in zip(detections, image_ids):
            boxes = det["boxes"].detach().cpu().tolist()
            scores = det["scores"].detach().cpu().tolist()
            labels = det["labels"].detach().cpu().tolist()
            for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
                if categories is not None:
                    cid = categories.category_ids[label - 1] if 1 <= label <= len(categories) else None
                else:
                    cid = self.category_id(label)
                if cid is None:
                    continue
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(cid),
                        "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                        "score": round(float(score), 5),
                    }
                )
        return results

    # ---------------------------------------------------------------- steps
    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> Any:
        return self.model(images, targets)

    def detect(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (original-image pixels, contiguous labels) of [0, 1] images of any size."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.model(list(images))
        self.train(was_training)
        return out

    def _shared_step(self, batch: Any, stage: Stage) -> torch.Tensor | None:
        images, targets = batch
        if stage == "train":
            clean = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            losses = self.model(images, clean)
            loss = sum(losses.values())
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
            return loss
        detections = self.model(images)
        dataset = self._stage_dataset(stage)
        categories = getattr(dataset, "categories", None)
        image_ids = [t["image_id"] for t in targets]
        self._eval_results.setdefault(stage, []).extend(
            self.to_coco_results(detections, image_ids, categories)
        )
        self._eval_image_ids.setdefault(stage, []).extend(image_ids)
        return None

    def _stage_dataset(self, stage: str) -> Any:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0]
        return getattr(loaders, "dataset", None)

    def on_validation_epoch_start(self) -> None:
        self._eval_results["val"], self._eval_image_ids["val"] = [], []
        if self.hparams.recompute_bn_batches > 0 and self.trainer.state.fn == "fit":
            self.recompute_batch_norm(self.trainer.train_dataloader, self.hparams.recompute_bn_batches)

    @torch.no_grad()
    def recompute_batch_norm(self, loader: Any, num_batches: int) -> None:
        """Replace every batch norm's running mean/var by the plain average over ``num_batches`` batches
        of ``loader`` (inference-mode forward, so the box head's norms see real proposals)."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or loader is None:
            return
        was_training = self.training
        saved = [m.momentum for m in norms]
        self.model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
            norm.train()
        for index, (images, _targets) in enumerate(loader):
            if index >= num_batches:
                break
            self.model([image.to(self.device) for image in images])
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        self.train(was_training)
        self.model.eval()

    def on_test_epoch_start(self) -> None:
        self._eval_results["test"], self._eval_image_ids["test"] = [], []

    def on_validation_epoch_end(self) -> None:
        self._evaluate_stage("val")

    def on_test_epoch_end(self) -> None:
        result = self._evaluate_stage("test")
        if result is not None and self.trainer.is_global_zero:
            from mobilenets.tasks.detection_eval import format_result

            prof = self.profile()
            row = (self.table13_name(), prof.mult_adds / 1e9, prof.million_parameters)
            print(format_result(result, row, PAPER_TABLE13.get(self.table13_name())))

    def _evaluate_stage(self, stage: str) -> Any:
        results = self._eval_results.get(stage, [])
        image_ids = self._eval_image_ids.get(stage, [])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (results, image_ids))
            results = [r for part in gathered for r in part[0]]
            image_ids = sorted({i for part in gathered for i in part[1]})
        dataset = self._stage_dataset(stage)
        coco = getattr(dataset, "coco", None)
        if coco is None or not image_ids:
            return None
        result = evaluate_detections(coco.dataset, results, image_ids=image_ids)
        names = {"AP": "mAP", "AP50": "AP50", "AP75": "AP75", "AR100": "AR100"}
        for key, value in result.as_dict().items():
            if key in names:
                self.log(f"{stage}/{names[key]}", value, prog_bar=key in ("AP", "AP50"), sync_dist=False)
        if self.trainer.log_dir and self.trainer.is_global_zero and stage == "test":
            write_results_json(results, Path(self.trainer.log_dir) / f"{stage}_detections.json")
        return result

    # ---------------------------------------------------------------- predict
    def _predict_dir(self) -> Path:
        if self.hparams.predictions_dir:
            return Path(self.hparams.predictions_dir)
        return Path(self.trainer.default_root_dir) / "predictions"

    def on_predict_epoch_start(self) -> None:
        self._eval_results["predict"] = []

    def predict_detections(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections of a predict batch ([0, 1] images of any size): the PyTorch detector, or the export
        attached by ``use_exported`` (SSD only)."""
        return self.model(images)

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        from PIL import Image, ImageDraw

        images, infos = batch
        detections = self.predict_detections(images)
        out_dir = self._predict_dir()
        for image, info, det in zip(images, infos, detections):
            self._eval_results["predict"] += [
                {**entry, "file_name": Path(info["path"]).name}
                for entry in self.to_coco_results([det], [info["image_id"]])
            ]
            array = (image.detach().cpu().clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            canvas = Image.fromarray(array)
            draw = ImageDraw.Draw(canvas)
            for box, score, label in zip(
                det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()
            ):
                if score < self.hparams.draw_score_thresh:
                    continue
                draw.rectangle(box, outline=(255, 40, 40), width=2)
                text = f"{self.class_name(label)} {score:.2f}"
                draw.text((box[0] + 2, max(box[1] - 11, 0)), text, fill=(255, 255, 0))
            with atomic_path(out_dir / f"{Path(info['path']).stem}_detections.png", ".png") as temp:
                canvas.save(temp, format="PNG")
        return detections

    def on_predict_epoch_end(self) -> None:
        path = write_results_json(
            self._eval_results.get("predict", []), self._predict_dir() / "detections.json"
        )
        print(f"wrote detections of the predict folder to {path} (drawn images beside it)")


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

    def adopt_export(self, path: Path, metadata: dict[str, str], network: nn.Module) -> None:
        """The export's anchors and classes must be this config's; its categories and post-processing
        settings are adopted (as ``--ckpt_path`` adopts a checkpoint's)."""
        from mobilenets.tasks.export import parse_name_list
        from mobilenets.tasks.onnx_network import ExportMismatchError

        hp = self.hparams
        anchors = self.anchors()
        scales = metadata.get("anchor_scales", "")
        try:
            found_scales: Any = tuple(float(v) for v in scales.split(","))
        except ValueError:
            found_scales = scales
        checks: dict[str, tuple[Any, Any]] = {
            "metadata key 'num_anchors'": (str(anchors.shape[0]), metadata.get("num_anchors", "").strip()),
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
                "score_thresh": float(metadata.get("score_thresh", hp.score_thresh)),
                "nms_thresh": float(metadata.get("nms_thresh", hp.nms_thresh)),
                "topk_candidates": int(metadata.get("topk_candidates", hp.topk_candidates)),
                "detections_per_img": int(metadata.get("detections_per_img", hp.detections_per_img)),
            }
        except ValueError as error:
            raise ExportMismatchError(f"{path}: post-processing metadata is not numeric ({error})") from error
        hp.update(settings)
        if metadata.get("class_names"):
            hp.class_names = parse_name_list(metadata["class_names"])
        if metadata.get("category_ids"):
            try:
                hp.category_ids = [int(v) for v in metadata["category_ids"].split(",")]
            except ValueError as error:
                raise ExportMismatchError(
                    f"{path}: metadata key 'category_ids': expected comma-separated integers"
                ) from error
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

    def export_metadata(self) -> dict[str, str]:
        hp = self.hparams
        meta = super().export_metadata()
        meta.update(
            {
                "outputs": "box_deltas (N,A,4), class_logits (N,A,C): decode with ssd_postprocess",
                "num_anchors": str(self.anchors().shape[0]),
                "anchor_scales": f"{hp.min_scale},{hp.max_scale}",
                "box_coder_weights": ",".join(map(str, SSD_BOX_CODER_WEIGHTS)),
                "score_thresh": str(hp.score_thresh),
                "nms_thresh": str(hp.nms_thresh),
                "topk_candidates": str(hp.topk_candidates),
                "detections_per_img": str(hp.detections_per_img),
            }
        )
        if hp.class_names:
            meta["class_names"] = ",".join(hp.class_names)
        if hp.category_ids:
            meta["category_ids"] = ",".join(map(str, hp.category_ids))
        return meta


class FasterRCNNDetection(DetectionTask):
    """Faster R-CNN on MobileNet (the TF Object Detection API's MobileNet extractor), Table 13's rows.

    Args:
        input_size: shorter image side (300 or 600 in the paper).
        max_size: longer side cap (default ``input_size`` x 1024 / 600, the TF config's ratio).
        num_proposals: RPN proposals kept after NMS, in training and at test time (300, the paper's).
        crop_size: RoIAlign output (14).
        anchor_scales / anchor_ratios: grid anchors, scales relative to a 256 px base.
        box_batch_size_per_image: RoIs sampled per image for the box head's loss.
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
        **kwargs: Any,
    ) -> None:
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
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=hp.crop_size, sampling_ratio=2),
            box_head=box_head,
            box_predictor=FastRCNNPredictor(box_head.out_channels, hp.num_classes),
            box_score_thresh=hp.score_thresh,
            box_nms_thresh=hp.nms_thresh,
            box_detections_per_img=hp.detections_per_img,
            box_batch_size_per_image=hp.box_batch_size_per_image,
            _skip_resize=True,  # training images come scale-jittered from the Faster R-CNN pipeline
        )

    def table13_name(self) -> str:
        return f"Faster-RCNN {self.hparams.input_size}"

    def use_exported(self, path: str | Path) -> dict[str, str]:
        from mobilenets.tasks.onnx_network import ExportMismatchError

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


# --------------------------------------------------------------------------- demo
def run_demo(root: Path, quick: bool) -> list[Any]:
    """Shapes in COCO format → SSD (α 0.25, small input) trained briefly → ``detect-eval`` on the val split."""
    import yaml

    from mobilenets.datasets.synthetic_detection import make_shapes_coco
    from mobilenets.tasks.cli import lightning_cli
    from mobilenets.tasks.demo import DemoRow
    from mobilenets.tasks.detection_eval import main as detect_eval_main

    root = Path(root)
    n_train, n_val, size, epochs, batch = (24, 8, 64, 8, 8) if quick else (320, 64, 128, 40, 16)
    data_root = root / "shapes"
    if not (data_root / "annotations" / "instances_val.json").is_file():
        make_shapes_coco(data_root, {"train": n_train, "val": n_val}, size_range=(size, int(size * 1.4)))
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "mobilenets.tasks.detection.SSDDetection",
            "init_args": {
                "width_mult": 0.25,
                "input_size": size,
                "num_classes": 4,
                "optimizer": "adamw",
                "lr": 0.003,
                "weight_decay": 0.0,
                "scheduler": "cosine",
                "warmup_epochs": 1,
                "recompute_bn_batches": 4,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.coco.CocoDataModule",
            "init_args": {
                "root": str(data_root),
                "train_split": "train",
                "val_split": "val",
                "input_size": size,
                "batch_size": batch,
                "num_workers": 0,
                "predict_dir": str(data_root / "val"),
            },
        },
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(root / "run"),
            "check_val_every_n_epoch": max(epochs // 4, 1),
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 5,
            "enable_progress_bar": not quick,
        },
    }
    config_path = root / "ssd_shapes.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = lightning_cli({"fit": config})
    ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    out_dir = root / "detect_eval"
    detect_eval_main(["--config", str(config_path), "--ckpt_path", str(ckpt), "--out", str(out_dir)])
    stats = json.loads((out_dir / "coco_eval.json").read_text())
    rows = [
        DemoRow("detection", f"SSD α0.25-{size} shapes val AP", f"{100 * stats['AP']:.1f}%", "19.3% (COCO)"),
        DemoRow("detection", f"SSD α0.25-{size} shapes val AP50", f"{100 * stats['AP50']:.1f}%"),
    ]
    if not quick:
        prof = SSDDetection(num_classes=91).profile()
        rows.append(
            DemoRow(
                "detection",
                "SSD300 MAdds / params",
                f"{prof.mult_adds / 1e9:.2f}B / {prof.million_parameters:.2f}M",
                "1.2B / 6.8M",
            )
        )
    return rows
