"""Face attributes (paper Table 12): a MobileNet with one logit per attribute, trained either on the
labels (the teacher) or by distillation, emulating a teacher's 40 attribute probabilities.

Distillation (the paper's footnote 2): the loss is the binary cross-entropy between the student's and the
teacher's probability of each attribute, averaged over the attributes; with ``label_weight`` λ > 0 the
ground-truth loss on labeled images is mixed in, ``(1 - λ)·distill + λ·labels``. The teacher runs once
over every image of the datamodule (labeled partitions and ``unlabeled_dirs``) and its probabilities are
cached on disk (``tasks/teacher.py``), so student epochs never run it again.

Metrics: mean average precision over the attributes (``val/mAP``, ``test/mAP``), the emulation quality
``<stage>/emulation_ce`` (the same cross-entropy, student vs teacher), and at the end of ``test`` a
per-attribute AP CSV and bar chart in the log dir plus Table 12's row printed beside ours.

``predict`` writes ``predictions.csv``: ``path``, the probability of each attribute (the columns of
``mobilenets onnx-predict``) and ``present_attributes``, the attributes at probability 0.5 or above.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision

from mobilenets.datasets.atomic import atomic_path, write_csv_atomic
from mobilenets.tasks.base import BaseTask, Stage, TaskHead
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError
from mobilenets.tasks.figures import pyplot, save_figure
from mobilenets.tasks.paper import TABLE12, PaperRow, mobilenet_row, table_row
from mobilenets.tasks.prediction_files import merge_predict_shards, multilabel_rows, predict_output_path
from mobilenets.tasks.teacher import (
    Teacher,
    TeacherCache,
    TeacherInputs,
    cached_teacher_outputs,
    teacher_cache_dir,
)

log = logging.getLogger(__name__)

TeacherMode = Literal["cached", "online"]

#: The paper's teacher ("baseline" of Table 12): not a MobileNet.
BASELINE_ROW = table_row(12, "Baseline (teacher)")
#: Views of Table 12 (``tasks/paper.py``) for the demo: (α, input size) → (mean AP %, million mult-adds,
#: million parameters), and the baseline's (mean AP %, million mult-adds, million parameters).
PAPER_TABLE12: dict[tuple[float, int], tuple[float, float, float]] = {
    (row.width_mult, row.input_size): (row.metric, *row.figures)  # type: ignore[misc]
    for row in TABLE12
    if row.width_mult is not None and row.input_size is not None and row.figures is not None
}
PAPER_BASELINE = (BASELINE_ROW.metric, *BASELINE_ROW.figures)  # type: ignore[misc]


class AttributeMeanAP(MultilabelAveragePrecision):
    """Per-attribute average precision; ``compute()`` is their mean over the attributes that have a
    positive example (an attribute absent from the evaluated images has no defined AP)."""

    def __init__(self, num_labels: int) -> None:
        super().__init__(num_labels=num_labels, average=None)
        self.add_state("positives", torch.zeros(num_labels), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds, target)
        self.positives = self.positives + (target == 1).sum(dim=0).to(self.positives)

    def per_attribute(self) -> torch.Tensor:
        """AP of each attribute (NaN where it has no positive example)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*No positive samples.*")
            ap = super().compute()
        return torch.where(self.positives > 0, ap, torch.full_like(ap, float("nan")))

    def compute(self) -> torch.Tensor:
        return torch.nanmean(self.per_attribute())


def emulation_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per-attribute binary cross-entropy of the student against the teacher's probabilities, averaged
    over attributes and images (the paper's distillation loss and its emulation quality)."""
    return F.binary_cross_entropy_with_logits(student_logits, teacher_probs)


class AttributeModel(BaseTask):
    """A MobileNet predicting ``num_attributes`` binary face attributes (CelebA's 40).

    Without ``teacher`` it trains on the labels (this is how the teacher config trains a large α/ρ model);
    with ``teacher`` it is a student that emulates the teacher's probabilities.

    Args:
        num_attributes: outputs (one logit per attribute).
        attribute_names: names for reports and export metadata (filled from the datamodule when None).
        teacher: a teacher file: a checkpoint of this task (``.ckpt``), TorchScript (``.pt``/``.ts``) or ONNX
            (``.onnx``) mapping an image batch to ``num_attributes`` logits. None: train on labels.
        label_weight: λ, the weight of the ground-truth loss mixed into the distillation loss on labeled
            images (0: pure distillation, as in the paper).
        teacher_mode: ``cached`` (the teacher runs once, its outputs memory-mapped from disk) or ``online``
            (the teacher runs on every batch; for comparison).
        teacher_input_size: the teacher's input resolution when its file does not say (TorchScript);
            default: what the file says, else this model's ``input_size``.
        teacher_cache_dir: where the teacher's cached outputs live (default ``<default_root_dir>/teacher_cache``).
        teacher_batch_size: images per teacher call while building the cache.
        predictions_file: CSV written by ``predict`` (default ``<log dir>/predictions.csv``; under DDP each
            process writes a ``.rank<N>`` shard, merged into this file at the end).
        **kwargs: the backbone and optimisation options of ``BaseTask``. Student configs set
            ``weight_decay: 0`` (the paper: distillation needs no regularisation).
    """

    output_options = ("predictions_file",)

    def __init__(
        self,
        num_attributes: int = 40,
        attribute_names: list[str] | None = None,
        teacher: str | None = None,
        label_weight: float = 0.0,
        teacher_mode: TeacherMode = "cached",
        teacher_input_size: int | None = None,
        teacher_cache_dir: str | None = None,
        teacher_batch_size: int = 64,
        predictions_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        if num_attributes < 1:
            raise ValueError(f"num_attributes must be >= 1, got {num_attributes}")
        if not 0.0 <= label_weight <= 1.0:
            raise ValueError(f"label_weight (λ) must be in [0, 1], got {label_weight}")
        if attribute_names is not None and len(attribute_names) != num_attributes:
            raise ValueError(
                f"attribute_names has {len(attribute_names)} names, num_attributes is {num_attributes}"
            )
        super().__init__(**kwargs)
        self.last_predictions_path: Path | None = None
        self._predict_paths: list[str] = []
        self._predict_logits: list[torch.Tensor] = []
        self.test_attribute_ap = AttributeMeanAP(num_attributes)
        # Not submodules: the teacher is neither trained, saved in our checkpoints nor profiled with us.
        self._teacher: Teacher | None = None
        self._teacher_cache: TeacherCache | None = None

    # ------------------------------------------------------------------ model
    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=self.hparams.num_attributes)

    #: mAP needs every image of a partition (and training batches mix in unlabeled images): val and test only
    metric_stages: tuple[Stage, ...] = ("val", "test")

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"mAP": AttributeMeanAP(self.hparams.num_attributes)})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    @property
    def attribute_names(self) -> list[str]:
        names = self.hparams.get("attribute_names")
        return list(names) if names else [f"attribute_{i}" for i in range(self.hparams.num_attributes)]

    def paper_row(self) -> PaperRow | None:
        """Table 12's row of this α and input size, if the paper prints one."""
        return mobilenet_row(12, self.hparams.width_mult, self.hparams.input_size)

    def paper_mean_ap(self) -> float | None:
        row = self.paper_row()
        return row.metric if row else None

    def export_module(self) -> nn.Module:
        return self.backbone

    def export_record(self) -> ExportMetadata:
        record = replace(super().export_record(), attribute_names=tuple(self.attribute_names))
        return record.with_properties(outputs="one logit per attribute (sigmoid gives its probability)")

    # ------------------------------------------------------------------ teacher
    @property
    def distilling(self) -> bool:
        return self.hparams.teacher is not None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "attribute_names", None)
        if names is not None:
            if len(names) != self.hparams.num_attributes:
                raise ValueError(
                    f"the data has {len(names)} attributes but the model has num_attributes="
                    f"{self.hparams.num_attributes}"
                )
            self.hparams.attribute_names = list(names)
        # predict needs neither the teacher nor its cache (a student checkpoint still names its teacher)
        if not self.distilling or stage == "predict":
            return
        teacher_path = Path(self.hparams.teacher)
        if stage != "fit" and not teacher_path.is_file():
            log.warning("%s: teacher not found; %s runs without the emulation metric", teacher_path, stage)
            return
        if datamodule is None or not hasattr(datamodule, "image_paths"):
            raise ValueError(
                "distillation needs a datamodule with image_paths and sample indices (CelebADataModule)"
            )
        if self._teacher is None:
            self._teacher = Teacher.load(teacher_path, expected_outputs=self.hparams.num_attributes)
        inputs = TeacherInputs.of(self._teacher, self.hparams.teacher_input_size, self)
        if self.hparams.teacher_mode == "online":
            datamodule.set_teacher_transform(inputs.transform())
            return
        if self._teacher_cache is not None:
            return
        workers = int(getattr(datamodule, "hparams", {}).get("num_workers", 0))
        self._teacher_cache = cached_teacher_outputs(
            self._teacher,
            datamodule.image_paths,
            inputs.key,
            inputs.batch(),
            teacher_cache_dir(self.hparams.teacher_cache_dir, self.trainer),
            batch_size=self.hparams.teacher_batch_size,
            activation="sigmoid",
            num_workers=workers,
            device=self.trainer.strategy.root_device,
        )
        # The outputs are on disk now; the teacher itself is no longer needed in memory.
        self._teacher.to("cpu")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._teacher is not None and self.hparams.teacher_mode == "online":
            self._teacher.to(self.device)

    def teacher_probabilities(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The teacher's probabilities for the batch's images: from the cache, or by running it online."""
        if self._teacher_cache is not None:
            rows = batch["index"].detach().cpu().numpy()
            return torch.from_numpy(np.asarray(self._teacher_cache.outputs[rows])).to(self.device)
        if self._teacher is not None and "teacher_image" in batch:
            return self._teacher(batch["teacher_image"]).sigmoid()
        return None

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: Stage) -> torch.Tensor:
        return self.head_step(batch, self(batch["image"]), stage)

    def task_head(self) -> TaskHead:
        return self.classifier_head("logits")

    def head_step(self, batch: dict[str, Any], logits: torch.Tensor, stage: Stage) -> torch.Tensor:
        labels = batch["labels"].float()
        labeled = torch.as_tensor(batch["labeled"], device=logits.device).bool()
        batch_size = len(logits)
        has_labels = bool(labeled.any())
        teacher_probs = self.teacher_probabilities(batch) if self.distilling else None
        weight = self.hparams.label_weight
        label_loss = None
        if has_labels and (teacher_probs is None or weight > 0):
            label_loss = F.binary_cross_entropy_with_logits(logits[labeled], labels[labeled])
        if teacher_probs is not None:
            distill_loss = emulation_cross_entropy(logits, teacher_probs)
            self.log(
                f"{stage}/emulation_ce",
                distill_loss,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=stage != "train",
            )
            loss = distill_loss if label_loss is None else (1 - weight) * distill_loss + weight * label_loss
        elif label_loss is not None:
            loss = label_loss
        else:  # a batch of unlabeled images and no teacher: nothing to learn from
            loss = logits.sum() * 0.0
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=True,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=stage != "train",  # DDP: averaged over the processes' shares of the images
        )
        if stage != "train" and has_labels:
            probs, target = logits[labeled].sigmoid(), labels[labeled].long()
            self.log_metrics(stage, probs, target, int(labeled.sum()))
            if stage == "test":
                self.test_attribute_ap.update(probs, target)
        return loss

    def adopt_export(self, path: Path, metadata: ExportMetadata, network: nn.Module) -> None:
        """Take the export's attribute names; its attribute count must be this config's."""

        names = list(metadata.attribute_names or ())
        if not names:
            return
        if len(names) != self.hparams.num_attributes:
            raise ExportMismatchError(
                f"{path}: metadata key 'attributes': this config expects {self.hparams.num_attributes} "
                f"attributes (num_attributes), the export has {len(names)}"
            )
        self.hparams.attribute_names = names

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._predict_paths, self._predict_logits = [], []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.head_predict(batch, self.predict_network(batch["image"]))

    def head_predict(self, batch: dict[str, Any], logits: torch.Tensor) -> dict[str, Any]:
        self._predict_paths += [str(p) for p in batch["path"]]
        self._predict_logits.append(logits.detach().float().cpu())
        return {"path": batch["path"], "probabilities": logits.sigmoid()}

    def on_predict_epoch_end(self) -> None:
        count = self.hparams.num_attributes
        logits = torch.cat(self._predict_logits) if self._predict_logits else torch.zeros(0, count)
        rows = multilabel_rows(self._predict_paths, logits.numpy(), self.attribute_names, present_column=True)
        path = predict_output_path(self.trainer, self.hparams.get("predictions_file"), "predictions.csv")
        write_csv_atomic(path, rows)
        path = merge_predict_shards(self.trainer, path)  # DDP: the processes' shards become one file
        self.last_predictions_path = path
        self._predict_paths, self._predict_logits = [], []
        print(f"wrote {count} attribute probabilities of {len(rows) - 1} images to {path}")

    # ------------------------------------------------------------------ test report
    def on_test_epoch_end(self) -> None:
        with self.test_attribute_ap.sync_context():  # DDP: over every process's images (unsynced after)
            per_attribute = self.test_attribute_ap.per_attribute().cpu()
            positives = self.test_attribute_ap.positives.cpu()
        self.test_attribute_ap.reset()
        # on every process: the log dir is agreed on by a broadcast
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        write_attribute_ap(out_dir, self.attribute_names, per_attribute, positives)
        print(self.format_table12(float(torch.nanmean(per_attribute))))

    def format_table12(self, mean_ap: float) -> str:
        """Our row of Table 12 beside the paper's (mean AP, million mult-adds, million parameters)."""
        hp = self.hparams
        profile = self.profile()
        name = f"{hp.width_mult:g} MobileNet-{hp.input_size}" + (
            " (distilled)" if self.distilling else " (labels)"
        )
        lines = [
            "Table 12: face attributes",
            f"{'model':<34}{'mean AP':>9}{'M mult-adds':>13}{'M params':>10}",
            f"{'ours: ' + name:<34}{mean_ap:>8.1%}{profile.million_mult_adds:>13.1f}"
            f"{profile.million_parameters:>10.2f}",
        ]
        row = self.paper_row()
        if row and row.figures:
            paper_madds, paper_params = row.figures
            mult_adds_diff = (profile.million_mult_adds - paper_madds) / paper_madds
            params_diff = (profile.million_parameters - paper_params) / paper_params
            lines.append(
                f"{'paper: ' + f'{hp.width_mult:g} MobileNet-{hp.input_size}':<34}{row.metric:>8.1f}%"
                f"{paper_madds:>13.0f}{paper_params:>10.1f}"
            )
            lines.append(
                f"{'difference (ours vs paper)':<34}{'':>9}{mult_adds_diff:>+13.1%}{params_diff:>+10.1%}"
            )
        baseline_madds, baseline_params = BASELINE_ROW.figures or (math.nan, math.nan)
        lines.append(
            f"{'paper: baseline (teacher)':<34}{BASELINE_ROW.metric:>8.1f}%{baseline_madds:>13.0f}"
            f"{baseline_params:>10.1f}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- report files
def write_attribute_ap(
    out_dir: Path, names: Sequence[str], average_precision: torch.Tensor, positives: torch.Tensor
) -> tuple[Path, Path]:
    """``attribute_ap.csv`` (attribute, AP, positives) and ``attribute_ap.png`` (a bar chart) in ``out_dir``."""
    csv_path, png_path = out_dir / "attribute_ap.csv", out_dir / "attribute_ap.png"
    values = [float(v) for v in average_precision]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["attribute", "average_precision", "positives"])
            for name, ap, count in zip(names, values, positives.tolist()):
                writer.writerow([name, "" if math.isnan(ap) else f"{ap:.4f}", int(count)])

    def write_png() -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(12, 4.5))
        shown = [0.0 if math.isnan(v) else v for v in values]
        ax.bar(range(len(values)), shown, color="#4477aa")
        mean = float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else float("nan")
        ax.axhline(mean, color="#cc3311", linestyle="--", label=f"mean AP {mean:.1%}")
        ax.set_xticks(range(len(values)), list(names), rotation=75, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("average precision")
        ax.set_title("Per-attribute average precision (test partition)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, png_path, dpi=110)

    with atomic_path(csv_path, ".csv") as temp:
        write_csv(temp)
    write_png()
    return csv_path, png_path
