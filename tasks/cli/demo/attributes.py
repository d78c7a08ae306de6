"""Demo step: face attributes, a teacher on the labels and a distilled 0.25 student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilenets.datasets.synthetic_faces_attributes import write_synthetic_celeba, write_unlabeled_faces
from mobilenets.tasks.attributes import PAPER_BASELINE, PAPER_TABLE12
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.lightning import lightning_cli


def _fit_and_test(config: dict[str, Any]) -> tuple[dict[str, float], str, BaseTask]:
    """``fit`` through LightningCLI with a dict config, then ``test`` on the best checkpoint."""

    cli = lightning_cli({"fit": config}, run=True)
    trainer = cli.trainer
    best = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)
    return {k: float(v) for k, v in results[0].items()}, best, cli.model


def demo_config(
    root: Path,
    data_root: Path,
    name: str,
    model: dict[str, Any],
    epochs: int,
    batch_size: int,
    input_size: int,
    unlabeled: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(root / name),
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(root / name)},
            },
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/mAP", "mode": "max", "filename": name},
                }
            ],
        },
        "model": {"class_path": "mobilenets.tasks.attributes.AttributeModel", "init_args": model},
        "data": {
            "class_path": "mobilenets.datasets.celeba.CelebADataModule",
            "init_args": {
                "root": str(data_root),
                "input_size": input_size,
                "batch_size": batch_size,
                "num_workers": 0,
                "unlabeled_dirs": unlabeled or [],
            },
        },
    }


def run_demo(root: Path, quick: bool) -> list[Any]:
    """Generate drawn CelebA-layout faces, train a teacher on the labels, distill a 0.25 student from
    it (with extra unlabeled faces), and report both mean APs."""

    root = Path(root)
    data_root, unlabeled_root = (
        (root / "celeba_quick", root / "unlabeled_quick") if quick else (root / "celeba", root / "unlabeled")
    )
    # quick: enough to run every stage in seconds (mAPs near chance); full: the teacher learns the drawn
    # attributes and the student, with as many unlabeled faces again, emulates it.
    images, unlabeled, size = (160, 64, (64, 78)) if quick else (800, 800, (89, 109))
    if not (data_root / "list_attr_celeba.txt").is_file():
        write_synthetic_celeba(data_root, images, size=size)
        write_unlabeled_faces(unlabeled_root, unlabeled, size=size)
    teacher_size, student_size = (48, 48) if quick else (64, 64)
    epochs, batch_size = (4, 16) if quick else (15, 32)
    common = {"optimizer": "adamw", "lr": 3e-3, "scheduler": "cosine"}
    teacher_model = {
        "width_mult": 0.5 if quick else 1.0,
        "input_size": teacher_size,
        "weight_decay": 4e-5,
        **common,
    }
    teacher_metrics, teacher_ckpt, teacher = _fit_and_test(
        demo_config(root, data_root, "teacher", teacher_model, epochs, batch_size, teacher_size)
    )
    student_model = {
        "width_mult": 0.25,
        "input_size": student_size,
        "teacher": teacher_ckpt,
        "weight_decay": 0.0,
        "teacher_cache_dir": str(root / "teacher_cache"),
        **common,
    }
    student_metrics, _, student = _fit_and_test(
        demo_config(
            root, data_root, "student", student_model, epochs, batch_size, student_size,
            unlabeled=[str(unlabeled_root)],
        )
    )  # fmt: skip
    teacher_profile, student_profile = teacher.profile(), student.profile()
    return [
        DemoRow(
            "attributes",
            f"teacher {teacher.hparams.width_mult:g} MobileNet-{teacher_size} (labels) test mAP",
            f"{teacher_metrics['test/mAP']:.1%} ({teacher_profile.million_mult_adds:.0f}M MAdds)",
            f"{PAPER_BASELINE[0]:.1f}% (baseline, 224 px)",
        ),
        DemoRow(
            "attributes",
            f"student 0.25 MobileNet-{student_size} (distilled) test mAP",
            f"{student_metrics['test/mAP']:.1%} ({student_profile.million_mult_adds:.1f}M MAdds)",
            f"{PAPER_TABLE12[(0.25, 128)][0]:.1f}% (0.25 MobileNet-128)",
        ),
        DemoRow(
            "attributes",
            "student emulation cross-entropy (test)",
            f"{student_metrics.get('test/emulation_ce', float('nan')):.3f}",
        ),
    ]
