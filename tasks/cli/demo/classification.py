"""Demo step: fine-grained classification on a generated Stanford-Dogs-layout dataset, fine-tuned with the
shipped dogs recipe from the built-in ImageNet weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilenets.datasets.synthetic.stanford_dogs import make_stanford_dogs
from mobilenets.tasks.classification import STANFORD_DOGS_CLASSES, ImageClassifier
from mobilenets.tasks.cli.demo.recipe import (
    OFFICIAL_WEIGHTS,
    last_checkpoint,
    quick_threads,
    quiet_trainer,
    shipped_config,
)
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.lightning import lightning_cli

#: the shipped recipe the step runs
RECIPE = "dogs_1.0_224"
#: (classes, train images per class, test images per class, input size, epochs)
FULL = (8, 40, 12, 96, 4)
QUICK = (4, 24, 8, 64, 3)


def demo_config(root: Path, data_root: Path, quick: bool) -> dict[str, Any]:
    """The shipped dogs recipe with the demo's data, size and epochs, from the built-in weights."""
    classes, _, _, size, epochs = QUICK if quick else FULL
    return shipped_config(
        RECIPE,
        {
            "trainer": quiet_trainer(str(root / "runs"), epochs, log_every_n_steps=5),
            "model": {"init_args": {**OFFICIAL_WEIGHTS, "num_classes": classes, "input_size": size}},
            "data": {"init_args": {"root": str(data_root), "batch_size": 32, "num_workers": 0}},
        },
    )


def run_demo(root: Path, quick: bool) -> list[DemoRow]:
    """Generate a small Stanford-Dogs-layout dataset, fine-tune on it, test and predict (``mobilenets demo``)."""
    with quick_threads(quick):
        return _run_demo(Path(root), quick)


def _run_demo(root: Path, quick: bool) -> list[DemoRow]:
    classes, per_class, test_per_class, size, epochs = QUICK if quick else FULL
    data = make_stanford_dogs(
        root / "stanford_dogs",
        num_classes=classes,
        train_per_class=per_class,
        test_per_class=test_per_class,
        size=(size * 4 // 3, size),
        seed=0,
    )
    config = demo_config(root, data.root, quick)
    cli = lightning_cli({"fit": config})
    val_top1 = float(cli.trainer.callback_metrics["val/top1"])
    checkpoint = last_checkpoint(cli)
    tested = lightning_cli({"test": {**config, "ckpt_path": checkpoint}})
    top1 = float(tested.trainer.callback_metrics["test/top1"])
    predictions = root / "predictions.csv"
    lightning_cli(
        {
            "predict": shipped_config(
                RECIPE,
                {
                    **config,
                    "ckpt_path": checkpoint,
                    "data": {"init_args": {"predict_dir": str(data.root / "Images")}},
                    "model": {"init_args": {"predictions_file": str(predictions)}},
                },
            )
        }
    )
    profile = tested.model.profile()
    full_profile = ImageClassifier(
        num_classes=STANFORD_DOGS_CLASSES, width_mult=1.0, input_size=224
    ).profile()
    chance = f"{100 / classes:.1f}% (chance)"
    return [
        DemoRow(
            "classification",
            f"val top-1, {classes} generated breeds ({epochs} epochs from ImageNet)",
            f"{100 * val_top1:.1f}%",
            baseline=chance,
        ),
        DemoRow(
            "classification",
            f"test top-1, {classes} generated breeds ({data.num_test} images)",
            f"{100 * top1:.1f}%",
            "83.3% (1.0 MobileNet-224, real Stanford Dogs)",
            baseline=chance,
        ),
        DemoRow(
            "classification",
            f"0.25 MobileNet-{size} MAdds / params",
            f"{profile.million_mult_adds:.1f}M / {profile.million_parameters:.2f}M",
        ),
        DemoRow(
            "classification",
            "1.0 MobileNet-224, 120 classes MAdds / params",
            f"{full_profile.million_mult_adds:.0f}M / {full_profile.million_parameters:.2f}M",
            "569M / 3.3M",
        ),
        DemoRow("classification", "predictions CSV", str(predictions)),
    ]
