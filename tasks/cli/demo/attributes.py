"""Demo step: face attributes, a teacher fine-tuned on the labels and a smaller student distilled from it,
both from the shipped attribute recipes and the built-in ImageNet weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilenets.datasets.synthetic.celeba import make_celeba, make_unlabeled_faces
from mobilenets.tasks.attributes import PAPER_BASELINE, PAPER_TABLE12
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.cli.demo.recipe import OFFICIAL_WEIGHTS, quiet_trainer, shipped_config
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.lightning import lightning_cli

#: (labeled images, unlabeled images, image size, teacher input, student input, teacher epochs, student epochs);
#: the full student needs about as many epochs as its teacher, and extra unlabeled faces, to come within
#: 2 points of it
FULL = (1000, 600, (72, 88), 72, 64, 12, 12)
QUICK = (240, 120, (56, 68), 56, 48, 3, 2)
#: CelebA's partitions as fractions of the images: train, val (the rest is test)
FRACTIONS = (0.7, 0.15)


def _fit_and_test(config: dict[str, Any]) -> tuple[dict[str, float], str, BaseTask]:
    """``fit`` through LightningCLI, then ``test`` the best checkpoint (by val mAP)."""
    cli = lightning_cli({"fit": config}, run=True)
    trainer = cli.trainer
    best = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)
    return {k: float(v) for k, v in results[0].items()}, best, cli.model


def chance_mean_ap(labels: np.ndarray) -> float:
    """The mean AP of a model that ranks at random: each attribute's AP is then its share of positives
    (over the attributes with a positive example, as ``AttributeMeanAP`` averages)."""
    rates = (labels == 1).mean(axis=0)
    return float(rates[rates > 0].mean())


def attribute_configs(
    root: Path, data_root: Path, unlabeled_root: Path, quick: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(teacher config, student config without its teacher file): the shipped recipes with the demo's
    data, sizes and epochs, starting from the built-in weights."""
    _, _, _, teacher_size, student_size, teacher_epochs, student_epochs = QUICK if quick else FULL
    # No random crops: the generator already draws every face at a random scale, offset and lighting, and
    # a crop of a 64 px face drops or shifts the few pixels that tell bushy brows, bangs or a pointy nose;
    # the student then also sees the very view whose teacher outputs are cached.
    data = {"root": str(data_root), "batch_size": 16, "num_workers": 0, "augment": False}

    def checkpoint(name: str) -> dict[str, Any]:
        return {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/mAP", "mode": "max", "filename": name},
        }

    teacher = shipped_config(
        "attributes_teacher",
        {
            "trainer": quiet_trainer(
                str(root / "teacher"), teacher_epochs, callbacks=[checkpoint("teacher")]
            ),
            "model": {"init_args": {**OFFICIAL_WEIGHTS, "input_size": teacher_size}},
            "data": {"init_args": data},
        },
    )
    student = shipped_config(
        "attributes_distill_0.25_128",
        {
            "trainer": quiet_trainer(
                str(root / "student"), student_epochs, callbacks=[checkpoint("student")]
            ),
            "model": {
                "init_args": {
                    **OFFICIAL_WEIGHTS,
                    "input_size": student_size,
                    "teacher_cache_dir": str(root / "teacher_cache"),
                }
            },
            "data": {"init_args": {**data, "unlabeled_dirs": [str(unlabeled_root)]}},
        },
    )
    return teacher, student


def run_demo(root: Path, quick: bool) -> list[Any]:
    """Generate CelebA-layout faces on cluttered backgrounds, fine-tune a 0.25 MobileNet teacher on the
    labels at a larger input, distill a student at a smaller input from it (with extra unlabeled faces),
    and report both test mean APs beside chance."""
    root = Path(root)
    images, unlabeled, size = (QUICK if quick else FULL)[:3]
    data_root, unlabeled_root = root / f"celeba_{images}", root / f"unlabeled_{unlabeled}"
    labels = make_celeba(data_root, images, size=size, fractions=FRACTIONS, clutter=True)
    make_unlabeled_faces(unlabeled_root, unlabeled, size=size, clutter=True)
    chance = chance_mean_ap(labels[round(images * FRACTIONS[0]) + round(images * FRACTIONS[1]) :])

    teacher_config, student_config = attribute_configs(root, data_root, unlabeled_root, quick)
    teacher_metrics, teacher_ckpt, teacher = _fit_and_test(teacher_config)
    student_config["model"]["init_args"]["teacher"] = teacher_ckpt
    student_metrics, _, student = _fit_and_test(student_config)
    teacher_size, student_size = teacher.hparams.input_size, student.hparams.input_size
    teacher_profile, student_profile = teacher.profile(), student.profile()
    return [
        DemoRow(
            "attributes",
            f"teacher 0.25 MobileNet-{teacher_size} (labels) test mAP",
            f"{teacher_metrics['test/mAP']:.1%} ({teacher_profile.million_mult_adds:.0f}M MAdds)",
            f"{PAPER_BASELINE[0]:.1f}% (baseline, 224 px)",
            f"{chance:.1%} (chance)",
        ),
        DemoRow(
            "attributes",
            f"student 0.25 MobileNet-{student_size} (distilled) test mAP",
            f"{student_metrics['test/mAP']:.1%} ({student_profile.million_mult_adds:.1f}M MAdds)",
            f"{PAPER_TABLE12[(0.25, 128)][0]:.1f}% (0.25 MobileNet-128)",
            f"{chance:.1%} (chance)",
        ),
        DemoRow(
            "attributes",
            "student emulation cross-entropy (test)",
            f"{student_metrics.get('test/emulation_ce', float('nan')):.3f}",
        ),
    ]
