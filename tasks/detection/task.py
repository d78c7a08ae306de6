"""What SSD and Faster R-CNN share (paper Table 13): the detector in ``self.model``, COCO mAP at each
validation and test epoch through ``coco_eval``, COCO results that carry the dataset's own category ids, and
predictions drawn as PNGs. The detectors themselves are ``ssd.SSDDetection`` and
``faster_rcnn.FasterRCNNDetection``."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.profile import Profile, count_mult_adds, count_parameters
from mobilenets.datasets.atomic import atomic_path
from mobilenets.tasks.base import BaseTask, Stage
from mobilenets.tasks.detection.coco_eval import (
    PAPER_TABLE13,
    evaluate_detections,
    format_result,
    write_results_json,
)
from mobilenets.tasks.distributed import gather_objects
from mobilenets.tasks.paper import PaperRow, paper_table
from mobilenets.tasks.prediction_files import merge_json_shards, merge_predict_shards, predict_output_path


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
        **kwargs: the backbone and optimisation options of ``BaseTask`` (short runs from scratch need
            ``precise_bn_batches``: precise batch-norm statistics run the detector's inference path, so the
            box head's norms see real proposals).
    """

    output_options = ("predictions_dir",)

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

    def paper_row(self) -> PaperRow | None:
        """Table 13's MobileNet row of this detector and input size, if the paper prints one."""
        name = f"{self.table13_name()} MobileNet"
        return next((row for row in paper_table(13) if row.model == name), None)

    def paper_figures(self) -> tuple[float, float] | None:
        hp = self.hparams
        row = self.paper_row()
        if row is None or hp.width_mult != row.width_mult or hp.num_classes != 91:
            return None
        return row.figures

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

    # ---------------------------------------------------------------- batch-norm statistics
    def batch_inputs(self, batch: Any) -> list[torch.Tensor]:
        """The images of a detection batch ``(images, targets)``."""
        return list(batch[0])

    def backbone_inputs(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The normalised, batched images the detector's own transform hands its backbone (whole images:
        Faster R-CNN's box-head blocks see them instead of proposal crops here)."""
        with torch.no_grad():
            return self.model.transform(inputs)[0].tensors

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
            losses = self.weigh_losses(self.model(images, clean))
            loss = sum(losses.values())
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
            return loss
        self.collect_detections(self.model(images), targets, stage)
        return None

    def weigh_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The detector's training losses as they are summed (weighted; unchanged here)."""
        return losses

    def collect_detections(
        self, detections: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, Any]], stage: Stage
    ) -> None:
        """Keep an evaluation batch's detections (original-image pixels) for the stage's COCO evaluation."""
        dataset = self._stage_dataset(stage)
        categories = getattr(dataset, "categories", None)
        image_ids = [t["image_id"] for t in targets]
        self._eval_results.setdefault(stage, []).extend(
            self.to_coco_results(detections, image_ids, categories)
        )
        self._eval_image_ids.setdefault(stage, []).extend(image_ids)

    def _stage_dataset(self, stage: str) -> Any:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0]
        return getattr(loaders, "dataset", None)

    def on_validation_epoch_start(self) -> None:
        self._eval_results["val"], self._eval_image_ids["val"] = [], []

    def on_test_epoch_start(self) -> None:
        self._eval_results["test"], self._eval_image_ids["test"] = [], []

    def on_validation_epoch_end(self) -> None:
        self._evaluate_stage("val")

    def on_test_epoch_end(self) -> None:
        result = self._evaluate_stage("test")
        if result is not None and self.trainer.is_global_zero:
            prof = self.profile()
            row = (self.table13_name(), prof.mult_adds / 1e9, prof.million_parameters)
            print(format_result(result, row, PAPER_TABLE13.get(self.table13_name())))

    def _evaluate_stage(self, stage: str) -> Any:
        # under DDP each process detected its share of the images: every process evaluates all of them
        gathered = gather_objects((self._eval_results.get(stage, []), self._eval_image_ids.get(stage, [])))
        dataset = self._stage_dataset(stage)
        # the results in the dataset's image order (stable: an image's detections keep theirs), as one process
        # lists them
        position = {image_id: n for n, image_id in enumerate(getattr(dataset, "image_ids", None) or [])}
        results = sorted(
            (r for part in gathered for r in part[0]),
            key=lambda r: position.get(r["image_id"], len(position)),
        )
        image_ids = sorted({i for part in gathered for i in part[1]})
        coco = getattr(dataset, "coco", None)
        if coco is None or not image_ids:
            return None
        result = evaluate_detections(coco.dataset, results, image_ids=image_ids)
        names = {"AP": "mAP", "AP50": "AP50", "AP75": "AP75", "AR100": "AR100"}
        for key, value in result.as_dict().items():
            if key in names:
                self.log(f"{stage}/{names[key]}", value, prog_bar=key in ("AP", "AP50"), sync_dist=False)
        log_dir = self.trainer.log_dir  # on every process: the log dir is agreed on by a broadcast
        if log_dir and self.trainer.is_global_zero and stage == "test":
            write_results_json(results, Path(log_dir) / f"{stage}_detections.json")
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
        images, infos = batch
        detections = self.predict_detections(images)
        self.write_detections(images, infos, detections)
        return detections

    def write_detections(
        self,
        images: Sequence[torch.Tensor],
        infos: Sequence[dict[str, Any]],
        detections: Sequence[dict[str, Any]],
    ) -> None:
        """Keep a predict batch's detections for ``detections.json`` and draw them on their ([0, 1]) images."""
        from PIL import Image, ImageDraw

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

    def on_predict_epoch_end(self) -> None:
        output = self._predict_dir() / "detections.json"
        shard = write_results_json(
            self._eval_results.get("predict", []), predict_output_path(self.trainer, output, output.name)
        )
        # DDP: one file from the processes' shards, in the folder's image order (image_id is the position)
        path = merge_predict_shards(
            self.trainer,
            shard,
            lambda shards, out: merge_json_shards(shards, out, order=itemgetter("image_id")),
        )
        print(f"wrote detections of the predict folder to {path} (drawn images beside it)")
