"""Demo step: one backbone, four heads (issue 14). Face attributes, face embeddings, geolocation and
classification on generated data, each head trained alone on the frozen built-in ImageNet body
(``official:0.25_128``) with its shipped recipe; the four checkpoints then become one ``MultiTask``
(``from_checkpoints``: one body pass for all four) and are tested again through it, beside a joint fine-tune of
all four from the same weights; the shared model's cost beside the four separate models'."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mobilenets.datasets.synthetic.celeba import make_celeba
from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.datasets.synthetic.folder import make_image_folder
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.tasks.cli.demo.recipe import (
    OFFICIAL_WEIGHTS,
    last_checkpoint,
    quick_threads,
    quiet_trainer,
    shipped_config,
)
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.geo import partition_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.multitask import BACKBONE_OPTIONS, FIT_OPTIONS, MultiTask

#: task → (shipped recipe, test metric, what it is)
TASKS: dict[str, tuple[str, str, str]] = {
    "attributes": ("attributes_distill_0.25_128", "test/mAP", "mean AP"),
    "embedding": ("faces_triplet", "test/accuracy", "10-fold pair accuracy"),
    "geolocation": ("planet_mobilenet", "test/cell_acc", "cell accuracy"),
    "classification": ("folder_finetune", "test/top1", "top-1"),
}
#: (images per data set, input size, epochs)
FULL = (240, 64, 4)
QUICK = (96, 48, 2)


def generate(root: Path, images: int) -> dict[str, dict[str, Any]]:
    """The four data sets; task → the data ``init_args`` (and the model's, for geolocation's partition)."""
    make_celeba(root / "celeba", images, size=(56, 68), fractions=(0.6, 0.2), clutter=True)
    classes = make_image_folder(
        root / "classes",
        ["cat", "dog", "owl", "fox"],
        images // 4,
        size=(64, 56),
        split_layout=True,
        val_per_class=8,
    )
    make_identity_folders(root / "faces" / "train", 16, (images // 16), size=56, seed=0, clutter=True)
    lfw = root / "faces" / "lfw"
    make_identity_folders(lfw, 20, 4, size=56, seed=1, prefix="Test", clutter=True)
    make_lfw_pairs(lfw / "pairs.txt", lfw, folds=10, pairs_per_fold=4, seed=1)
    tags = make_geotags(
        root / "geotags", num_regions=4, train_per_region=images // 4, val_per_region=6, test_per_region=8,
        image_size=56, clutter=True,
    )  # fmt: skip
    partition = root / "geotags" / "partition.csv"
    status = partition_main(
        [str(tags.train_csv), "--out", str(partition), "--max-photos", "30", "--min-photos", "4"]
    )
    if status:
        raise RuntimeError(f"geo partition of {tags.train_csv} failed with status {status}")
    small = {"batch_size": 32, "num_workers": 0}
    return {
        "attributes": {"data": {"root": str(root / "celeba"), **small}},
        "classification": {"data": {"root": str(classes), **small, "skip_corrupt": False}},
        "embedding": {
            "data": {
                "train_dir": str(root / "faces" / "train"),
                "pairs_file": str(lfw / "pairs.txt"),
                "pairs_dir": str(lfw),
                "identities_per_batch": 8,
                "images_per_identity": 4,
                "batch_size": 32,
                "num_workers": 0,
            },
            "model": {"embedding_size": 64},
        },
        "geolocation": {
            "data": {
                "partition": str(partition),
                "train_csv": str(tags.train_csv),
                "val_csv": str(tags.val_csv),
                "test_csv": str(tags.test_csv),
                "image_root": str(tags.image_root),
                **small,
            },
            "model": {"partition": str(partition)},
        },
    }


def single_config(name: str, root: Path, data: dict[str, Any], size: int, epochs: int) -> dict[str, Any]:
    """A task's shipped recipe as a linear probe on the frozen built-in body: the body never changes (frozen,
    its folded batch norm left as loaded), so the four heads share it exactly."""
    frozen = {"freeze_backbone_epochs": epochs + 1, "folded_bn_batches": 0, "precise_bn_batches": 0}
    return shipped_config(
        TASKS[name][0],
        {
            "trainer": quiet_trainer(str(root / "runs" / name), epochs, callbacks=[], logger=False),
            "model": {
                "init_args": {
                    **OFFICIAL_WEIGHTS,
                    "input_size": size,
                    "lr": 0.01,
                    **frozen,
                    **data.get("model", {}),
                }
            },
            "data": {"init_args": data["data"]},
        },
    )


def multitask_config(
    singles: dict[str, dict[str, Any]], root: Path, size: int, epochs: int, **model: Any
) -> dict[str, Any]:
    """A ``MultiTask`` over the tasks' own data sections; ``model`` is its init_args (checkpoints or tasks)."""
    return {
        "seed_everything": 0,
        "trainer": quiet_trainer(str(root), epochs, logger=False),
        "model": {
            "class_path": "mobilenets.tasks.multitask.MultiTask",
            "init_args": {**OFFICIAL_WEIGHTS, "input_size": size, **model},
        },
        "data": {
            "class_path": "mobilenets.tasks.multitask.MultiDataModule",
            "init_args": {"datamodules": {name: config["data"] for name, config in singles.items()}},
        },
    }


def task_specs(singles: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tasks of a joint fine-tune: each recipe's model section without the shared body's options."""
    specs = {}
    for name, config in singles.items():
        init_args = dict(config["model"].get("init_args") or {})
        for key in (*BACKBONE_OPTIONS, *FIT_OPTIONS, "lr", "optimizer"):
            init_args.pop(key, None)
        specs[name] = {"class_path": config["model"]["class_path"], "init_args": init_args}
    return specs


def b1_ms(module: torch.nn.Module, size: int, repeats: int = 20) -> float:
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_demo(root: Path, quick: bool) -> list[DemoRow]:
    """Four heads alone on the frozen built-in body, the same heads through one shared body, a joint
    fine-tune, and what sharing saves (``mobilenets demo``)."""
    with quick_threads(quick):
        return _run_demo(Path(root), quick)


def _run_demo(root: Path, quick: bool) -> list[DemoRow]:
    images, size, epochs = QUICK if quick else FULL
    data = generate(root / "data", images)
    singles = {name: single_config(name, root, data[name], size, epochs) for name in TASKS}
    alone: dict[str, float] = {}
    checkpoints: dict[str, str] = {}
    for name, config in singles.items():
        fit = lightning_cli({"fit": config})
        fit.trainer.test(fit.model, datamodule=fit.datamodule, verbose=False)
        alone[name] = float(fit.trainer.callback_metrics[TASKS[name][1]])
        checkpoints[name] = last_checkpoint(fit)
    shared_test = lightning_cli(
        {"test": multitask_config(singles, root / "runs" / "shared", size, 1, checkpoints=checkpoints)}
    )
    shared = {name: float(shared_test.trainer.callback_metrics[f"{name}/{TASKS[name][1]}"]) for name in TASKS}
    joint = lightning_cli(
        {
            "fit": multitask_config(
                singles,
                root / "runs" / "joint",
                size,
                epochs,
                tasks=task_specs(singles),
                optimizer="adamw",
                lr=0.003,
            )
        }
    )
    joint.trainer.test(joint.model, datamodule=joint.datamodule, verbose=False)
    tuned = {name: float(joint.trainer.callback_metrics[f"{name}/{TASKS[name][1]}"]) for name in TASKS}

    model: MultiTask = shared_test.model.eval()
    profile, separate = model.profile(), model.separate_profiles()
    separate_madds = sum(p.million_mult_adds for p in separate.values())
    shared_ms = b1_ms(model, size)
    separate_ms = sum(b1_ms(task, size) for task in model.tasks.values())
    rows = [
        DemoRow(
            "multitask",
            f"cost of 4 tasks, 0.25 MobileNet-{size}: M mult-adds shared / separate",
            f"{profile.million_mult_adds:.1f} / {separate_madds:.1f}",
        ),
        DemoRow(
            "multitask",
            "PyTorch batch-1 latency shared / 4 separate",
            f"{shared_ms:.1f} ms / {separate_ms:.1f} ms ({shared_ms / separate_ms:.2f}x)",
        ),
    ]
    for name, (_, _, what) in TASKS.items():
        rows.append(
            DemoRow(
                "multitask",
                f"{name} {what}: alone / shared frozen body / joint fine-tune",
                f"{100 * alone[name]:.1f}% / {100 * shared[name]:.1f}% / {100 * tuned[name]:.1f}%",
                baseline=f"shared - alone: {100 * (shared[name] - alone[name]):+.1f} points",
            )
        )
    return rows
