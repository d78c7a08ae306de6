"""Face embeddings on the MobileNet backbone (paper Table 14): an L2-normalised D-dimensional embedding
trained by distillation from a teacher's embeddings (squared differences, as the paper did with FaceNet)
or by FaceNet's triplet loss with online semi-hard mining, evaluated on LFW-style pairs.

``predict`` embeds a folder of images (``FaceDataModule(predict_dir=...)``) and writes ``embeddings.csv``
(``path, e0, ..., e{D-1}``: the columns of ``mobilenets onnx-predict``) and ``embeddings.npy`` (float32,
rows in the CSV's order), and beside them an embedding shard per process (``tasks/faces/shards.py``:
``embeddings.shard-<rank>-of-<world size>.{npy,csv,json}``) that ``mobilenets faces index build|add
--embeddings <folder>`` reads without running the model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobilenets.datasets.atomic import atomic_path, write_csv_atomic, write_json_atomic
from mobilenets.tasks.base import BaseTask, Stage, TaskHead
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError
from mobilenets.tasks.distributed import gather_objects
from mobilenets.tasks.faces.shards import model_fingerprint, shard_stem, write_shard
from mobilenets.tasks.faces.verification import VerificationReport, evaluate_pairs, plot_roc
from mobilenets.tasks.paper import TABLE14, PaperRow, mobilenet_row
from mobilenets.tasks.prediction_files import (
    embedding_rows,
    merge_npy_shards,
    merge_predict_shards,
    predict_output_path,
)
from mobilenets.tasks.teacher import Teacher, TeacherInputs, cached_teacher_outputs, teacher_cache_dir

log = logging.getLogger(__name__)

EmbeddingLoss = Literal["triplet", "distill"]


# --------------------------------------------------------------------------- losses and mining
def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, B) squared Euclidean distances (clamped at 0 against rounding)."""
    squared = (embeddings * embeddings).sum(1)
    distances = squared[:, None] - 2 * embeddings @ embeddings.T + squared[None, :]
    return distances.clamp_min(0.0)


def semi_hard_triplets(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FaceNet's online semi-hard mining: every anchor-positive pair of the batch with one negative.

    For anchor a and positive p the negative is the closest one farther from a than p
    (d(a,n) > d(a,p), semi-hard); when every negative is closer than p, the farthest negative (the least
    hard of the hard ones), so that no triplet collapses the embedding early. Returns index tensors
    (anchors, positives, negatives); anchors without any negative in the batch are dropped.
    """
    with torch.no_grad():
        distances = pairwise_squared_distances(embeddings.float())
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        anchors, positives = (same & ~eye).nonzero(as_tuple=True)
        d_ap = distances[anchors, positives]
        d_an = distances[anchors]
        negative = ~same[anchors]
        semi_hard = negative & (d_an > d_ap[:, None])
        big = torch.finfo(d_an.dtype).max
        closest_semi_hard = torch.where(semi_hard, d_an, torch.full_like(d_an, big)).argmin(1)
        farthest_negative = torch.where(negative, d_an, torch.full_like(d_an, -big)).argmax(1)
        negatives = torch.where(semi_hard.any(1), closest_semi_hard, farthest_negative)
        keep = negative.any(1)
    return anchors[keep], positives[keep], negatives[keep]


def triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of max(d(a,p) − d(a,n) + margin, 0) over the mined triplets (squared L2 distances), and the
    fraction of triplets with a non-zero loss."""
    anchors, positives, negatives = semi_hard_triplets(embeddings, labels)
    if anchors.numel() == 0:
        raise ValueError(
            "triplet loss: the batch has no anchor-positive pair with a negative; use the P×K sampler "
            "(sampler: pk) with P >= 2 identities and K >= 2 images"
        )
    d_ap = (embeddings[anchors] - embeddings[positives]).pow(2).sum(1)
    d_an = (embeddings[anchors] - embeddings[negatives]).pow(2).sum(1)
    losses = F.relu(d_ap - d_an + margin)
    return losses.mean(), (losses > 0).float().mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The paper's distillation objective: squared difference of the two embeddings, summed over the
    dimensions and averaged over the batch."""
    return (student - teacher).pow(2).sum(1).mean()


# --------------------------------------------------------------------------- the task
class FaceEmbedder(BaseTask):
    """MobileNet → linear → L2-normalised face embedding (Table 14), with distillation or triplet loss.

    Args:
        embedding_size: D, the embedding's dimensions (FaceNet: 128).
        loss: ``distill`` (squared difference to a teacher's embeddings, as the paper) or ``triplet``
            (FaceNet's triplet loss with online semi-hard mining over P×K batches).
        margin: the triplet loss margin α (on squared distances of unit vectors, so in [0, 4]).
        teacher: the teacher for ``distill``: a TorchScript (.pt/.ts), ONNX (.onnx) or mobilenets
            checkpoint (.ckpt) file whose output is a D-dimensional embedding.
        teacher_input_size: resolution the teacher sees (default: what the teacher file says, else
            ``input_size``).
        teacher_cache_dir: where the teacher's embeddings of the training images are cached (keyed by the
            teacher's sha256 and the preprocessing); default ``<trainer.default_root_dir>/teacher_cache``.
        normalize_teacher: L2-normalise the teacher's outputs before the loss (FaceNet's are unit vectors).
        plot_dir: where ``test`` writes the ROC curve PNG and the report JSON (default: the logger's dir).
        embeddings_file: the ``.csv`` written by ``predict`` (default ``<log dir>/embeddings.csv``); the
            ``.npy`` is written beside it under the same name. Under DDP the processes' parts are merged into
            both, in single-process order.
        **kwargs: the backbone and optimisation options of ``BaseTask`` (``precise_bn_batches`` helps
            short runs, whose running statistics still lag the weights).
    """

    output_options = ("plot_dir", "embeddings_file")

    def __init__(
        self,
        embedding_size: int = 128,
        loss: EmbeddingLoss = "triplet",
        margin: float = 0.2,
        teacher: str | None = None,
        teacher_input_size: int | None = None,
        teacher_cache_dir: str | None = None,
        normalize_teacher: bool = True,
        plot_dir: str | None = None,
        embeddings_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if not 0.0 <= margin <= 4.0:
            raise ValueError(f"margin must be in [0, 4] (squared distances of unit vectors), got {margin}")
        if embeddings_file is not None and Path(embeddings_file).suffix.lower() != ".csv":
            raise ValueError(
                f"embeddings_file must name a .csv file (the .npy is written beside it), got {embeddings_file!r}"
            )
        self.embedding_size = embedding_size
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.last_embeddings_paths: tuple[Path, Path] | None = None
        self._predict_paths: list[str] = []
        self._predict_embeddings: list[torch.Tensor] = []
        # the cosine threshold chosen on the validation pairs; saved in checkpoints and used by the index
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self._teacher_targets: torch.Tensor | None = None
        self._eval_embeddings: torch.Tensor | None = None
        self.last_report: VerificationReport | None = None

    # ------------------------------------------------------------------ model
    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=0)
        # Batch norm on the projection centres the embeddings: without it the shared (all-positive, post-ReLU)
        # component of the pooled features dominates and every cosine starts near 1. Its running statistics
        # are the plain average over the latest training epoch (reset each epoch, momentum None), so that
        # they match the current weights even after a short run.
        self.embedding = nn.Sequential(
            nn.Linear(self.backbone.num_features, self.embedding_size, bias=False),
            nn.BatchNorm1d(self.embedding_size, momentum=None),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) → unit-length embeddings (N, D)."""
        pooled = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return F.normalize(self.embedding(pooled), dim=1)

    def paper_row(self) -> PaperRow | None:
        """Table 14's row of this α and input size, if the paper prints one."""
        return mobilenet_row(14, self.hparams.width_mult, self.hparams.input_size)

    def export_record(self) -> ExportMetadata:
        return (
            super()
            .export_record()
            .with_properties(
                embedding_size=str(self.embedding_size),
                metric="cosine (inner product of L2-normalised embeddings)",
                threshold=str(float(self.threshold)),
            )
        )

    def adopt_export(self, path: Path, metadata: ExportMetadata, network: nn.Module) -> None:
        """The export's embedding size must be this config's; its verification threshold is adopted."""

        properties = metadata.properties
        size = properties.get("embedding_size", "").strip()
        if size and size != str(self.embedding_size):
            raise ExportMismatchError(
                f"{path}: metadata key 'embedding_size': this config expects {self.embedding_size}, "
                f"the export has {size}"
            )
        try:
            threshold = float(properties.get("threshold", "nan"))
        except ValueError as error:
            raise ExportMismatchError(
                f"{path}: metadata key 'threshold': expected a number, got {properties['threshold']!r}"
            ) from error
        self.threshold.fill_(threshold)

    # ------------------------------------------------------------------ distillation targets
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.hparams.loss != "distill" or self._teacher_targets is not None:
            return

        if not self.hparams.teacher:
            raise ValueError(
                "loss: distill needs a teacher file: set model.teacher (--model.teacher path/to/teacher.pt|.onnx|.ckpt)"
            )

        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        if dataset is None or not hasattr(dataset, "paths"):
            raise ValueError(
                "distillation needs a datamodule whose train_dataset has the image paths (FaceDataModule)"
            )
        teacher = Teacher.load(self.hparams.teacher, expected_outputs=self.embedding_size)
        inputs = TeacherInputs.of(teacher, self.hparams.teacher_input_size, self)
        paths = [Path(p) for p in dataset.paths]
        cache = cached_teacher_outputs(
            teacher,
            paths,
            transform_key=inputs.key,
            make_batch=inputs.batch(),
            cache_dir=teacher_cache_dir(self.hparams.teacher_cache_dir, self.trainer),
        )
        rows = np.array([cache.index_of(p) for p in paths], dtype=np.int64)
        targets = torch.from_numpy(np.asarray(cache.outputs[rows], dtype=np.float32))
        if self.hparams.normalize_teacher:
            targets = F.normalize(targets, dim=1)
        self._teacher_targets = targets

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.embedding[1].reset_running_stats()

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: Stage) -> torch.Tensor | None:
        return self.head_step(batch, self(batch["image"]), stage)

    def task_head(self) -> TaskHead:
        backbone = self.backbone
        last = backbone.feature_info[-1].name

        def forward(maps: Any) -> torch.Tensor:
            return F.normalize(self.embedding(backbone.forward_head(maps[last], pre_logits=True)), dim=1)

        return TaskHead(module=self.embedding, taps=(last,), forward=forward, output_names=("embedding",))

    def head_step(self, batch: dict[str, Any], embeddings: torch.Tensor, stage: Stage) -> torch.Tensor | None:
        if stage == "train":
            if self.hparams.loss == "distill":
                if self._teacher_targets is None:
                    raise RuntimeError("distillation targets are missing: setup('fit') did not run")
                targets = self._teacher_targets[batch["index"].cpu()].to(embeddings)
                loss = distillation_loss(embeddings, targets)
            else:
                loss, active = triplet_loss(embeddings, batch["label"], self.hparams.margin)
                self.log(
                    "train/active_triplets", active, on_step=False, on_epoch=True, batch_size=len(embeddings)
                )
            self.log(
                "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(embeddings)
            )
            return loss
        if self._eval_embeddings is not None:
            self._eval_embeddings[batch["index"].cpu()] = embeddings.detach().float().cpu()
        return None

    def _start_evaluation(self, stage: Stage) -> None:
        dataset = self._pairs_dataset(stage)
        self._eval_embeddings = (
            torch.full((len(dataset), self.embedding_size), float("nan")) if dataset is not None else None
        )

    def _pairs_dataset(self, stage: Stage) -> Any:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
        return dataset if hasattr(dataset, "pair_table") else None

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def pair_scores(
        self, dataset: Any, embeddings: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index_a, index_b, same, folds = dataset.pair_table()
        scores = (embeddings[index_a] * embeddings[index_b]).sum(1).numpy()
        return scores, same, folds

    def _finish_evaluation(self, stage: Stage) -> None:
        dataset = self._pairs_dataset(stage)
        embeddings, self._eval_embeddings = self._eval_embeddings, None
        if dataset is None or embeddings is None:
            return
        if self.trainer.world_size > 1:  # each process embedded its share of the images: score every pair
            mine = (~torch.isnan(embeddings).any(1)).nonzero()[:, 0]
            shares = gather_objects((mine, embeddings[mine]))
            for rows, values in shares:
                embeddings[rows] = values
        if torch.isnan(embeddings).any():
            log.warning(
                "%s pairs: only part of the pair images was embedded (limit_%s_batches?); not evaluated",
                stage,
                stage,
            )
            return
        scores, same, folds = self.pair_scores(dataset, embeddings)
        report = evaluate_pairs(scores, same, folds)
        self.last_report = report
        values = {
            f"{stage}/accuracy": report.accuracy,
            f"{stage}/val_far1e-3": report.val_at_far_1e3,
            f"{stage}/val_far1e-4": report.val_at_far_1e4,
            f"{stage}/threshold": report.threshold,
        }
        self.log_dict({k: float(v) for k, v in values.items()}, prog_bar=stage == "val")
        if stage == "val" or torch.isnan(self.threshold):
            self.threshold.fill_(report.threshold)
        if stage == "test":
            out = self._output_dir()  # on every process: the log dir is agreed on by a broadcast
            if self.trainer.is_global_zero:
                self._write_test_outputs(report, scores, same, out)

    def _output_dir(self) -> Path:
        if self.hparams.get("plot_dir"):
            return Path(self.hparams.plot_dir)
        log_dir = self.trainer.log_dir if self.trainer.logger else None
        return Path(log_dir or self.trainer.default_root_dir)

    def _write_test_outputs(
        self, report: VerificationReport, scores: np.ndarray, same: np.ndarray, out: Path
    ) -> None:
        roc = plot_roc(out / "faces_roc.png", scores, same, title=f"{self.model_name()} ROC")
        summary = {**report.as_dict(), "num_pairs": report.num_pairs, "num_folds": report.num_folds}
        write_json_atomic(out / "faces_report.json", summary, indent=2)
        print(self.format_table14(report))
        print(f"ROC curve: {roc}")

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._predict_paths, self._predict_embeddings = [], []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.head_predict(batch, self.predict_network(batch["image"]))

    def head_predict(self, batch: dict[str, Any], embeddings: torch.Tensor) -> dict[str, Any]:
        self._predict_paths += [str(p) for p in batch["path"]]
        self._predict_embeddings.append(embeddings.detach().float().cpu())
        return {"path": list(batch["path"]), "embedding": embeddings}

    def on_predict_epoch_end(self) -> None:
        size = self.embedding_size
        embeddings = (
            torch.cat(self._predict_embeddings) if self._predict_embeddings else torch.zeros(0, size)
        ).numpy()
        csv_path = predict_output_path(self.trainer, self.hparams.get("embeddings_file"), "embeddings.csv")
        npy_path = csv_path.with_suffix(".npy")
        write_csv_atomic(csv_path, embedding_rows(self._predict_paths, embeddings))
        with atomic_path(npy_path, ".npy") as temp, temp.open("wb") as stream:
            np.save(stream, embeddings.astype(np.float32, copy=False))
        shard = self._write_embedding_shard(npy_path, embeddings)
        # DDP: the processes' files become one (their shards, for index building, stay)
        csv_path = merge_predict_shards(self.trainer, csv_path)
        npy_path = merge_predict_shards(self.trainer, npy_path, merge_npy_shards)
        self.last_embeddings_paths = (csv_path, npy_path)
        self._predict_paths, self._predict_embeddings = [], []
        print(f"wrote {size}-d embeddings of {len(embeddings)} images to {csv_path}, {npy_path} and {shard}")

    def _write_embedding_shard(self, npy_path: Path, embeddings: np.ndarray) -> Path:
        """This process's embedding shard beside ``npy_path`` (``<stem>.shard-<rank>-of-<world size>``; its
        array a hard link to ``npy_path``): what ``faces index build|add --embeddings`` reads. Paths are
        absolute and the identity is each image's folder name (``<identity>/<image>``)."""
        trainer = self.trainer
        prefix = Path(self.hparams.get("embeddings_file") or "embeddings.csv").stem
        paths = [str(Path(p).resolve()) for p in self._predict_paths]
        return write_shard(
            npy_path.parent,
            shard_stem(prefix, trainer.global_rank, trainer.world_size),
            embeddings,
            paths,
            [Path(p).parent.name for p in paths],
            self.embedding_model_info(),
            embeddings_file=npy_path,
        )

    def embedding_model_info(self) -> dict[str, Any]:
        """What an embedding shard records of the model that made it: its ``model_fingerprint`` (weights and
        preprocessing, or the served ONNX file), the file it came from, its settings and threshold."""
        exported = self.exported_network
        source = getattr(exported, "path", None) or getattr(self.trainer, "ckpt_path", None)
        threshold = float(self.threshold)
        return {
            "path": str(Path(source).resolve()) if source else None,
            "fingerprint": model_fingerprint(self),
            "task": type(self).__name__,
            "embedding_size": self.embedding_size,
            "input_size": int(self.hparams.input_size),
            "width_mult": float(self.hparams.width_mult),
            "threshold": threshold if threshold == threshold else None,  # NaN: not calibrated
        }

    def model_name(self) -> str:
        return f"{self.hparams.width_mult:g} MobileNet-{self.hparams.input_size}"

    def format_table14(self, report: VerificationReport) -> str:
        """Table 14's layout (1e-4 accuracy = VAL at FAR 1e-4, MAdds, params): the paper's rows and ours."""
        profile = self.profile()
        header = f"{'Model':<32}{'1e-4 Accuracy':>15}{'Million Mult-Adds':>20}{'Million Parameters':>21}"
        lines = [
            "Table 14: face embeddings (paper: MobileNet distilled from FaceNet)",
            header,
            "-" * len(header),
        ]
        for row in TABLE14:
            lines.append(
                f"{'paper ' + row.model:<32}{row.metric:>14.1f}%{row.million_mult_adds:>20.0f}"
                f"{row.million_parameters:>21.1f}"
            )
        ours = f"ours {self.model_name()} ({self.hparams.loss})"
        lines.append(
            f"{ours:<32}{100 * report.val_at_far_1e4:>14.1f}%"
            f"{profile.million_mult_adds:>20.0f}{profile.million_parameters:>21.2f}"
        )
        lines.append(
            f"ours on {report.num_pairs} pairs / {report.num_folds} folds: 10-fold accuracy "
            f"{100 * report.accuracy:.1f}% ± {100 * report.accuracy_std:.1f}, "
            f"VAL@FAR=1e-3 {100 * report.val_at_far_1e3:.1f}% (FAR {report.far_at_1e3:.2g}), "
            f"VAL@FAR=1e-4 {100 * report.val_at_far_1e4:.1f}% (FAR {report.far_at_1e4:.2g}), "
            f"threshold (cosine) {report.threshold:.3f}"
        )
        return "\n".join(lines)
