"""One MobileNet body, several task heads: every task from a single backbone forward (the paper's premise of
one small network serving many applications).

``MultiTask`` holds one shared ``MobileNetV1`` body and the tasks whose heads read its feature taps. The
heads are the tasks' own modules and code, reached through the base task's head contract
(``BaseTask.task_head``, ``head_step``, ``head_predict``): each task keeps its loss, metrics and prediction
files, and its own ``forward`` runs on the shared body (the tasks' MobileNets share the body's modules).

Two ways in:

- ``MultiTask.from_checkpoints({"attributes": "a.ckpt", ...})`` (or ``checkpoints:`` in a config): heads of
  task checkpoints trained on one shared (frozen) backbone; checkpoints whose backbones differ are refused,
  naming the checkpoint and the key.
- Joint training (``tasks:`` specs in a config, ``MultiDataModule`` over one datamodule per task, batches
  combined with Lightning's ``CombinedLoader``), with per-task loss weights; each task logs its metrics as
  ``<task>/<metric>`` (``attributes/val/mAP``).

``predict`` runs the body once per batch of a folder and writes every task's usual files, each in
``<log dir>/<task>/``; ``export_module`` is one network with a named output per head, and the export's
metadata carries every task's record under ``<task>.<key>``.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch import nn

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.profile import Profile
from mobilenets.datasets.base import BaseDataModule
from mobilenets.datasets.image_list import ImageListDataset
from mobilenets.datasets.images import images_in_folder
from mobilenets.datasets.transforms import ClassificationTransform
from mobilenets.tasks.base import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    MOVED_TASK_CLASSES,
    RENAMED_HYPERPARAMETERS,
    TASK_CLASS_KEY,
    BaseTask,
    Stage,
    TaskHead,
    read_checkpoint,
)
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError

#: The options that define the shared backbone: stated once, on the multi-task model.
BACKBONE_OPTIONS = ("width_mult", "input_size", "activation", "padding", "bn_eps")
#: Options of a task that act on the backbone or the fit as a whole: the multi-task model's own.
FIT_OPTIONS = ("weights", "freeze_backbone_epochs", "precise_bn_batches", "folded_bn_batches")
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
CombineMode = Literal["max_size_cycle", "min_size", "max_size"]


class MultiTaskError(MobilenetsError, ValueError):
    """A multi-task model that cannot be built as asked; the message names the task, checkpoint or key."""


# --------------------------------------------------------------------------- building the tasks
def _task_class(class_path: str, where: str) -> type[BaseTask]:
    class_path = MOVED_TASK_CLASSES.get(class_path, class_path)
    module_name, _, class_name = class_path.rpartition(".")
    try:
        task_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise MultiTaskError(f"{where}: cannot import the task class {class_path!r} ({error})") from error
    if not (isinstance(task_cls, type) and issubclass(task_cls, BaseTask)) or issubclass(task_cls, MultiTask):
        raise MultiTaskError(f"{where}: {class_path!r} is not a task of this suite (a BaseTask)")
    return task_cls


def instantiate_spec(base: type, spec: Mapping[str, Any], where: str, **forced: Any) -> Any:
    """Build ``{"class_path", "init_args"}`` (a subclass of ``base``) as the CLI would, ``forced`` options
    replacing the spec's; errors name ``where``. An empty context: LightningCLI's instantiation context
    would hand the object the enclosing model's or datamodule's hyperparameters to save as its own."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "spec")
    class_path = MOVED_TASK_CLASSES.get(spec["class_path"], spec["class_path"])
    init_args = {**(spec.get("init_args") or {}), **forced}
    try:
        namespace = parser.parse_object({"spec": {"class_path": class_path, "init_args": init_args}})
    except Exception as error:  # jsonargparse names the offending key
        raise MultiTaskError(f"{where}: {error}") from error
    return contextvars.Context().run(lambda: parser.instantiate(namespace).spec)


def _checkpoint_spec(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``({"class_path", "init_args"}, state dict)`` of a task checkpoint, as ``BaseTask.load_task`` reads it."""
    checkpoint = read_checkpoint(path)
    class_path = checkpoint.get(TASK_CLASS_KEY)
    if not isinstance(class_path, str):
        raise MultiTaskError(f"{path}: not a checkpoint of a mobilenets task (no '{TASK_CLASS_KEY}' entry)")
    init_args = {
        RENAMED_HYPERPARAMETERS.get(k, k): v
        for k, v in checkpoint.get("hyper_parameters", {}).items()
        if not k.startswith("_")
    }
    return {"class_path": MOVED_TASK_CLASSES.get(class_path, class_path), "init_args": init_args}, checkpoint[
        "state_dict"
    ]


def _body_state(backbone: MobileNetV1) -> dict[str, torch.Tensor]:
    """The body's weights and statistics (stem and blocks; batch counters left out: they count, not weigh)."""
    state = {f"stem.{k}": v for k, v in backbone.stem.state_dict().items()}
    state |= {f"blocks.{k}": v for k, v in backbone.blocks.state_dict().items()}
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


class _TaskTrainer:
    """What a task of a multi-task model sees as its trainer: the real one, except that its data is its own
    datamodule (and loaders) and its output folders are ``<folder>/<task>``, so that the tasks' default
    prediction files do not overwrite each other."""

    def __init__(self, trainer: pl.Trainer, name: str) -> None:
        self._trainer = trainer
        self._name = name

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in ("_trainer", "_name"):  # copy and pickle probe before __init__ ran
            raise AttributeError(key)
        return getattr(self._trainer, key)

    @property
    def datamodule(self) -> Any:
        data = getattr(self._trainer, "datamodule", None)
        return data.datamodules.get(self._name) if isinstance(data, MultiDataModule) else None

    def _loader(self, stage: str) -> Any:
        data = getattr(self._trainer, "datamodule", None)
        return data.loaders.get(stage, {}).get(self._name) if isinstance(data, MultiDataModule) else None

    @property
    def val_dataloaders(self) -> Any:
        return self._loader("val")

    @property
    def test_dataloaders(self) -> Any:
        return self._loader("test")

    @property
    def default_root_dir(self) -> str:
        return os.path.join(self._trainer.default_root_dir, self._name)

    @property
    def log_dir(self) -> str:
        return os.path.join(self._trainer.log_dir or self._trainer.default_root_dir, self._name)


class MultiTask(BaseTask):
    """One MobileNet body whose feature taps feed several task heads (the tasks' own heads, no copies).

    Args:
        tasks: task name → ``{"class_path": ..., "init_args": {...}}`` of each task (joint training); the
            backbone options (``width_mult``, ``input_size``, ``activation``, ``padding``, ``bn_eps``) and
            ``weights`` are this model's, stated once. Names are identifiers (they prefix logs and outputs).
        checkpoints: task name → a trained task checkpoint; the heads (and the shared body) come from them.
            Their backbones must be one: same options, normalisation and body weights (``MultiTaskError``
            naming the checkpoint and the key otherwise). Saved checkpoints of this model no longer need them.
        loss_weights: task name → weight of its loss in the joint loss (default 1 each).
        **kwargs: the ``BaseTask`` options of the shared backbone and the fit (``freeze_backbone_epochs``
            beyond ``max_epochs`` trains the heads on a frozen backbone).
    """

    def __init__(
        self,
        tasks: dict[str, dict[str, Any]] | None = None,
        checkpoints: dict[str, str] | None = None,
        loss_weights: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        specs: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, torch.Tensor]] = {}
        sources: dict[str, str] = {}
        for name, spec in (tasks or {}).items():
            if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
                raise MultiTaskError(f"tasks.{name}: expected a mapping with class_path and init_args")
            unknown = set(spec) - {"class_path", "init_args"}
            if unknown:
                raise MultiTaskError(
                    f"tasks.{name}: unexpected keys {sorted(unknown)} (class_path, init_args)"
                )
            init_args = dict(spec.get("init_args") or {})
            stated = sorted(set(init_args) & {*BACKBONE_OPTIONS, "weights"})
            if stated:
                raise MultiTaskError(
                    f"tasks.{name}.init_args.{stated[0]}: the shared backbone's options are the multi-task "
                    "model's own (model.init_args); remove it here"
                )
            specs[name] = {"class_path": spec["class_path"], "init_args": init_args}
            sources[name] = f"tasks.{name}"
        for name, path in (checkpoints or {}).items():
            if name in specs:
                raise MultiTaskError(f"checkpoints.{name}: the task {name!r} is also in tasks")
            spec, state = _checkpoint_spec(Path(path))
            specs[name], states[name], sources[name] = spec, state, str(path)
        if not specs:
            raise MultiTaskError("a multi-task model needs at least one task (tasks or checkpoints)")
        for name in specs:
            if not TASK_NAME.match(name):
                raise MultiTaskError(
                    f"task name {name!r}: use letters, digits and '_' (it names logs, folders and outputs)"
                )
        weights = dict(loss_weights or {})
        for name, weight in weights.items():
            if name not in specs:
                raise MultiTaskError(f"loss_weights.{name}: no such task (the tasks are {sorted(specs)})")
            if not weight >= 0:
                raise MultiTaskError(f"loss_weights.{name}: must be >= 0, got {weight}")
        self._check_backbone_options(specs, sources, kwargs, states)
        self._specs = specs
        self._states = states
        self._sources = sources
        super().__init__(**kwargs)
        self.loss_weights = {name: float(weights.get(name, 1.0)) for name in specs}
        self._states = {}  # loaded: the weights live in the modules now

    @staticmethod
    def _check_backbone_options(
        specs: dict[str, dict[str, Any]],
        sources: dict[str, str],
        options: dict[str, Any],
        states: dict[str, Any],
    ) -> None:
        """Checkpoints must agree with each other and with this model's options on every backbone option."""
        defaults = {
            "width_mult": 1.0,
            "input_size": 224,
            "activation": "relu",
            "padding": "torch",
            "bn_eps": 1e-5,
        }
        first: tuple[str, dict[str, Any]] | None = None
        for name in states:
            saved = specs[name]["init_args"]
            values = {key: saved.get(key, defaults[key]) for key in BACKBONE_OPTIONS}
            if first is None:
                first = (sources[name], values)
            for key in BACKBONE_OPTIONS:
                if values[key] != first[1][key]:
                    raise MultiTaskError(
                        f"{sources[name]}: {key} is {values[key]!r} but {first[0]} has {first[1][key]!r}: the "
                        "heads must come from tasks trained on one shared backbone"
                    )
                if values[key] != options.get(key, defaults[key]):
                    raise MultiTaskError(
                        f"{sources[name]}: {key} is {values[key]!r} but the multi-task model has "
                        f"{options.get(key, defaults[key])!r}; set model.init_args.{key}: {values[key]!r}"
                    )
            for key in (*BACKBONE_OPTIONS, "weights"):
                saved.pop(key, None)

    @classmethod
    def from_checkpoints(cls, checkpoints: Mapping[str, str | Path], **options: Any) -> MultiTask:
        """The multi-task model of trained task checkpoints that share one backbone (in eval mode); the backbone
        options come from the checkpoints, ``options`` are further ``MultiTask`` options."""
        paths = {name: str(path) for name, path in checkpoints.items()}
        if not paths:
            raise MultiTaskError("from_checkpoints needs at least one task checkpoint")
        first = next(iter(paths.values()))
        saved = read_checkpoint(first).get("hyper_parameters", {})
        backbone = {key: saved[key] for key in BACKBONE_OPTIONS if key in saved}
        return cls(checkpoints=paths, **{**backbone, **options}).eval()

    # ------------------------------------------------------------------ model
    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=0)
        hp = self.hparams
        shared = {key: hp[key] for key in BACKBONE_OPTIONS}
        built: dict[str, BaseTask] = {}
        first_body: tuple[str, dict[str, torch.Tensor]] | None = None
        for name, spec in self._specs.items():
            task_cls = _task_class(spec["class_path"], self._sources[name])
            init_args = {**spec["init_args"], **shared, "weights": None}
            # the fit-wide options act on the shared body through this model, never through a task
            init_args |= {"freeze_backbone_epochs": 0, "precise_bn_batches": 0, "folded_bn_batches": 0}
            try:
                # an empty context (see instantiate_spec)
                task = contextvars.Context().run(task_cls, **init_args)
            except TypeError as error:
                raise MultiTaskError(
                    f"{self._sources[name]}: cannot build {task_cls.__name__}: {error}"
                ) from error
            if name in self._states:
                task.load_state_dict(self._states[name])
                body = _body_state(task.backbone)
                if first_body is None:
                    first_body = (self._sources[name], body)
                    self.backbone.load_state_dict(body, strict=False)
                else:
                    self._check_same_body(self._sources[name], body, *first_body)
            if task.normalization != self.normalization:
                raise MultiTaskError(
                    f"{self._sources[name]}: normalisation (mean, std) {task.normalization} differs from the "
                    f"shared backbone's {self.normalization}"
                )
            # the task's MobileNet runs on the shared body: its own forward, export and profile stay whole
            task.backbone.stem = self.backbone.stem
            task.backbone.blocks = self.backbone.blocks
            built[name] = task
        self.tasks = nn.ModuleDict(built)
        taps: list[str] = []
        outputs: dict[str, str] = {}
        for name, task in built.items():
            head = task.task_head()
            for tap in head.taps:
                if tap not in self.backbone.tap_names:
                    raise MultiTaskError(
                        f"{self._sources[name]}: the head reads the backbone tap {tap!r}, which this backbone "
                        f"lacks (it has {self.backbone.tap_names})"
                    )
                if tap not in taps:
                    taps.append(tap)
            for output in self.head_output_names(name, head):
                if output in outputs:
                    raise MultiTaskError(
                        f"{self._sources[name]}: output name {output!r} is also an output of task {outputs[output]!r}"
                    )
                outputs[output] = name
            # the task logs into this model's logs, under its own name
            object.__setattr__(task, "log", functools.partial(self._log_for, name))
        # the taps in the body's order: one pass up to the deepest
        self._taps = [tap for tap in self.backbone.tap_names if tap in taps]

    @staticmethod
    def _check_same_body(
        source: str, body: dict[str, torch.Tensor], first_source: str, first: dict[str, torch.Tensor]
    ) -> None:
        for key, value in first.items():
            other = body.get(key)
            if other is None or other.shape != value.shape or not torch.equal(other, value):
                raise MultiTaskError(
                    f"{source}: backbone weight 'backbone.{key}' differs from {first_source}'s: the heads must "
                    "be trained on one shared (frozen) backbone"
                )

    @staticmethod
    def head_output_names(name: str, head: TaskHead) -> list[str]:
        """The outputs of task ``name`` in this model's export: the task's name for a one-output head, else
        ``<task>_<output>``."""
        if len(head.output_names) == 1:
            return [name]
        return [f"{name}_{output}" for output in head.output_names]

    def heads(self) -> dict[str, TaskHead]:
        """Each task's head, now (a classifier's head changes when it learns its class count at setup)."""
        return {name: task.task_head() for name, task in self.tasks.items()}

    def forward(self, images: torch.Tensor | dict[str, Any]) -> dict[str, Any]:
        """One pass of the shared body, then every head: task name → the head's outputs. A dict of each task's
        own inputs (``batch_inputs`` of a combined batch) runs each task's head on its own images."""
        if isinstance(images, dict):
            return {name: self.run_head(name, inputs) for name, inputs in images.items()}
        maps = self.backbone.forward_taps(images, self._taps)
        return {name: head.forward(maps) for name, head in self.heads().items()}

    def run_head(self, name: str, inputs: Any) -> Any:
        """The head outputs of task ``name`` for a batch's inputs (its own data, through its backbone input)."""
        task = self.tasks[name]
        head = task.task_head()
        images = task.backbone_inputs(inputs)
        return head.forward(self.backbone.forward_taps(images, head.taps))

    def profile(self) -> Profile:
        """Mult-adds and parameters of the shared model: one body, every head."""
        return super().profile()

    def separate_profiles(self) -> dict[str, Profile]:
        """Each task as its own model (its own copy of the body and its head), as the tasks profile alone."""
        return {name: task.profile() for name, task in self.tasks.items()}

    # ------------------------------------------------------------------ logging and trainer
    def _log_for(self, task: str, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """A task's ``log`` (its parameters are ``LightningModule.log``'s): into this model's logs as
        ``<task>/<name>``."""
        kwargs["add_dataloader_idx"] = False  # the task name says which loader
        self.log(f"{task}/{name}", value, *args, **kwargs)

    @property
    def trainer(self) -> pl.Trainer:
        return pl.LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        pl.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        for name, task in self.tasks.items():
            task._trainer = _TaskTrainer(trainer, name) if trainer is not None else None  # type: ignore[assignment]

    def _data(self) -> MultiDataModule | None:
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return data if isinstance(data, MultiDataModule) else None

    def _stage_tasks(self, stage: str) -> list[str]:
        """The tasks that have data for ``stage`` (every task in predict)."""
        data = self._data()
        if stage == "predict" or data is None:
            return list(self.tasks)
        return [name for name in self.tasks if name in data.loaders.get(stage, data.datamodules)]

    def setup(self, stage: str) -> None:
        for task in self.tasks.values():
            task.setup(stage)

    # ------------------------------------------------------------------ steps
    def batch_inputs(self, batch: Any) -> Any:
        """A combined training batch's inputs per task; a folder batch's images."""
        if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[0], dict):
            batch = batch[0]  # iterating a CombinedLoader yields (batch, index, loader index)
        if isinstance(batch, dict) and set(batch) <= set(self.tasks) and batch:
            return {name: self.tasks[name].batch_inputs(sub) for name, sub in batch.items()}
        return super().batch_inputs(batch)

    def backbone_inputs(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            return torch.cat([self.tasks[name].backbone_inputs(x) for name, x in inputs.items()])
        return inputs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        total: torch.Tensor | None = None
        for name, sub in batch.items():
            if sub is None:  # a shorter loader already ended ("max_size" mode)
                continue
            task = self.tasks[name]
            loss = task.head_step(sub, self.run_head(name, task.batch_inputs(sub)), "train")
            if loss is None:
                continue
            weighted = self.loss_weights[name] * loss
            total = weighted if total is None else total + weighted
        if total is None:
            raise MultiTaskError("a training batch gave no task loss")
        # one joint loss per step (the tasks' batches differ in size): the epoch value is the mean over steps
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=1)
        return total

    def _eval_step(self, batch: Any, dataloader_idx: int, stage: Stage) -> None:
        data = self._data()
        names = data.loader_names(stage) if data is not None else list(self.tasks)
        name = names[dataloader_idx]
        task = self.tasks[name]
        task.head_step(batch, self.run_head(name, task.batch_inputs(batch)), stage)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def head_outputs(self, images: torch.Tensor) -> dict[str, Any]:
        """Every head's outputs for a folder batch: this model's forward, or the attached export's outputs
        grouped by task."""
        network = self.exported_network
        if network is None:
            return self(images)
        outputs = network(images)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grouped: dict[str, Any] = {}
        position = 0
        for name, head in self.heads().items():
            count = len(head.output_names)
            part = outputs[position : position + count]
            grouped[name] = part[0] if count == 1 else tuple(part)
            position += count
        return grouped

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """One body pass for the batch, then every task's prediction files from its head's outputs."""
        outputs = self.head_outputs(batch["image"])
        return {name: self.tasks[name].head_predict(batch, out) for name, out in outputs.items()}

    # ------------------------------------------------------------------ hooks every task keeps
    def _each(self, hook: str, stage: str) -> None:
        for name in self._stage_tasks(stage):
            getattr(self.tasks[name], hook)()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._each("on_train_epoch_start", "train")

    def on_validation_epoch_start(self) -> None:
        self._each("on_validation_epoch_start", "val")

    def on_validation_epoch_end(self) -> None:
        self._each("on_validation_epoch_end", "val")

    def on_test_epoch_start(self) -> None:
        self._each("on_test_epoch_start", "test")

    def on_test_epoch_end(self) -> None:
        self._each("on_test_epoch_end", "test")

    def on_predict_epoch_start(self) -> None:
        self._each("on_predict_epoch_start", "predict")

    def on_predict_epoch_end(self) -> None:
        self._each("on_predict_epoch_end", "predict")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        hyper_parameters = checkpoint.get("hyper_parameters")
        if isinstance(hyper_parameters, dict):
            # the checkpoint holds every head: it is rebuilt from the specs, not from the task checkpoints
            tasks = {}
            for name, spec in self._specs.items():
                task = self.tasks[name]
                init_args = dict(task.hparams)  # what the task learnt at setup too (class names, ...)
                for key in (*BACKBONE_OPTIONS, *FIT_OPTIONS, *task.output_options):
                    init_args.pop(key, None)
                tasks[name] = {"class_path": spec["class_path"], "init_args": init_args}
            hyper_parameters["tasks"] = tasks
            hyper_parameters["checkpoints"] = None

    # ------------------------------------------------------------------ export
    def export_module(self) -> nn.Module:
        return MultiTaskOutputs(self).eval()

    def export_output_names(self) -> list[str]:
        return [
            output for name, head in self.heads().items() for output in self.head_output_names(name, head)
        ]

    def export_record(self) -> ExportMetadata:
        """The shared input and normalisation, the output names, and every task's own record under
        ``<task>.<key>``."""
        properties = {
            "heads": json.dumps(list(self.tasks)),
            "output_names": json.dumps(self.export_output_names()),
            # every output is compared by cosine after int8 quantisation: one kind for mixed heads
            "output_kind": "detection",
        }
        for name, task in self.tasks.items():
            properties |= {f"{name}.{key}": value for key, value in task.export_metadata().items()}
        return super().export_record().with_properties(**properties)

    def adopt_export(self, path: Path, metadata: ExportMetadata, network: nn.Module) -> None:
        """Every task adopts its own part of the export's metadata (``<task>.<key>``)."""
        heads = json.loads(metadata.properties.get("heads", "[]"))
        if list(heads) != list(self.tasks):
            raise ExportMismatchError(
                f"{path}: metadata key 'heads': this config has the tasks {list(self.tasks)}, the export {heads}"
            )
        names = json.loads(metadata.properties.get("output_names", "[]"))
        if names != self.export_output_names():
            raise ExportMismatchError(
                f"{path}: metadata key 'output_names': expected {self.export_output_names()}, found {names}"
            )
        full = metadata.to_properties()
        for name, task in self.tasks.items():
            prefix = f"{name}."
            own = {key[len(prefix) :]: value for key, value in full.items() if key.startswith(prefix)}
            record = ExportMetadata.from_properties(own, f"{path} ({name})")
            if record.task != type(task).__name__:
                raise ExportMismatchError(
                    f"{path}: metadata key '{name}.task': this config's task is {type(task).__name__}, "
                    f"the export's {record.task}"
                )
            task.adopt_export(path, record, nn.Module())


class MultiTaskOutputs(nn.Module):
    """The exportable multi-task network: an image batch in, every head's outputs out, as one flat tuple in
    the order of ``MultiTask.export_output_names``."""

    def __init__(self, model: MultiTask) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat: list[torch.Tensor] = []
        for out in self.model(images).values():
            flat += list(out) if isinstance(out, tuple | list) else [out]
        return tuple(flat)


# --------------------------------------------------------------------------- data
class MultiDataModule(BaseDataModule):
    """One datamodule per task of a ``MultiTask``: training batches of every task together (Lightning's
    ``CombinedLoader``, a dict ``task → batch``), evaluation loaders one after the other, and a plain image
    folder (``predict_dir``) for predict, where every head sees the same images.

    Args:
        datamodules: task name → ``{"class_path": ..., "init_args": {...}}`` of the task's datamodule (its
            ``input_size``, ``mean`` and ``std`` are this module's, linked from the model).
        mode: how training loaders of different lengths combine: ``max_size_cycle`` (an epoch is the longest
            loader; shorter ones restart), ``min_size`` (the shortest) or ``max_size`` (ended loaders give None).
        **kwargs: ``BaseDataModule`` options (``input_size``, ``mean``, ``std``; ``predict_dir``,
            ``batch_size`` and ``num_workers`` of the predict folder).
    """

    def __init__(
        self,
        datamodules: dict[str, dict[str, Any]] | None = None,
        mode: CombineMode = "max_size_cycle",
        input_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        mean: tuple[float, float, float] = DEFAULT_MEAN,
        std: tuple[float, float, float] = DEFAULT_STD,
        predict_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(input_size, batch_size, num_workers, mean, std, predict_dir, seed)
        shared = {"input_size": input_size, "mean": tuple(mean), "std": tuple(std)}
        self.datamodules: dict[str, pl.LightningDataModule] = {}
        for name, spec in (datamodules or {}).items():
            where = f"data.init_args.datamodules.{name}"
            if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
                raise MultiTaskError(f"{where}: expected a mapping with class_path and init_args")
            stated = sorted(set(spec.get("init_args") or {}) & set(shared))
            if stated:
                raise MultiTaskError(f"{where}.init_args.{stated[0]}: comes from the model; remove it here")
            self.datamodules[name] = instantiate_spec(pl.LightningDataModule, spec, where, **shared)
        self.mode = mode
        self.loaders: dict[str, dict[str, Any]] = {}

    def loader_names(self, stage: str) -> list[str]:
        """The tasks of the stage's loaders, in loader order (``dataloader_idx``)."""
        return list(self.loaders.get(stage, {}))

    def prepare_data(self) -> None:
        for data in self.datamodules.values():
            data.prepare_data()

    def setup(self, stage: str) -> None:
        for data in self.datamodules.values():
            data.trainer = self.trainer
            if stage != "predict":
                data.setup(stage)

    def _children(self, stage: str, hook: str) -> dict[str, Any]:
        self.loaders[stage] = {name: getattr(data, hook)() for name, data in self.datamodules.items()}
        return self.loaders[stage]

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader(self._children("train", "train_dataloader"), mode=self.mode)

    def val_dataloader(self) -> CombinedLoader:
        return CombinedLoader(self._children("val", "val_dataloader"), mode="sequential")

    def test_dataloader(self) -> CombinedLoader:
        return CombinedLoader(self._children("test", "test_dataloader"), mode="sequential")

    def predict_dataloader(self) -> Any:
        if not self.predict_dir:
            raise MultiTaskError(
                "predict needs data.init_args.predict_dir: a folder of images every head sees"
            )
        paths = images_in_folder(self.predict_dir, "predict_dir", MultiTaskError)
        transform = ClassificationTransform(self.input_size, train=False, mean=self.mean, std=self.std)
        return self._loader(ImageListDataset(paths, None, transform))

    def state_dict(self) -> dict[str, Any]:
        return {name: data.state_dict() for name, data in self.datamodules.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, data in self.datamodules.items():
            if name in state_dict:
                data.load_state_dict(state_dict[name])
