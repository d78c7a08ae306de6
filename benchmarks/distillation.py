"""Student training speed with the teacher's cached outputs, against running the teacher online and
against training on the labels alone, in the same run.

A 0.25 MobileNet student trains on drawn CelebA-layout faces; the teacher is a 1.0 MobileNet attribute
checkpoint (untrained weights: its speed, not its accuracy, matters here). Each round runs one short fit per
mode, alternating, and measures the images/s of the fit's last epoch (data loading, forward, backward and
the optimizer step; the first epoch warms up); the table prints medians over rounds. Building the cache is
a one-off cost, timed separately.

Target: the cache makes student epochs at least as fast as training on labels alone (within 10%).

    .venv/bin/python benchmarks/distillation.py [--images 256] [--student-size 64] [--teacher-size 128]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mobilenets.datasets.celeba import CelebADataModule
from mobilenets.datasets.synthetic.celeba import make_celeba
from mobilenets.tasks.attributes import AttributeModel
from mobilenets.tasks.base import TASK_CLASS_KEY


class EpochThroughput(pl.Callback):
    """Images per second of each training epoch, batches and data loading included: per wall-clock second
    and per CPU second of this process (the steadier figure on a machine shared with other jobs)."""

    def __init__(self) -> None:
        self.images = 0
        self.started = (0.0, 0.0)
        self.per_epoch: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images, self.started = 0, (time.perf_counter(), time.process_time())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.images += len(batch["image"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        self.per_epoch.append((self.images / wall, self.images / cpu))


def save_teacher(path: Path, width_mult: float, input_size: int) -> None:
    model = AttributeModel(width_mult=width_mult, input_size=input_size)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            TASK_CLASS_KEY: "mobilenets.tasks.attributes.AttributeModel",
        },
        path,
    )


def fit_once(
    mode: str, args: argparse.Namespace, work: Path, teacher: Path
) -> tuple[tuple[float, float], float]:
    """One fit of ``args.epochs`` epochs: ((wall, CPU) images/s of the last epoch, seconds outside epochs)."""
    torch.manual_seed(0)
    student = AttributeModel(
        width_mult=0.25,
        input_size=args.student_size,
        teacher=None if mode == "labels only" else str(teacher),
        teacher_mode="online" if mode == "teacher online" else "cached",
        teacher_cache_dir=str(work / "cache"),
        optimizer="rmsprop",
        weight_decay=0.0,
    )
    data = CelebADataModule(
        str(work / "celeba"),
        input_size=args.student_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    meter = EpochThroughput()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
        default_root_dir=str(work),
    )
    started = time.perf_counter()
    trainer.fit(student, datamodule=data)
    total = time.perf_counter() - started
    return meter.per_epoch[-1], total - sum(len(data.datasets["train"]) / wall for wall, _ in meter.per_epoch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="drawn faces (70%% of them train)")
    parser.add_argument("--student-size", type=int, default=64)
    parser.add_argument("--teacher-size", type=int, default=128)
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="per fit; the last one is measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    try:
        make_celeba(work / "celeba", args.images, size=(89, 109))
        teacher = work / "teacher.ckpt"
        save_teacher(teacher, args.teacher_width, args.teacher_size)
        modes = ["labels only", "teacher cached", "teacher online"]
        speeds: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        cache_build = 0.0
        for round_index in range(args.rounds):
            for mode in modes:
                images_per_s, outside_epochs_s = fit_once(mode, args, work, teacher)
                if mode == "teacher cached" and round_index == 0:
                    cache_build = outside_epochs_s
                speeds[mode].append(images_per_s)
                print(
                    f"round {round_index + 1} {mode:<15} {images_per_s[0]:8.1f} images/s wall"
                    f" {images_per_s[1]:8.1f} images/CPU-s",
                    flush=True,
                )
        wall = {mode: statistics.median(v[0] for v in values) for mode, values in speeds.items()}
        cpu = {mode: statistics.median(v[1] for v in values) for mode, values in speeds.items()}
        print(
            f"\nstudent 0.25 MobileNet-{args.student_size}, teacher {args.teacher_width:g} MobileNet-"
            f"{args.teacher_size}, batch {args.batch_size}, {args.threads} threads, {args.workers} workers, "
            f"median of {args.rounds} rounds"
        )
        print(f"{'mode':<18}{'images/s':>10}{'ratio':>8}{'images/CPU-s':>14}{'ratio':>8}")
        for mode in modes:
            print(
                f"{mode:<18}{wall[mode]:>10.1f}{wall[mode] / wall['labels only']:>7.2f}x"
                f"{cpu[mode]:>14.1f}{cpu[mode] / cpu['labels only']:>7.2f}x"
            )
        ratio = min(wall["teacher cached"] / wall["labels only"], cpu["teacher cached"] / cpu["labels only"])
        print(
            f"\none-off cache build (teacher over {args.images} images, plus fit setup): {cache_build:.1f} s"
            f"\ntarget: teacher cached >= 0.90x labels only -> {'met' if ratio >= 0.9 else 'MISSED'}"
            f" (worse of the two ratios: {ratio:.2f}x)"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
