"""The suite's LightningCLI: data settings linked from the model, and a killed run that resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from mobilenets.backbone.errors import ConfigError
from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.synthetic.folder import make_image_folder
from mobilenets.tasks.cli.lightning import LatestCheckpoint, lightning_cli

FOLDER_CONFIG = CONFIG_DIR / "folder_finetune.yaml"


def tiny_folder_args(data: Path, run: Path) -> list[str]:
    """The shipped folder config at α 0.25, 32 px, on ``data``, writing under ``run``."""
    return [
        "--config", str(FOLDER_CONFIG),
        "--model.init_args.width_mult", "0.25",
        "--model.init_args.input_size", "32",
        "--model.init_args.weights", "null",
        "--data.init_args.root", str(data),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu",
    ]  # fmt: skip


def test_data_takes_input_size_and_normalisation_from_the_model(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", ["a", "b"], per_class=2, size=(40, 30))
    cli = lightning_cli(tiny_folder_args(tmp_path / "data", tmp_path / "run"), run=False)
    assert cli.datamodule.input_size == cli.model.hparams.input_size == 32
    assert (cli.datamodule.mean, cli.datamodule.std) == tuple(map(tuple, cli.model.normalization))
    assert isinstance(cli.trainer.callbacks[-1], LatestCheckpoint)
    assert cli.trainer.callbacks[-1].dirpath == str((tmp_path / "run" / "checkpoints").resolve())


@pytest.mark.parametrize(
    "extra",
    [
        ["--data.init_args.input_size", "32"],
        ["--data.input_size=32"],
        ["--data.init_args.mean", "[0.4, 0.4, 0.4]"],
    ],
    ids=["init_args", "short", "mean"],
)
def test_data_settings_the_model_states_are_rejected(tmp_path: Path, extra: list[str]) -> None:
    args = ["fit", *tiny_folder_args(tmp_path / "data", tmp_path / "run"), *extra]
    with pytest.raises(ConfigError, match=r"--data\..*: data input_size, mean, std come from the model"):
        lightning_cli(args, run=False)


def test_a_config_file_that_states_data_input_size_is_rejected(tmp_path: Path) -> None:
    config = yaml.safe_load(FOLDER_CONFIG.read_text())
    config["data"]["init_args"]["input_size"] = 224
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"old.yaml: data.init_args.input_size: data input_size"):
        lightning_cli(["fit", "--config", str(path)], run=False)
    with pytest.raises(ConfigError, match=r"the config: data.init_args.input_size"):
        lightning_cli({"fit": config}, run=False)


class ConstantMetric(pl.LightningModule):
    """A tiny regression whose validation metric never improves after the first epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/const", 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_written_every_epoch_whatever_the_metric(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    best = pl.callbacks.ModelCheckpoint(tmp_path, monitor="val/const", mode="max", filename="best")
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[best, LatestCheckpoint(str(tmp_path))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ConstantMetric(), loader, loader)
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 0  # never improved
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert not list(tmp_path.glob(".*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]


KILLER = '''
import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL at the start of batch ``batch`` of epoch ``epoch``: nothing of the run gets to clean up."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", ["a", "b", "c"], per_class=8, size=(48, 40))
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    # one thread everywhere: the three runs must do the same arithmetic; dropout 0.2, a frozen first epoch
    # and the warmup of the shipped config all have to continue exactly
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}

    def fit(run: str, *extra: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "mobilenets.tasks.cli", "fit"]
        argv += [*tiny_folder_args(tmp_path / "data", tmp_path / run), "--trainer.max_epochs", "3"]
        argv += ["--trainer.deterministic", "true", *extra]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(process: subprocess.Popen) -> tuple[int, str]:
        output, _ = process.communicate(timeout=300)
        return process.returncode, output

    kill = [
        "--trainer.callbacks+=killer.KillAt",
        "--trainer.callbacks.epoch=2",
        "--trainer.callbacks.batch=2",
    ]
    straight, killed = fit("straight"), fit("resumed", *kill)  # side by side: each on one thread
    code, output = finish(straight)
    assert code == 0, output[-3000:]
    code, output = finish(killed)
    assert code == -9, output[-3000:]  # SIGKILL in the third epoch, at its third batch
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # written at the end of the second epoch
    code, output = finish(fit("resumed", "--ckpt_path", "last"))
    assert code == 0, output[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in output

    expected = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(last, weights_only=True)
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"]) == (2, 15)
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    different = [k for k, v in expected["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
