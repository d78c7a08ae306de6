"""The suite's LightningCLI: the data's ``input_size`` and normalisation come from the model (a config states
them once), every run writes ``<default_root_dir>/checkpoints/last.ckpt`` each epoch so that
``fit --ckpt_path last`` resumes it, and ``predict`` also serves an exported ``.onnx`` given as ``ckpt_path``.

Its own module so that ``mobilenets --help`` does not import Lightning, and so that the class pickles
(DDP's spawned processes need it at module level).
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from mobilenets.backbone.errors import ConfigError
from mobilenets.datasets.atomic import atomic_path
from mobilenets.tasks.base import BaseTask

#: Imported before parsing so that LightningCLI resolves short class names (``--model ImageClassifier``,
#: ``--model.help ImageClassifier``, ``--data CocoDataModule``): it only knows subclasses already imported.
TASK_AND_DATA_MODULES = (
    "mobilenets.tasks.classification",
    "mobilenets.tasks.attributes",
    "mobilenets.tasks.geolocation",
    "mobilenets.tasks.detection",
    "mobilenets.tasks.faces.embedding",
    "mobilenets.datasets.folder",
    "mobilenets.datasets.stanford_dogs",
    "mobilenets.datasets.coco",
    "mobilenets.datasets.celeba",
    "mobilenets.datasets.geotags",
    "mobilenets.datasets.faces",
)


def is_exported_model(path: Any) -> bool:
    """Whether a ``--ckpt_path`` names an exported ONNX model (float or int8) rather than a checkpoint."""
    return isinstance(path, str | PurePath) and str(path).lower().endswith(".onnx")


log = logging.getLogger(__name__)

#: The data settings the CLI links from the model (``SuiteCLI.add_arguments_to_parser``).
LINKED_DATA_KEYS = ("input_size", "mean", "std")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def normalization_mean(model: BaseTask) -> tuple[float, ...]:
    """The mean the model normalises its inputs with (what its data must use)."""
    return tuple(model.normalization[0])


def normalization_std(model: BaseTask) -> tuple[float, ...]:
    """The std the model normalises its inputs with (what its data must use)."""
    return tuple(model.normalization[1])


def _load_yaml(value: Any) -> Any:
    """A config given as a YAML/JSON string or as the path of a file (anything else as it is)."""
    if not isinstance(value, str | PurePath):
        return value
    path = Path(value)
    try:
        if path.is_file():
            return yaml.safe_load(path.read_text())
    except OSError:
        return None
    try:
        return yaml.safe_load(str(value))
    except yaml.YAMLError:
        return None


def _data_keys_in(config: Any) -> Iterator[str]:
    """The linked keys a config dict (or one of its subcommand sections) sets under ``data``."""
    if not isinstance(config, dict):
        return
    for subcommand in SUBCOMMANDS:
        yield from _data_keys_in(config.get(subcommand))
    data = _load_yaml(config.get("data"))
    if not isinstance(data, dict):
        return
    init_args = data.get("init_args")
    for section, prefix in ((data, "data."), (init_args, "data.init_args.")):
        if isinstance(section, dict):
            yield from (prefix + key for key in LINKED_DATA_KEYS if key in section)


def linked_data_settings(args: Sequence[str] | dict[str, Any] | None) -> list[str]:
    """``source: key`` for every data setting the CLI links from the model that ``args`` also sets: in a
    dict config, a ``--config`` file, a ``--data`` value or a ``--data.[init_args.]<key>`` option."""
    if isinstance(args, dict):
        return [f"the config: {key}" for key in _data_keys_in(args)]
    found: list[str] = []
    tokens = list(args if args is not None else sys.argv[1:])
    for position, token in enumerate(tokens):
        if not isinstance(token, str) or not token.startswith("--"):
            continue
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            value = tokens[position + 1] if position + 1 < len(tokens) else ""
        if name == "config":
            found += [f"{value}: {key}" for key in _data_keys_in(_load_yaml(value))]
        elif name == "data":
            found += [f"--data: {key}" for key in _data_keys_in({"data": _load_yaml(value)})]
        elif name in {f"data.{key}" for key in LINKED_DATA_KEYS} | {
            f"data.init_args.{key}" for key in LINKED_DATA_KEYS
        }:
            found.append(f"--{name}")
    return found


def rng_states() -> dict[str, Any]:
    """The states of torch's (CPU and CUDA), NumPy's and Python's global generators, in types that
    ``torch.load(weights_only=True)`` reads back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class LatestCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` into ``dirpath`` at the end of every training epoch, whatever the monitored
    metric did (a ``ModelCheckpoint``'s own ``save_last`` follows its top-k saves), atomically, with the
    random-number generators' states: ``fit --ckpt_path last`` then resumes a killed run from its latest
    epoch and continues as the uninterrupted run would have. The suite's CLI adds one to every trainer.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # distinct from a config's ModelCheckpoint without a monitor (Lightning rejects equal keys)
        return self._generate_state_key(latest=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the latest state is written once per epoch, at its end."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # a run killed while writing must leave the previous last.ckpt, not half of a new one
        if trainer.is_global_zero:
            with atomic_path(filepath) as temporary:
                trainer.save_checkpoint(temporary, self.save_weights_only)
        else:  # only rank 0 writes; the others take part in the collective save
            trainer.save_checkpoint(filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "rng_states" in state_dict:  # dropout and loader seeds continue as in the uninterrupted run
            set_rng_states(state_dict["rng_states"])


def checkpoint_folder(trainer: pl.Trainer) -> str:
    """``<default_root_dir>/checkpoints``: where the suite's checkpoints go unless a callback names its own
    ``dirpath``. Fixed, unlike Lightning's default (the logger's ``version_<n>`` folder, new every run), so
    that ``fit --ckpt_path last`` finds the killed run's ``last.ckpt``."""
    return os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))


class SuiteCLI(LightningCLI):
    """LightningCLI with the data's ``input_size``, ``mean`` and ``std`` linked from the model (stating them
    under data is an error), checkpoints in a fixed folder with a ``LatestCheckpoint``, and
    ``predict --ckpt_path model.onnx``: the config builds the task and its data as usual, without its
    ImageNet ``weights`` (the export holds the trained network), the task checks and adopts the export
    (``BaseTask.use_exported``) and its predict loop runs on ONNX Runtime, writing the same files."""

    exported_path: str | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        # One source for ρ and the normalisation: the model's (``parse_arguments`` rejects a config that
        # also sets them under data: jsonargparse would silently override a subclass's linked argument).
        parser.link_arguments("model.init_args.input_size", "data.init_args.input_size", apply_on="parse")
        parser.link_arguments(
            "model", "data.init_args.mean", compute_fn=normalization_mean, apply_on="instantiate"
        )
        parser.link_arguments(
            "model", "data.init_args.std", compute_fn=normalization_std, apply_on="instantiate"
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        duplicates = linked_data_settings(args)
        if duplicates:
            raise ConfigError(
                f"{duplicates[0]}: data {', '.join(LINKED_DATA_KEYS)} come from the model "
                "(model.init_args.input_size and the model's normalisation); remove them from the data section"
            )
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else None
        ckpt_path = section.get("ckpt_path") if section is not None else None
        if not is_exported_model(ckpt_path):
            return
        if subcommand != "predict":
            raise ConfigError(
                f"{ckpt_path}: an exported .onnx model serves 'predict' only; '{subcommand}' needs the "
                "task's .ckpt checkpoint"
            )
        self.exported_path = str(ckpt_path)
        # Lightning would read the file as a checkpoint (its hyperparameters, then its weights)
        section.ckpt_path = None
        init_args = section.get("model.init_args")
        if init_args is not None and "weights" in init_args:
            init_args.weights = None

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The config's trainer, its checkpoint callbacks without a ``dirpath`` writing to
        ``checkpoint_folder``, plus a ``LatestCheckpoint`` in the first callback's folder."""
        trainer = super().instantiate_trainer(**kwargs)
        if not trainer.loggers:  # --trainer.logger false: a learning-rate monitor has nowhere to log
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        if not callbacks or any(isinstance(c, LatestCheckpoint) for c in callbacks):
            return trainer  # checkpointing disabled, or already there
        for callback in callbacks:
            if callback.dirpath is None:
                callback.dirpath = checkpoint_folder(trainer)
        folder = callbacks[0].dirpath
        for callback in callbacks:
            if callback.save_last and callback.dirpath == folder:
                log.info("%s/last.ckpt is written every epoch by LatestCheckpoint", folder)
                callback.save_last = False  # one writer of last.ckpt (else last-v1.ckpt appears beside it)
        trainer.callbacks.append(LatestCheckpoint(folder))
        return trainer

    def before_predict(self) -> None:
        if self.exported_path is not None:
            metadata = self.model.use_exported(self.exported_path)
            quantized = f", {metadata['quantization']}" if metadata.get("quantization") else ""
            print(f"predicting with {self.exported_path} (ONNX Runtime{quantized})")


def lightning_cli(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True) -> Any:
    """Run LightningCLI with the suite's base classes (any task, any datamodule, by class_path); ``predict``
    takes a checkpoint or an exported ``.onnx`` as ``ckpt_path``."""
    for module in TASK_AND_DATA_MODULES:
        importlib.import_module(module)
    return SuiteCLI(
        BaseTask,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "mobilenets"},  # usage lines say 'mobilenets fit', not '__main__.py'
        args=args,
        run=run,
    )
