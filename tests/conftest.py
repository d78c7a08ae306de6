import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from mobilenets.configs import CONFIG_DIR
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.cli import main

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside data workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def save_checkpoint() -> Callable[[BaseTask, Path], Path]:
    """Write what Lightning's checkpoint holds for predict (weights, hyperparameters, the task-class key)."""

    def save_checkpoint(task: BaseTask, path: Path) -> Path:
        checkpoint: dict[str, Any] = {
            "state_dict": task.state_dict(),
            # LightningCLI's own checkpoints name the class, so that --ckpt_path rebuilds it from any config
            "hyper_parameters": {
                "_class_path": f"{type(task).__module__}.{type(task).__name__}",
                **task.hparams,
            },
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": pl.__version__,
        }
        task.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, path)
        return path

    return save_checkpoint


@pytest.fixture(scope="session")
def read_rows() -> Callable[[Path], list[dict[str, str]]]:
    """The rows of a CSV file as dicts."""

    def read_rows(path: Path) -> list[dict[str, str]]:
        with path.open(newline="") as stream:
            return list(csv.DictReader(stream))

    return read_rows


@pytest.fixture(scope="session")
def run_predict() -> Callable[[str, Path, Path, dict[str, object]], None]:
    """``mobilenets predict`` through the CLI on a shipped config, as the predict tests run it."""

    def run_predict(config: str, model: Path, run: Path, options: dict[str, object]) -> None:
        """``mobilenets predict --config configs/<config>`` with ``options`` (``{"model.init_args.x": v}`` →
        ``--model.init_args.x v``), no loader workers, logger or progress bar, the run under ``run`` and ``model``
        (a .ckpt or an exported .onnx) as ``--ckpt_path``."""
        argv = ["predict", "--config", str(CONFIG_DIR / config)]
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        argv += [
            "--data.init_args.num_workers", "0",
            "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false",
            "--ckpt_path", str(model),
        ]  # fmt: skip
        assert main(argv) == 0

    return run_predict
