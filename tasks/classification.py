"""Fine-grained image classification on the MobileNet backbone (the paper's Table 10, Stanford Dogs).

``ImageClassifier`` fine-tunes the backbone plus a linear classifier with label smoothing; its test loop
prints top-1 beside the model's mult-adds and parameters as Table 10 does and writes a confusion-matrix
PNG and a per-class accuracy CSV; its predict loop writes the top-5 classes of each image to a CSV.
The class names travel in the checkpoint (hyperparameter ``class_names``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import write_csv_atomic
from mobilenets.tasks.base import BaseTask, Stage, TaskHead
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError
from mobilenets.tasks.figures import pyplot, save_figure
from mobilenets.tasks.paper import PaperRow, mobilenet_row
from mobilenets.tasks.prediction_files import merge_predict_shards, predict_output_path, topk_rows

log = logging.getLogger(__name__)

STANFORD_DOGS_CLASSES = 120


class ClassNamesError(MobilenetsError, ValueError):
    """Class names that do not fit the model or the data; the message says which counts differ."""


class ImageClassifier(BaseTask):
    """MobileNet backbone + dropout + linear classifier, trained with label-smoothed cross-entropy.

    Args:
        num_classes: classifier outputs; None takes the count from the datamodule's ``class_names``.
        class_names: names by class index (set from the datamodule when None and saved in checkpoints,
            so ``predict`` prints names).
        label_smoothing: label smoothing of the cross-entropy loss.
        predictions_file: CSV written by ``predict`` (default ``<log dir>/predictions.csv``).
        **kwargs: the ``BaseTask`` options (width_mult, input_size, weights, optimizer, lr, ...).
    """

    output_options = ("predictions_file",)

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.1,
        predictions_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        if num_classes is not None and num_classes < 1:
            raise ClassNamesError(
                f"num_classes must be >= 1 (or null to take it from the data), got {num_classes}"
            )
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ClassNamesError(
                f"num_classes is {num_classes} but {len(class_names)} class_names were given"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self._predictions: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        super().__init__(**kwargs)
        self.last_predictions_path: Path | None = None

    # ------------------------------------------------------------------ model
    @property
    def class_count(self) -> int | None:
        names = self.hparams.get("class_names")
        return len(names) if names else self.hparams.get("num_classes")

    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=self.class_count or 0)

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.hparams.label_smoothing)

    def configure_metrics(self) -> MetricCollection | None:
        """Top-1, top-5 and mean per-class accuracy (None until the class count is known)."""
        count = self.class_count
        if not count:
            return None
        return MetricCollection(
            {
                "top1": MulticlassAccuracy(count, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(count, top_k=min(5, count), average="micro"),
                "mean_class_acc": MulticlassAccuracy(count, top_k=1, average="macro"),
            },
            # compute groups merge metrics whose states match after the first batch: a first batch that is
            # all correct at top-1 would make top-5 report top-1 for the rest of the epoch
            compute_groups=False,
        )

    def _build_head(self, count: int) -> None:
        self.backbone.reset_classifier(count)
        self.install_metrics()

    def setup(self, stage: str) -> None:
        """Take the class names (and, when ``num_classes`` is None, the head size) from the datamodule."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_names = getattr(datamodule, "class_names", None)
        if data_names is not None:
            data_names = [str(n) for n in data_names]
        if self.class_count is None:
            if not data_names:
                raise ClassNamesError(
                    "num_classes is null and the datamodule has no class_names: set model num_classes"
                )
            self.hparams["class_names"] = data_names
            self._build_head(len(data_names))
        elif data_names and stage != "predict":
            if len(data_names) != self.class_count:
                raise ClassNamesError(
                    f"the model has {self.class_count} classes but the data has {len(data_names)} "
                    f"({data_names[:5]}...); set model num_classes to {len(data_names)} or null"
                )
            if not self.hparams.get("class_names"):
                self.hparams["class_names"] = data_names
            elif list(self.hparams["class_names"]) != data_names:
                log.warning("class names of the checkpoint differ from the data's; keeping the checkpoint's")
        size = getattr(datamodule, "input_size", None)
        if size is not None and size != self.hparams.input_size:
            log.warning("data input_size %s differs from model input_size %s", size, self.hparams.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def class_name(self, index: int) -> str:
        names = self.hparams.get("class_names")
        return str(names[index]) if names else str(index)

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: Stage) -> torch.Tensor:
        return self.head_step(batch, self(batch["image"]), stage)

    def task_head(self) -> TaskHead:
        return self.classifier_head("logits")

    def head_step(self, batch: dict[str, Any], logits: torch.Tensor, stage: Stage) -> torch.Tensor:
        target = batch["target"]
        loss = self.criterion(logits, target)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=len(logits),
            prog_bar=stage != "test",
            sync_dist=stage != "train",
        )
        self.log_metrics(stage, logits, target, len(logits))
        if stage == "test":
            self.confusion.update(logits.argmax(1), target)
        return loss

    # ------------------------------------------------------------------ test report
    def on_test_epoch_start(self) -> None:
        count = self.class_count or 1
        self.confusion = MulticlassConfusionMatrix(count).to(self.device)

    def on_test_epoch_end(self) -> None:
        matrix = self.confusion.compute().cpu()  # summed over processes under DDP
        # on every process: the log dir is agreed on by a broadcast
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        report = self.test_report(matrix)
        print(report)
        self.write_per_class_csv(matrix, folder / "per_class_accuracy.csv")
        self.plot_confusion(matrix, folder / "confusion_matrix.png")
        print(f"wrote {folder / 'per_class_accuracy.csv'} and {folder / 'confusion_matrix.png'}")

    def test_report(self, matrix: torch.Tensor) -> str:
        """Table 10's columns for this model: top-1, million mult-adds, million parameters."""
        total = int(matrix.sum())
        top1 = 100.0 * float(matrix.diag().sum()) / max(total, 1)
        profile = self.profile()
        name = f"{self.hparams.width_mult:g} MobileNet-{self.hparams.input_size}"
        lines = [
            f"{'Model':<28}{'Top-1':>8}{'Million Mult-Adds':>20}{'Million Parameters':>21}",
            f"{name + ' (ours)':<28}{top1:>7.1f}%{profile.million_mult_adds:>20.0f}"
            f"{profile.million_parameters:>21.2f}",
        ]
        paper = self.paper_row()
        if paper:
            lines.append(
                f"{name + ' (paper, Dogs)':<28}{paper.metric:>7.1f}%{paper.million_mult_adds:>20.0f}"
                f"{paper.million_parameters:>21.1f}"
            )
        lines.append(f"({total} test images, {self.class_count} classes)")
        return "\n".join(lines)

    def write_per_class_csv(self, matrix: torch.Tensor, path: Path) -> None:
        rows: list[list[Any]] = [["class_index", "class_name", "images", "correct", "accuracy"]]
        for index in range(matrix.shape[0]):
            images, correct = int(matrix[index].sum()), int(matrix[index, index])
            accuracy = f"{correct / images:.4f}" if images else ""
            rows.append([index, self.class_name(index), images, correct, accuracy])
        write_csv_atomic(path, rows)

    def plot_confusion(self, matrix: torch.Tensor, path: Path) -> None:
        plt = pyplot()
        counts = matrix.double()
        rates = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
        size = min(4 + 0.12 * len(rates), 20)
        figure, axis = plt.subplots(figsize=(size, size))
        shown = axis.imshow(rates, cmap="viridis", vmin=0, vmax=1)
        figure.colorbar(shown, ax=axis, fraction=0.046, label="share of the true class")
        if len(rates) <= 40:
            names = [self.class_name(i) for i in range(len(rates))]
            axis.set_xticks(range(len(rates)), names, rotation=90, fontsize=7)
            axis.set_yticks(range(len(rates)), names, fontsize=7)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        axis.set_title(f"confusion matrix ({int(counts.sum())} test images)")
        figure.tight_layout()
        save_figure(figure, path, dpi=120)

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def adopt_export(self, path: Path, metadata: ExportMetadata, network: nn.Module) -> None:
        """Take the export's classes (count and names), as ``--ckpt_path`` takes a checkpoint's."""

        names = list(metadata.class_names or ())
        count = metadata.num_classes if metadata.num_classes is not None else len(names)
        if count < 1:
            raise ExportMismatchError(
                f"{path}: metadata keys 'num_classes'/'class_names' give no class count"
            )
        if names and len(names) != count:
            raise ExportMismatchError(
                f"{path}: metadata key 'class_names' lists {len(names)} names but 'num_classes' is {count}"
            )
        previous = self.class_count
        self.hparams["num_classes"] = count
        self.hparams["class_names"] = names or None
        if previous != count:  # the unused PyTorch head follows, so the task describes the served model
            self._build_head(count)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.head_predict(batch, self.predict_network(batch["image"]))

    def head_predict(self, batch: dict[str, Any], logits: torch.Tensor) -> dict[str, Any]:
        probabilities = logits.softmax(dim=1)
        top = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
        self._predictions.append((list(batch["path"]), top.indices.cpu(), top.values.float().cpu()))
        return {"path": list(batch["path"]), "top_indices": top.indices, "top_probabilities": top.values}

    def on_predict_epoch_end(self) -> None:
        paths = [path for batch_paths, _, _ in self._predictions for path in batch_paths]
        k = min(5, self.class_count or 1)
        indices = torch.cat([i for _, i, _ in self._predictions]) if paths else torch.zeros(0, k)
        values = torch.cat([v for _, _, v in self._predictions]) if paths else torch.zeros(0, k)
        names = [str(name) for name in self.hparams.get("class_names") or []]
        path = predict_output_path(self.trainer, self.hparams.get("predictions_file"), "predictions.csv")
        write_csv_atomic(path, topk_rows(paths, indices.numpy(), values.numpy(), names))
        path = merge_predict_shards(self.trainer, path)  # DDP: the processes' shards become one file
        self.last_predictions_path = path
        print(f"wrote top-{k} predictions of {len(paths)} images to {path}")

    # ------------------------------------------------------------------ resuming
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # dropout draws from the global generator: keep its state so a resumed run continues the same
        # random stream as an uninterrupted one (the data order is seeded per epoch by the sampler)
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["cuda_rng_states"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("torch_rng_state")
        if isinstance(state, torch.Tensor):
            torch.set_rng_state(state.cpu())
        cuda_states = checkpoint.get("cuda_rng_states")
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])

    # ------------------------------------------------------------------ paper and export
    def paper_row(self) -> PaperRow | None:
        """Table 10's row (Stanford Dogs) of this α and input size, if the paper prints one."""
        return mobilenet_row(10, self.hparams.width_mult, self.hparams.input_size)

    def paper_figures(self) -> tuple[float, float] | None:
        """Table 10's (million mult-adds, million parameters) for a 120-class Stanford Dogs model."""
        if self.class_count != STANFORD_DOGS_CLASSES:
            return None
        row = self.paper_row()
        return row.figures if row else None

    def export_record(self) -> ExportMetadata:
        names = self.hparams.get("class_names")
        return replace(
            super().export_record(),
            num_classes=self.class_count or 0,
            class_names=tuple(str(name) for name in names) if names else None,
        )
