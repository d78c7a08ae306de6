"""What every task of the suite shares: the backbone from flat options, optimizer and schedule from the
config, parameter groups without weight decay, metric collections per stage, and one shared step."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.backbone.mobilenet import Activation, MobileNetV1, Padding
from mobilenets.backbone.profile import Profile, profile_model
from mobilenets.backbone.weights import load_pretrained
from mobilenets.tasks.batchnorm import BatchNormStatistics
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import OnnxNetwork, check_export_metadata
from mobilenets.tasks.paper import PaperRow

Stage = Literal["train", "val", "test"]
OptimizerName = Literal["rmsprop", "sgd", "adamw"]
SchedulerName = Literal["cosine", "step", "none"]
#: Inputs scaled to [-1, 1]: what timm's and Keras' MobileNet v1 ImageNet weights expect.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


class StageMetrics(nn.Module):
    """One metric collection per stage, indexed by stage name.

    ``nn.ModuleDict`` cannot hold the key ``"train"`` (it is an ``nn.Module`` method), so each collection is
    registered as ``<stage>_metrics``.
    """

    def __init__(
        self, metrics: MetricCollection | None = None, stages: tuple[str, ...] = ("train", "val", "test")
    ):
        super().__init__()
        if metrics is not None:
            for stage in stages:
                self[stage] = metrics.clone(prefix=f"{stage}/")

    def __setitem__(self, stage: str, collection: MetricCollection) -> None:
        self.add_module(f"{stage}_metrics", collection)

    def __getitem__(self, stage: str) -> MetricCollection:
        if f"{stage}_metrics" not in self._modules:
            raise KeyError(stage)
        return self._modules[f"{stage}_metrics"]  # type: ignore[return-value]

    def __contains__(self, stage: object) -> bool:
        return f"{stage}_metrics" in self._modules


class CheckpointError(MobilenetsError, ValueError):
    """A checkpoint file that cannot be read as expected; the message names the file."""


class TaskHeadError(MobilenetsError, ValueError):
    """A task that cannot serve as a head on a shared backbone; the message names the task."""


@dataclass(frozen=True)
class TaskHead:
    """A task's head on the backbone's feature maps: what a multi-task model (``tasks/multitask.py``) needs to
    run the task on a shared MobileNet body. Everything in it is the task's own (modules and code, no copies);
    the task's loss and prediction files come from its ``head_step`` and ``head_predict``.

    Args:
        module: the head's layers (modules of the task: training them trains the task).
        taps: the backbone feature taps (``MobileNetV1.feature_info`` names) the head reads.
        forward: the tap maps (name → tensor) → the head's outputs: what the task's ``export_module()``
            returns for the same images.
        output_names: one name per output of ``forward``.
    """

    module: nn.Module
    taps: tuple[str, ...]
    forward: Callable[[Mapping[str, torch.Tensor]], Any]
    output_names: tuple[str, ...]


TASK_CLASS_KEY = "mobilenets_task"
#: Task classes whose module moved: checkpoints written before the move name the old path.
MOVED_TASK_CLASSES = {
    "mobilenets.tasks.embedding.FaceEmbedder": "mobilenets.tasks.faces.embedding.FaceEmbedder",
    "mobilenets.tasks.detection.SSDDetection": "mobilenets.tasks.detection.ssd.SSDDetection",
    "mobilenets.tasks.detection.FasterRCNNDetection": "mobilenets.tasks.detection.faster_rcnn.FasterRCNNDetection",
}
#: Hyperparameters renamed since checkpoints were written: ``load_task`` reads the old name as the new one.
RENAMED_HYPERPARAMETERS = {
    "recompute_bn_batches": "precise_bn_batches",  # DetectionTask
    "recalibrate_bn_batches": "precise_bn_batches",  # FaceEmbedder
}


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle with code objects, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: expected a Lightning checkpoint with a 'state_dict' entry")
    return checkpoint


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Depthwise filters, norm layers and biases: the parameters trained without weight decay.

    The paper: "it is important to put very little or no weight decay (l2 regularization) on the
    depthwise filters since there are so few parameters in them".
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        is_depthwise = (
            isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
        )
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for param_name, _ in module.named_parameters(recurse=False):
            if is_depthwise or is_norm or param_name == "bias":
                names.add(prefix + param_name)
    return names


class BaseTask(pl.LightningModule):
    """Shared base of every task: backbone options, optimisation, metrics and the shared step.

    A task overrides ``configure_models`` (build ``self.backbone`` via ``build_backbone`` and its heads),
    ``configure_losses``, ``configure_metrics`` (return a ``MetricCollection`` or None) and ``_shared_step``.

    Args:
        width_mult: the backbone's width multiplier α.
        input_size: the input resolution (the resolution multiplier ρ = input_size / 224).
        activation: ``relu`` (paper) or ``relu6`` (TF/Keras weights).
        padding: ``torch`` or ``tf`` ("SAME", needed for Keras weights).
        bn_eps: batch-norm epsilon (1e-5; Keras weights use 1e-3).
        weights: a local ImageNet weight file (timm .safetensors/.pth, Keras .h5) or a checkpoint of this
            project (.ckpt) loaded into the backbone; None trains from scratch.
        dropout: dropout before the classifier.
        freeze_backbone_epochs: train only the heads for this many epochs, then fine-tune everything.
        optimizer: ``rmsprop`` (as the paper trained), ``sgd`` (momentum) or ``adamw``.
        lr: peak learning rate.
        momentum: momentum of RMSprop and SGD.
        weight_decay: L2 / decoupled weight decay on the parameters that take it.
        decay_depthwise_and_norm: also decay depthwise filters, norm layers and biases (off by default).
        scheduler: ``cosine`` to zero, ``step`` (multiply by ``step_gamma`` every ``step_epochs``) or ``none``.
        warmup_epochs: linear warm-up from 1% of ``lr``, counted in (fractional) epochs of optimizer steps.
        step_epochs: epochs between steps of the ``step`` schedule.
        step_gamma: factor of the ``step`` schedule.
        precise_bn_batches: "precise BN": before each validation of a fit, and at the end of each training
            epoch, set every batch norm's running statistics to the exact average over this many training
            batches (0: off). Short runs need it: their running averages lag far behind the quickly
            changing weights.
        folded_bn_batches: when ``weights`` come with batch norm folded into the convolutions (TFLite,
            e.g. ``official:0.25_128``), measure real statistics for those batch norms on this many training
            batches before the first training step (eval-mode outputs stay the same; 0: leave them folded,
            which makes training-mode batch norm discard what the folded weights computed).

    Output locations (``output_options``: prediction files, plot folders) are not part of the model: they
    are kept out of checkpoints, so that LightningCLI, which copies a checkpoint's hyperparameters over the
    config for ``--ckpt_path``, cannot replace the ones given for test or predict.
    """

    #: init arguments that name where outputs go; ``on_save_checkpoint`` leaves them out of checkpoints
    output_options: tuple[str, ...] = ()

    def __init__(
        self,
        width_mult: float = 1.0,
        input_size: int = 224,
        activation: Activation = "relu",
        padding: Padding = "torch",
        bn_eps: float = 1e-5,
        weights: str | None = None,
        dropout: float = 0.001,
        freeze_backbone_epochs: int = 0,
        optimizer: OptimizerName = "rmsprop",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        decay_depthwise_and_norm: bool = False,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 0.0,
        step_epochs: int = 30,
        step_gamma: float = 0.1,
        precise_bn_batches: int = 0,
        folded_bn_batches: int = 8,
    ) -> None:
        super().__init__()
        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 px, got {input_size}")
        if freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs must be >= 0, got {freeze_backbone_epochs}")
        for name, value in (
            ("precise_bn_batches", precise_bn_batches),
            ("folded_bn_batches", folded_bn_batches),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.backbone: MobileNetV1
        self.configure_models()
        self.configure_losses()
        self.install_metrics()

    # ------------------------------------------------------------------ hooks for tasks
    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=0)

    def configure_losses(self) -> None:
        """Set up loss modules (optional)."""

    def configure_metrics(self) -> MetricCollection | None:
        return None

    #: the stages whose metric collection ``install_metrics`` creates
    metric_stages: tuple[Stage, ...] = ("train", "val", "test")

    def install_metrics(self) -> None:
        """(Re)create the per-stage collections from ``configure_metrics`` (e.g. once the class count is known)."""
        self.stage_metrics = StageMetrics(self.configure_metrics(), self.metric_stages)

    def _shared_step(self, batch: Any, stage: Stage) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ head contract (a shared backbone)
    def task_head(self) -> TaskHead:
        """This task's head on the backbone's taps (tasks that can share a backbone override it)."""
        raise TaskHeadError(f"{type(self).__name__} has no head for a shared backbone (task_head)")

    def head_step(self, batch: Any, outputs: Any, stage: Stage) -> torch.Tensor | None:
        """The loss of one of this task's batches from its head's outputs (``task_head().forward``), with the
        metrics and logs of the task's own step: ``_shared_step`` without the forward pass."""
        raise TaskHeadError(f"{type(self).__name__} has no head for a shared backbone (head_step)")

    def head_predict(self, batch: Any, outputs: Any) -> Any:
        """Collect one predict batch from the head's outputs for the task's prediction files (written by its
        ``on_predict_epoch_end``): ``predict_step`` without the forward pass."""
        raise TaskHeadError(f"{type(self).__name__} has no head for a shared backbone (head_predict)")

    def classifier_head(self, output_name: str = "logits") -> TaskHead:
        """The head of a task whose classifier is the backbone's own: pool, dropout and linear layer on the
        last feature map."""
        backbone = self.backbone
        last = backbone.feature_info[-1].name
        return TaskHead(
            module=backbone.classifier,
            taps=(last,),
            forward=lambda maps: backbone.forward_head(maps[last]),
            output_names=(output_name,),
        )

    # ------------------------------------------------------------------ backbone
    def build_backbone(self, num_classes: int = 0, **overrides: Any) -> MobileNetV1:
        """The MobileNet of this task's options, with ``weights`` loaded when set."""
        hp = self.hparams
        options: dict[str, Any] = dict(
            num_classes=num_classes,
            width_mult=hp.width_mult,
            dropout=hp.dropout,
            activation=hp.activation,
            padding=hp.padding,
            bn_eps=hp.bn_eps,
        )
        options.update(overrides)
        backbone = MobileNetV1(**options)
        if hp.weights:
            load_pretrained(backbone, Path(hp.weights))
        return backbone

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std the inputs are normalised with (matches the ImageNet weights)."""
        return DEFAULT_MEAN, DEFAULT_STD

    def batch_inputs(self, batch: Any) -> Any:
        """What ``forward`` takes for a batch of the training loader: its images (the batch itself, its
        ``"image"`` entry, or its first item). Batch-norm statistics are measured by running these."""
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, dict):
            return batch["image"]
        return batch[0]

    def backbone_inputs(self, inputs: Any) -> torch.Tensor:
        """The tensor the backbone receives for ``forward(inputs)`` (tasks that prepare images inside the
        network, such as detectors, override this)."""
        return inputs

    def configure_callbacks(self) -> list[pl.Callback]:
        hp = self.hparams
        return [BatchNormStatistics(hp.get("precise_bn_batches", 0), hp.get("folded_bn_batches", 0))]

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        size = self.hparams.input_size
        return torch.zeros(batch_size, 3, size, size)

    def profile(self) -> Profile:
        """Mult-adds and parameters of the whole task model at its input size."""
        return profile_model(self, self.hparams.input_size)

    def paper_row(self) -> PaperRow | None:
        """The paper's row (``tasks/paper.py``) for this task's configuration, if the paper prints one."""
        return None

    def paper_figures(self) -> tuple[float, float] | None:
        """The paper's (million mult-adds, million parameters) for this configuration, if it has a row."""
        row = self.paper_row()
        return row.figures if row else None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TASK_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        # The checkpoint holds the trained weights: the ImageNet file it started from is not needed to
        # rebuild it (LightningCLI copies these hyperparameters over the config for --ckpt_path).
        hyper_parameters = checkpoint.get("hyper_parameters")
        if isinstance(hyper_parameters, dict):
            hyper_parameters["weights"] = None
            for name in self.output_options:
                hyper_parameters.pop(name, None)

    @staticmethod
    def load_task(path: str | Path, map_location: str = "cpu", **overrides: Any) -> BaseTask:
        """Rebuild any task from one of its Lightning checkpoints (no need to know its class).

        ImageNet ``weights`` are not reloaded (the checkpoint holds the trained ones); ``overrides``
        replace saved hyperparameters. The model is returned in eval mode.
        """
        path = Path(path)
        checkpoint = read_checkpoint(path, map_location)
        class_path = checkpoint.get(TASK_CLASS_KEY)
        if not isinstance(class_path, str):
            raise CheckpointError(
                f"{path}: not a checkpoint of a mobilenets task (no '{TASK_CLASS_KEY}' entry)"
            )
        class_path = MOVED_TASK_CLASSES.get(class_path, class_path)
        module_name, _, class_name = class_path.rpartition(".")
        task_cls = getattr(importlib.import_module(module_name), class_name)
        hparams = {
            RENAMED_HYPERPARAMETERS.get(k, k): v
            for k, v in checkpoint.get("hyper_parameters", {}).items()
            if not k.startswith("_")
        }
        hparams.update({"weights": None, **overrides})
        model = task_cls(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    # ------------------------------------------------------------------ export contract
    def export_module(self) -> nn.Module:
        """The inference network to export (image batch in, tensors out; no Python-side post-processing)."""
        return self

    def export_record(self) -> ExportMetadata:
        """What a deployer needs beside the network: the task, its input and normalisation (tasks add their
        names and settings to this record)."""
        mean, std = self.normalization
        return ExportMetadata(
            task=type(self).__name__,
            input_size=int(self.hparams.input_size),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
        )

    def export_metadata(self) -> dict[str, str]:
        """``export_record()`` as the text properties written into an exported file."""
        return self.export_record().to_properties()

    # ------------------------------------------------------------------ serving an exported file
    #: the ONNX network ``predict`` runs on, set by ``use_exported`` (a plain attribute, not a submodule:
    #: it has no weights, and state dicts, profiles and copies of the task stay those of its own network)
    _exported_network: nn.Module | None = None

    @property
    def exported_network(self) -> nn.Module | None:
        """The attached ``OnnxNetwork`` (``use_exported``), else None."""
        return self._exported_network

    def use_exported(self, path: str | Path) -> dict[str, str]:
        """Serve ``predict`` from an ``.onnx`` file written by ``mobilenets export`` (float or int8).

        The file's metadata must name this task class, this config's input size and normalisation
        (``ExportMismatchError`` naming the key otherwise); the task then adopts what the export carries
        (``adopt_export``: class names, attribute names, ...) and ``predict_network`` runs ONNX Runtime.
        Returns the metadata.
        """

        network = OnnxNetwork(path)
        mean, std = self.normalization
        check_export_metadata(
            network.path, network.metadata, type(self).__name__, self.hparams.input_size, mean, std
        )
        record = ExportMetadata.from_properties(network.metadata, network.path)
        self.adopt_export(network.path, record, network)
        object.__setattr__(self, "_exported_network", network)
        return network.metadata

    def adopt_export(self, path: Path, metadata: ExportMetadata, network: nn.Module) -> None:
        """Take over what an export carries beside the network (tasks override: class names, cells, ...);
        raise ``ExportMismatchError`` naming the key when the export cannot serve this task."""

    def predict_network(self, images: torch.Tensor) -> Any:
        """``self(images)``, or the attached export's outputs for the same images: ``predict_step``s call
        this. Tasks whose ``forward`` is not their ``export_module()`` (SSD) serve exports their own way."""
        if self._exported_network is not None:
            return self._exported_network(images)
        return self(images)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def log_metrics(self, stage: Stage, preds: Any, target: Any, batch_size: int) -> None:
        """Update the stage's metric collection and log it per epoch."""
        if stage not in self.stage_metrics:
            return
        collection = self.stage_metrics[stage]
        collection.update(preds, target)
        self.log_dict(collection, on_step=False, on_epoch=True, batch_size=batch_size)

    # ------------------------------------------------------------------ freezing schedule
    def on_fit_start(self) -> None:
        self._apply_freeze_schedule()

    def on_train_epoch_start(self) -> None:
        self._apply_freeze_schedule()

    def _apply_freeze_schedule(self) -> None:
        if self.hparams.freeze_backbone_epochs <= 0:
            return
        if self.current_epoch < self.hparams.freeze_backbone_epochs:
            self.backbone.freeze()
        else:
            self.backbone.unfreeze()

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: with and without weight decay (all parameters, frozen ones included, so that
        unfreezing later needs no new optimizer)."""
        hp = self.hparams
        if hp.decay_depthwise_and_norm or hp.weight_decay == 0:
            return [{"params": list(self.parameters()), "weight_decay": hp.weight_decay}]
        skip = no_decay_parameter_names(self)
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            (no_decay if name in skip else decay).append(param)
        return [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "rmsprop":
            # TF's RMSProp defaults that the paper's training used: decay 0.9, epsilon 1.0.
            optimizer: torch.optim.Optimizer = torch.optim.RMSprop(
                groups, lr=hp.lr, alpha=0.9, eps=1.0, momentum=hp.momentum
            )
        elif hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(total_steps / max_epochs, 1.0)
        warmup_steps = int(hp.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return 0.01 + 0.99 * step / warmup_steps
            if hp.scheduler == "cosine":
                progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            if hp.scheduler == "step":
                return hp.step_gamma ** int(step / steps_per_epoch // max(hp.step_epochs, 1))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
