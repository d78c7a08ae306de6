"""ImageClassifier end to end through the CLI: configs, learning, test/predict outputs, resume, DDP."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml

from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.synthetic.folder import make_image_folder
from mobilenets.datasets.synthetic.stanford_dogs import make_stanford_dogs
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.classification import ClassNamesError, ImageClassifier
from mobilenets.tasks.cli import main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.cli.profile import instantiate_model_from_config

# tiny models run fastest on one thread (two contend badly on a shared 2-core runner)
pytestmark = pytest.mark.usefixtures("one_thread")

DOGS_CONFIG_DIR = sorted(CONFIG_DIR.glob("dogs_*.yaml"))
TABLE10 = {
    "dogs_1.0_224": (569, 3.3),
    "dogs_0.75_224": (325, 1.9),
    "dogs_1.0_192": (418, 3.3),
    "dogs_0.75_192": (239, 1.9),
}


@pytest.fixture(scope="module")
def dogs(tmp_path_factory: pytest.TempPathFactory):
    return make_stanford_dogs(
        tmp_path_factory.mktemp("dogs"), num_classes=3, train_per_class=8, test_per_class=3, size=(64, 48)
    )


def tiny_config(root: Path, data_root: Path, **model: Any) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(root)},
            },
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True},
                }
            ],
        },
        "model": {
            "class_path": "mobilenets.tasks.classification.ImageClassifier",
            "init_args": {"width_mult": 0.25, "input_size": 32, "optimizer": "adamw", "lr": 0.003, **model},
        },
        "data": {
            "class_path": "mobilenets.datasets.stanford_dogs.StanfordDogsDataModule",
            "init_args": {"root": str(data_root), "batch_size": 8, "num_workers": 0},
        },
    }


@pytest.mark.parametrize("config", DOGS_CONFIG_DIR, ids=lambda p: p.stem)
def test_configs_reproduce_table10_counts(config: Path) -> None:
    model = instantiate_model_from_config(config, {"weights": None})
    paper_madds, paper_params = TABLE10[config.stem]
    assert model.paper_figures() == (paper_madds, paper_params)
    profile = model.profile()
    assert abs(profile.million_mult_adds - paper_madds) / paper_madds < 0.01
    assert abs(profile.million_parameters - paper_params) / paper_params < 0.01 + 0.05 / paper_params
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    if init_args["width_mult"] == 1.0:  # timm weights: PyTorch padding, ReLU6 (timm's mobilenetv1_100)
        assert init_args["weights"] == "weights/mobilenetv1_100.safetensors"
        assert (init_args["padding"], init_args["activation"]) == ("torch", "relu6")
    else:  # Keras weights: TF "SAME" padding, ReLU6, BN eps 1e-3
        assert init_args["weights"] == f"weights/mobilenet_7_5_{init_args['input_size']}_tf.h5"
        assert (init_args["padding"], init_args["activation"], init_args["bn_eps"]) == ("tf", "relu6", 0.001)
    assert model.hparams.num_classes == 120


def test_profile_command_prints_table10(capsys) -> None:
    assert main(["profile", "--config", str(CONFIG_DIR / "dogs_1.0_224.yaml")]) == 0
    out = capsys.readouterr().out
    assert "dogs_1.0_224" in out and "569" in out and "3.3" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [*DOGS_CONFIG_DIR, CONFIG_DIR / "folder_finetune.yaml"], ids=lambda p: p.stem
)
def test_each_config_runs_fit_test_predict(config: Path, dogs, tmp_path: Path) -> None:
    if config.stem == "folder_finetune":
        data_root = make_image_folder(tmp_path / "folder", ["a", "b", "c"], per_class=4, size=(48, 40))
        predict_dir = data_root / "b"
    else:
        data_root, predict_dir = dogs.root, dogs.root / "Images" / "n02085620-Chihuahua"
    common = [
        "--config", str(config),
        "--model.init_args.width_mult", "0.25",
        "--model.init_args.input_size", "32",
        "--model.init_args.weights", "null",
        "--model.init_args.num_classes", "null",
        "--data.init_args.root", str(data_root),
        "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.fast_dev_run", "1",
    ]  # fmt: skip
    assert main(["fit", *common]) == 0
    assert main(["test", *common]) == 0
    out = tmp_path / "predictions.csv"
    predict = [
        "--data.init_args.predict_dir",
        str(predict_dir),
        "--model.init_args.predictions_file",
        str(out),
    ]
    assert main(["predict", *common, *predict]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4  # fast_dev_run predicts one batch
    assert all(Path(row["path"]).parent == predict_dir for row in rows)
    assert rows[0]["class1_name"] in ("a", "b", "c", "Chihuahua", "Japanese spaniel", "Maltese dog")


@pytest.mark.slow
def test_test_and_predict_write_reports_with_class_names(dogs, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path / "fit", dogs.root)
    config["trainer"]["max_epochs"] = 1
    fitted = lightning_cli({"fit": config})
    checkpoint = (
        fitted.trainer.checkpoint_callback.last_model_path
        or fitted.trainer.checkpoint_callback.best_model_path
    )
    assert checkpoint

    # the checkpoint alone rebuilds the classifier with its class names (no datamodule needed)
    restored = BaseTask.load_task(checkpoint)
    assert isinstance(restored, ImageClassifier)
    assert restored.hparams.class_names == dogs.class_names
    image = torch.zeros(1, 3, 32, 32)
    fitted.model.eval()
    assert torch.allclose(restored(image), fitted.model(image), atol=1e-5)
    assert '"Chihuahua"' in restored.export_metadata()["class_names"]

    tested = lightning_cli({"test": {**tiny_config(tmp_path / "test", dogs.root), "ckpt_path": checkpoint}})
    out = capsys.readouterr().out
    assert "Top-1" in out and "Million Mult-Adds" in out and "0.25 MobileNet-32 (ours)" in out
    log_dir = Path(tested.trainer.log_dir)
    per_class = list(csv.DictReader((log_dir / "per_class_accuracy.csv").open()))
    assert [row["class_name"] for row in per_class] == dogs.class_names
    assert sum(int(row["images"]) for row in per_class) == dogs.num_test
    assert (log_dir / "confusion_matrix.png").stat().st_size > 1000

    predict_config = tiny_config(tmp_path / "predict", dogs.root, predictions_file=str(tmp_path / "top5.csv"))
    listing = tmp_path / "list.txt"
    images = sorted((dogs.root / "Images").rglob("*.jpg"))[:5]
    listing.write_text("\n".join(str(p) for p in images))
    predict_config["data"]["init_args"]["predict_list"] = str(listing)
    lightning_cli({"predict": {**predict_config, "ckpt_path": checkpoint}})
    rows = list(csv.DictReader((tmp_path / "top5.csv").open()))
    assert [row["path"] for row in rows] == [str(p) for p in images]
    first = rows[0]
    names = [first[f"class{k}_name"] for k in (1, 2, 3)]
    assert sorted(names) == sorted(dogs.class_names)  # 3 classes: top-k holds each once
    probabilities = [float(first[f"class{k}_probability"]) for k in (1, 2, 3)]
    assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-3


def test_class_count_mismatch_is_explained(dogs, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, dogs.root, num_classes=120)
    config["trainer"]["fast_dev_run"] = 1
    with pytest.raises(ClassNamesError, match=r"the model has 120 classes but the data has 3"):
        lightning_cli({"fit": config})
    with pytest.raises(ClassNamesError, match=r"num_classes is 2 but 3 class_names"):
        ImageClassifier(num_classes=2, class_names=["a", "b", "c"], width_mult=0.25, input_size=32)


def _fit(config: dict[str, Any], ckpt_path: str | None = None) -> pl.Trainer:
    arguments: dict[str, Any] = {"fit": copy.deepcopy(config)}
    if ckpt_path:
        arguments["fit"]["ckpt_path"] = ckpt_path
    return lightning_cli(arguments).trainer


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(dogs, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "straight", dogs.root, freeze_backbone_epochs=1, warmup_epochs=0.5)
    config["trainer"]["max_epochs"] = 3
    straight = _fit(config)

    interrupted = copy.deepcopy(config)
    interrupted["trainer"]["default_root_dir"] = str(tmp_path / "resumed")
    interrupted["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "resumed")
    interrupted["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "resumed" / "checkpoints")
    killed = copy.deepcopy(interrupted)  # same max_epochs (and so the same LR schedule), stopped early
    killed["trainer"]["callbacks"].append(
        {"class_path": f"{__name__}.StopAfterEpochs", "init_args": {"epochs": 1}}
    )
    first = _fit(killed)
    assert first.current_epoch == 1 and (tmp_path / "resumed" / "checkpoints" / "last.ckpt").is_file()
    resumed = _fit(interrupted, ckpt_path="last")  # found in the checkpoint callback's dirpath

    assert (resumed.global_step, resumed.current_epoch) == (straight.global_step, straight.current_epoch)
    for key in ("val/top1", "val/loss", "train/loss_epoch"):
        assert torch.allclose(resumed.callback_metrics[key], straight.callback_metrics[key], atol=1e-5), key
    straight_state = straight.lightning_module.state_dict()
    for name, value in resumed.lightning_module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, straight_state[name], atol=1e-5), name


class StopAfterEpochs(pl.Callback):
    """Stops a run after ``epochs`` epochs, as if it had been killed there."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class IndexRecorder(pl.Callback):
    """Writes the sample indices each process trains on to ``<folder>/rank<r>.txt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"rank{trainer.global_rank}.txt").open("a") as handle:
            handle.write("".join(f"{i}\n" for i in batch["index"].tolist()))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_train_on_their_own_shards(dogs, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "ddp", dogs.root)
    config["trainer"].update(max_epochs=1, devices=2, strategy="ddp_spawn")
    config["trainer"]["callbacks"] = [
        {"class_path": f"{__name__}.IndexRecorder", "init_args": {"folder": str(tmp_path / "seen")}},
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ddp" / "checkpoints"), "save_last": True},
        },
    ]
    config["data"]["init_args"].update(batch_size=4, val_fraction=0.25)
    fitted = lightning_cli({"fit": config})
    seen = {
        rank: [int(x) for x in (tmp_path / "seen" / f"rank{rank}.txt").read_text().split()] for rank in (0, 1)
    }
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1]), "the two processes trained on overlapping samples"
    checkpoint = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    test_config = tiny_config(tmp_path / "after", dogs.root)
    tested = lightning_cli({"test": {**test_config, "ckpt_path": str(checkpoint)}})
    assert 0.0 <= float(tested.trainer.callback_metrics["test/top1"]) <= 1.0
    assert fitted.trainer.world_size == 2


@pytest.mark.slow
def test_demo_fits_generated_breeds_far_above_chance(tmp_path: Path) -> None:
    """The demo step fits on generated Stanford-Dogs-layout data, then tests and predicts."""
    from mobilenets.tasks.cli.demo.classification import run_demo

    rows = run_demo(tmp_path, quick=True)
    val_top1 = float(rows[0].value.split("%")[0])
    assert val_top1 >= 60.0, f"val top-1 {val_top1}% with 4 classes (chance 25%)"
    assert rows[1].metric.startswith("test top-1") and rows[1].baseline == "25.0% (chance)"
    assert "569M" in rows[3].paper and rows[3].value.startswith("568M / 3.33M")
    predictions = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(predictions) == 4 * (24 + 8)
    assert {row["class1_name"] for row in predictions} <= {
        "Chihuahua",
        "Japanese spaniel",
        "Maltese dog",
        "Pekinese",
    }


def test_top5_stays_its_own_metric_after_an_all_correct_first_batch() -> None:
    metrics = ImageClassifier(num_classes=6, width_mult=0.25, input_size=32).configure_metrics()
    target = torch.tensor([0, 1, 2, 3])
    metrics.update(torch.eye(6)[target] * 5, target)  # all right at top-1 (and so at top-5)
    wrong_at_top1 = torch.tensor([[0.0, 3.0, 2.0, 0.0, 0.0, 0.0]] * 4)  # class 2 ranked second
    metrics.update(wrong_at_top1, torch.tensor([2, 2, 2, 2]))
    values = metrics.compute()
    assert values["top1"].item() == pytest.approx(0.5)
    assert values["top5"].item() == pytest.approx(1.0)
