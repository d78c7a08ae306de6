"""The demo's configs: a shipped ``configs/*.yaml`` plus a small overrides dict, so a broken recipe fails the demo.

Every step fine-tunes from the built-in ImageNet weights (``OFFICIAL_WEIGHTS``): Google's 0.25 MobileNet-128,
which needs ReLU6, TF "SAME" padding and inputs in [-1, 1] (the tasks' default normalisation). TFLite folds
batch norm; the task re-estimates its statistics on training batches before the first step
(``folded_bn_batches``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from mobilenets.configs import config_path

#: model options for the built-in weights ``official:0.25_128``
OFFICIAL_WEIGHTS: dict[str, Any] = {
    "weights": "official:0.25_128",
    "width_mult": 0.25,
    "activation": "relu6",
    "padding": "tf",
}


def merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: nested dicts merge key by key, any other value (lists too)
    replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def quiet_trainer(
    root_dir: str, epochs: int, callbacks: list[dict[str, Any]] | None = None, **settings: Any
) -> dict[str, Any]:
    """Trainer overrides of a demo step: its folder and epochs, no progress bar, model summary or sanity
    validation; ``callbacks`` replace the recipe's (None keeps them); ``settings`` are further trainer
    options."""
    trainer: dict[str, Any] = {
        "default_root_dir": root_dir,
        "max_epochs": epochs,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **settings,
    }
    if callbacks is not None:
        trainer["callbacks"] = callbacks
    return trainer


def shipped_config(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The shipped config ``name`` with ``overrides`` applied. A recipe callback's fixed ``dirpath`` (relative to
    the user's working directory) moves to ``<default_root_dir>/checkpoints`` of the merged config."""
    config = merge_config(yaml.safe_load(config_path(name).read_text()), overrides)
    trainer = config.get("trainer") or {}
    root_dir = trainer.get("default_root_dir")
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") or {}
        if root_dir and init_args.get("dirpath") and not Path(init_args["dirpath"]).is_absolute():
            callback["init_args"] = {**init_args, "dirpath": str(Path(root_dir) / "checkpoints")}
    return config


def last_checkpoint(cli: Any) -> str:
    """The checkpoint a demo step evaluates after ``fit``: its latest epoch (``last.ckpt``)."""
    callback = cli.trainer.checkpoint_callback
    return callback.last_model_path or str(Path(callback.dirpath) / "last.ckpt")


@contextmanager
def quick_threads(quick: bool) -> Iterator[None]:
    """One intra-op thread for a ``--quick`` step: its α 0.25 models on small inputs are ~20x slower on two
    contended threads than on one (the tests run beside other work)."""
    threads = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
