"""Demo step: fine-grained classification on a generated Stanford-Dogs-layout dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mobilenets.datasets.synthetic import make_stanford_dogs
from mobilenets.tasks.classification import STANFORD_DOGS_CLASSES, ImageClassifier
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.lightning import lightning_cli


def run_demo(root: Path, quick: bool) -> list[Any]:
    """Generate a small Stanford-Dogs-layout dataset, fine-tune on it, test and predict (``mobilenets demo``)."""

    root = Path(root)
    threads = torch.get_num_threads()
    if quick:  # a 0.25 MobileNet-48 step is ~20x slower on 2 contended threads than on one
        torch.set_num_threads(1)
    try:
        return _run_demo(root, quick)
    finally:
        torch.set_num_threads(threads)


def _run_demo(root: Path, quick: bool) -> list[Any]:

    # from scratch (no ImageNet weights here): ~70 steps learn 4 classes, ~200 steps 8
    classes, per_class, size, epochs = (4, 32, 48, 12) if quick else (8, 60, 96, 15)
    data = make_stanford_dogs(
        root / "stanford_dogs",
        num_classes=classes,
        train_per_class=per_class,
        test_per_class=8,
        size=(size * 4 // 3, size),
        seed=0,
    )
    runs = root / "runs"
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(runs),
            "accelerator": "auto",  # the GPU where there is one
            "devices": 1,
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(runs)},
            },
            "enable_progress_bar": not quick,
            "enable_model_summary": False,
            "log_every_n_steps": 5,
        },
        "model": {
            "class_path": "mobilenets.tasks.classification.ImageClassifier",
            "init_args": {
                "width_mult": 0.25 if quick else 0.5,
                "input_size": size,
                "optimizer": "adamw",
                "lr": 0.01,
                "weight_decay": 1e-4,
                "label_smoothing": 0.0,
                "warmup_epochs": 0.5,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.stanford_dogs.StanfordDogsDataModule",
            "init_args": {
                "root": str(data.root),
                "input_size": size,
                "batch_size": 16,
                "num_workers": 0 if quick else 2,
                "train_scale": [0.35, 1.0],
                "val_fraction": 0.25,
            },
        },
    }
    cli = lightning_cli({"fit": config})
    val_top1 = float(cli.trainer.callback_metrics["val/top1"])
    checkpoint = (
        cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    )
    tested = lightning_cli({"test": {**config, "ckpt_path": checkpoint}})
    top1 = float(tested.trainer.callback_metrics["test/top1"])
    predict_config = {**config, "ckpt_path": checkpoint}
    predict_config["data"] = {
        **config["data"],
        "init_args": {**config["data"]["init_args"], "predict_dir": str(data.root / "Images")},
    }
    predict_config["model"] = {
        **config["model"],
        "init_args": {**config["model"]["init_args"], "predictions_file": str(root / "predictions.csv")},
    }
    lightning_cli({"predict": predict_config})
    model = tested.model
    profile = model.profile()
    full = ImageClassifier(num_classes=STANFORD_DOGS_CLASSES, width_mult=1.0, input_size=224)
    full_profile = full.profile()
    return [
        DemoRow(
            "classification",
            f"val top-1, {classes} generated breeds (from scratch, {epochs} epochs)",
            f"{100 * val_top1:.1f}% (chance {100 / classes:.0f}%)",
        ),
        DemoRow(
            "classification",
            f"top-1, {classes} generated breeds ({data.num_test} test images)",
            f"{100 * top1:.1f}% (chance {100 / classes:.0f}%)",
            "83.3% (1.0 MobileNet-224, real Stanford Dogs)",
        ),
        DemoRow(
            "classification",
            f"{model.hparams.width_mult:g} MobileNet-{size} MAdds / params",
            f"{profile.million_mult_adds:.1f}M / {profile.million_parameters:.2f}M",
        ),
        DemoRow(
            "classification",
            "1.0 MobileNet-224, 120 classes MAdds / params",
            f"{full_profile.million_mult_adds:.0f}M / {full_profile.million_parameters:.2f}M",
            "569M / 3.3M",
        ),
        DemoRow("classification", "predictions CSV", str(root / "predictions.csv")),
    ]
