"""The suite's LightningCLI: ``predict`` also serves an exported ``.onnx`` given as ``ckpt_path``.

Its own module so that ``mobilenets --help`` does not import Lightning, and so that the class pickles
(DDP's spawned processes need it at module level).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from mobilenets.tasks.base import BaseTask


def is_exported_model(path: Any) -> bool:
    """Whether a ``--ckpt_path`` names an exported ONNX model (float or int8) rather than a checkpoint."""
    return isinstance(path, str | PurePath) and str(path).lower().endswith(".onnx")


class SuiteCLI(LightningCLI):
    """``predict --ckpt_path model.onnx``: the config builds the task and its data as usual, without its
    ImageNet ``weights`` (the export holds the trained network), the task checks and adopts the export
    (``BaseTask.use_exported``) and its predict loop runs on ONNX Runtime, writing the same files."""

    exported_path: str | None = None

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else None
        ckpt_path = section.get("ckpt_path") if section is not None else None
        if not is_exported_model(ckpt_path):
            return
        if subcommand != "predict":
            raise ValueError(
                f"{ckpt_path}: an exported .onnx model serves 'predict' only; '{subcommand}' needs the "
                "task's .ckpt checkpoint"
            )
        self.exported_path = str(ckpt_path)
        # Lightning would read the file as a checkpoint (its hyperparameters, then its weights)
        section.ckpt_path = None
        init_args = section.get("model.init_args")
        if init_args is not None and "weights" in init_args:
            init_args.weights = None

    def before_predict(self) -> None:
        if self.exported_path is not None:
            metadata = self.model.use_exported(self.exported_path)
            quantized = f", {metadata['quantization']}" if metadata.get("quantization") else ""
            print(f"predicting with {self.exported_path} (ONNX Runtime{quantized})")


def lightning_cli(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True) -> Any:
    """Run LightningCLI with the suite's base classes (any task, any datamodule, by class_path); ``predict``
    takes a checkpoint or an exported ``.onnx`` as ``ckpt_path``."""
    return SuiteCLI(
        BaseTask,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
