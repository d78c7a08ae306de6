"""Batch-norm statistics during a fit, for every task: precise statistics before evaluation, and real
statistics for batch norms whose weights came folded (TFLite sources).

``BatchNormStatistics`` is the one Lightning callback behind two ``BaseTask`` options (``BaseTask``
installs it through ``configure_callbacks``):

- ``precise_bn_batches`` ("precise BN"): before each validation of a fit, and at the end of each training
  epoch not already followed by one, every batch norm's running mean and variance are set to the exact
  average over that many training batches (``backbone.inference.recalibrate_batchnorm``; the network in
  eval mode, its batch norms measuring). Short runs need it: their running averages lag far behind the
  quickly changing weights. Frozen batch norms (``freeze_backbone_epochs``) keep their statistics.
- ``folded_bn_batches``: before the first training step, batch norms that ``load_pretrained`` marked as
  carrying folded weights get statistics measured on that many training batches
  (``backbone.inference.reestimate_folded_batchnorm``); eval-mode outputs stay exactly the same.

Both passes read the training loader separately; the global torch random state is restored afterwards, so
the training run itself draws the same random numbers as without them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader, move_data_to_device
from torch import nn

from mobilenets.backbone.inference import (
    folded_batchnorm_names,
    recalibrate_batchnorm,
    reestimate_folded_batchnorm,
)

if TYPE_CHECKING:
    from mobilenets.tasks.base import BaseTask

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _keep_random_state(device: torch.device) -> Iterator[None]:
    """Restore the global torch generators (CPU, and ``device`` when it is a GPU) on exit: an extra pass over
    a loader draws its shuffling seed, and the training run must not notice it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def training_inputs(task: BaseTask, count: int) -> list[Any]:
    """The forward inputs (``task.batch_inputs``) of the first ``count`` batches of the fit's training
    loader, on the task's device; empty when the trainer has no training loader (yet)."""
    loader = task.trainer.train_dataloader
    if loader is None or count <= 0:
        return []
    if isinstance(loader, dict):  # a combined loader's loaders (a multi-task fit): their batches together
        loader = CombinedLoader(loader, mode="max_size_cycle")
    inputs = []
    for batch in loader:
        inputs.append(task.batch_inputs(move_data_to_device(batch, task.device)))
        if len(inputs) >= count:
            break
    return inputs


def _image_count(inputs: Any) -> int:
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else len(inputs)


class BatchNormStatistics(pl.Callback):
    """Precise batch-norm statistics before evaluation and re-estimated folded ones before training (see the
    module docstring); ``BaseTask.configure_callbacks`` adds it to every fit with the task's two options.

    Args:
        precise_bn_batches: training batches averaged for precise statistics (0: off).
        folded_bn_batches: training batches measured for folded batch norms (0: leave them as loaded).
    """

    def __init__(self, precise_bn_batches: int = 0, folded_bn_batches: int = 0) -> None:
        if precise_bn_batches < 0 or folded_bn_batches < 0:
            raise ValueError(
                f"precise_bn_batches and folded_bn_batches must be >= 0, got {precise_bn_batches} and "
                f"{folded_bn_batches}"
            )
        self.precise_bn_batches = precise_bn_batches
        self.folded_bn_batches = folded_bn_batches
        self._stale = False  # training steps ran since the statistics were last made precise

    # ------------------------------------------------------------------ folded batch norm
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stale = False
        if self.folded_bn_batches > 0:
            self.reestimate_folded(pl_module)  # type: ignore[arg-type]

    def reestimate_folded(self, task: BaseTask) -> int:
        """Re-estimate the backbone's folded batch norms on training batches; returns how many."""
        backbone = task.backbone
        names = folded_batchnorm_names(backbone)
        if not names:
            return 0
        if task.trainer.ckpt_path:
            log.info("resuming from %s: keeping its batch-norm statistics", task.trainer.ckpt_path)
            return 0
        with _keep_random_state(task.device):
            inputs = training_inputs(task, self.folded_bn_batches)
            batches = [task.backbone_inputs(x) for x in inputs]
        if not batches:
            return 0
        reestimate_folded_batchnorm(backbone, batches, names)
        log.info(
            "re-estimated the statistics of %d batch-norm layers with folded weights on %d training images",
            len(names),
            sum(_image_count(b) for b in batches),
        )
        return len(names)

    # ------------------------------------------------------------------ precise batch norm
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stale = True

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.make_precise(pl_module)  # type: ignore[arg-type]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.make_precise(pl_module)  # type: ignore[arg-type]

    def make_precise(self, task: BaseTask) -> None:
        """Set every batch norm's running statistics to the average over ``precise_bn_batches`` training
        batches, if training steps ran since the last time."""
        if self.precise_bn_batches <= 0 or not self._stale:
            return
        with _keep_random_state(task.device):
            inputs = training_inputs(task, self.precise_bn_batches)
            if not inputs:
                return
            modes = {module: module.training for module in task.modules()}
            # frozen batch norms (``MobileNetV1.freeze``: their parameters take no gradient) keep their
            # statistics
            kept = {
                module: {name: buffer.clone() for name, buffer in module.named_buffers(recurse=False)}
                for module in task.modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.weight is not None
                and not module.weight.requires_grad
            }
            # eval mode with measuring batch norms: detectors run their inference path (real proposals reach
            # the box head) and dropout stays off
            task.eval()
            try:
                recalibrate_batchnorm(task, inputs)
            finally:
                for module, training in modes.items():
                    module.training = training
                with torch.no_grad():
                    for module, buffers in kept.items():
                        for name, value in buffers.items():
                            getattr(module, name).copy_(value)
        self._stale = False
