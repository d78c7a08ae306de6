"""Transfer benchmark: every task fine-tuned from Google's official ImageNet weights against the same network
trained from scratch, side by side, on the demo's generated data and the shipped recipes.

    python benchmarks/transfer.py                    # all tasks (a few minutes on 2 CPU cores)
    python benchmarks/transfer.py --quick            # smaller data, fewer steps
    python benchmarks/transfer.py --tasks faces,geolocation --out transfer_out

Both runs of a task share everything but ``weights`` (``official:0.25_128`` or none: the same 0.25 MobileNet
with relu6 and TF padding, randomly initialised): data, recipe, seed and number of optimizer steps. The table
gives the metric each reached on its held-out split and the wall time of fit plus evaluation; a bar plot
of the metrics is written beside it (``transfer.png``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.datasets.synthetic.coco import make_coco_shapes
from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.datasets.synthetic.stanford_dogs import make_stanford_dogs
from mobilenets.tasks.cli.demo.attributes import attribute_configs
from mobilenets.tasks.cli.demo.recipe import OFFICIAL_WEIGHTS, quiet_trainer, shipped_config
from mobilenets.tasks.cli.geo import partition_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.figures import save_figure


@dataclass(frozen=True)
class Case:
    """One task of the benchmark: its pretrained config and how to read its metric after ``fit``."""

    task: str
    metric: str
    higher_is_better: bool
    config: dict[str, Any]
    evaluate: Callable[[Any], float]


def _test_metric(key: str) -> Callable[[Any], float]:
    def evaluate(cli: Any) -> float:
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        return float(results[0][key])

    return evaluate


def classification(root: Path, quick: bool) -> Case:
    classes, per_class, epochs = (4, 24, 3) if quick else (8, 40, 4)
    data = make_stanford_dogs(
        root / "dogs", num_classes=classes, train_per_class=per_class, test_per_class=8, size=(85, 64)
    )
    config = shipped_config(
        "dogs_0.75_192",
        {
            "trainer": quiet_trainer(str(root / "runs"), epochs, callbacks=[]),
            "model": {
                "init_args": {
                    **OFFICIAL_WEIGHTS,
                    "num_classes": classes,
                    "input_size": 64,
                    "bn_eps": 1e-5,
                    "freeze_backbone_epochs": 0,
                    "optimizer": "adamw",
                    "lr": 0.003,
                    "weight_decay": 0.01,
                }
            },
            "data": {"init_args": {"root": str(data.root), "batch_size": 32, "num_workers": 0}},
        },
    )
    return Case("classification", "test top-1", True, config, _test_metric("test/top1"))


def ssd(root: Path, quick: bool) -> Case:
    train, val, epochs = (48, 16, 4) if quick else (160, 32, 6)
    data_root = root / "shapes"
    make_coco_shapes(data_root, {"train": train, "val": val}, size_range=(128, 176))

    def evaluate(cli: Any) -> float:
        results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        return float(results[0]["val/AP50"])

    config = shipped_config(
        "ssd300_coco",
        {
            "trainer": quiet_trainer(
                str(root / "runs"), epochs, callbacks=[], check_val_every_n_epoch=epochs
            ),
            "model": {
                "init_args": {
                    **OFFICIAL_WEIGHTS,
                    "num_classes": 4,
                    "input_size": 128,
                    "bn_eps": 1e-5,
                    "optimizer": "adamw",
                    "lr": 0.003,
                    "weight_decay": 0.0,
                    "scheduler": "cosine",
                }
            },
            "data": {
                "init_args": {
                    "root": str(data_root),
                    "train_split": "train",
                    "val_split": "val",
                    "batch_size": 16,
                    "num_workers": 0,
                }
            },
        },
    )
    return Case("SSD", "val AP50", True, config, evaluate)


def attributes(root: Path, quick: bool) -> Case:
    from mobilenets.datasets.synthetic.celeba import make_celeba

    images = 240 if quick else 600
    data_root = root / "celeba"
    make_celeba(data_root, images, size=(56, 68) if quick else (72, 88), clutter=True, label_noise=0.02)
    teacher, _ = attribute_configs(root, data_root, root / "unlabeled", quick)
    teacher["trainer"]["callbacks"] = []
    return Case("attributes", "test mAP", True, teacher, _test_metric("test/mAP"))


def geolocation(root: Path, quick: bool) -> Case:
    regions, per_region, epochs = (6, 30, 3) if quick else (12, 40, 4)
    data = make_geotags(
        root / "data",
        num_regions=regions,
        train_per_region=per_region,
        val_per_region=6,
        test_per_region=10,
        image_size=56,
        clutter=True,
    )
    partition = root / "partition.csv"
    partition_main([str(data.train_csv), "--out", str(partition), "--max-photos", "20", "--min-photos", "3"])

    def evaluate(cli: Any) -> float:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        return float(cli.model.last_test_accuracy["median"])

    config = shipped_config(
        "planet_mobilenet",
        {
            "trainer": quiet_trainer(str(root / "runs"), epochs, callbacks=[]),
            "model": {"init_args": {**OFFICIAL_WEIGHTS, "partition": str(partition), "input_size": 48}},
            "data": {
                "init_args": {
                    "partition": str(partition),
                    "train_csv": str(data.train_csv),
                    "val_csv": str(data.val_csv),
                    "test_csv": str(data.test_csv),
                    "image_root": str(data.image_root),
                    "batch_size": 32,
                    "num_workers": 0,
                }
            },
        },
    )
    return Case("geolocation", "test median km", False, config, evaluate)


def faces(root: Path, quick: bool) -> Case:
    identities, epochs, batches = (20, 3, 5) if quick else (40, 4, 8)
    make_identity_folders(root / "train", identities, 5, size=56, seed=0, clutter=True)
    lfw = root / "lfw"
    make_identity_folders(lfw, 20, 4, size=56, seed=1, prefix="Test", clutter=True)
    make_lfw_pairs(lfw / "pairs.txt", lfw, folds=10, pairs_per_fold=5, seed=1)

    def evaluate(cli: Any) -> float:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        return float(cli.model.last_report.accuracy)

    config = shipped_config(
        "faces_triplet",
        {
            "trainer": quiet_trainer(str(root / "runs"), epochs, callbacks=[], limit_val_batches=0),
            "model": {
                "init_args": {
                    **OFFICIAL_WEIGHTS,
                    "input_size": 48,
                    "embedding_size": 64,
                    "plot_dir": str(root / "plots"),
                }
            },
            "data": {
                "init_args": {
                    "train_dir": str(root / "train"),
                    "pairs_file": str(lfw / "pairs.txt"),
                    "pairs_dir": str(lfw),
                    "identities_per_batch": 8,
                    "images_per_identity": 4,
                    "batches_per_epoch": batches,
                    "num_workers": 0,
                }
            },
        },
    )
    return Case("faces", "10-fold accuracy", True, config, evaluate)


CASES: dict[str, Callable[[Path, bool], Case]] = {
    "classification": classification,
    "ssd": ssd,
    "attributes": attributes,
    "geolocation": geolocation,
    "faces": faces,
}


def run_case(case: Case, pretrained: bool, root: Path) -> tuple[float, int, float]:
    """(metric, optimizer steps, seconds of fit plus evaluation) of one run."""
    config = {**case.config, "trainer": {**case.config["trainer"], "default_root_dir": str(root)}}
    init_args = dict(config["model"]["init_args"])
    init_args["weights"] = OFFICIAL_WEIGHTS["weights"] if pretrained else None
    config["model"] = {**config["model"], "init_args": init_args}
    start = time.perf_counter()
    cli = lightning_cli({"fit": config})
    metric = case.evaluate(cli)
    return metric, int(cli.trainer.global_step), time.perf_counter() - start


def _value(metric: float) -> str:
    return f"{metric:.3f}" if abs(metric) <= 1 else f"{metric:.0f}"


def format_table(rows: list[tuple[Case, tuple[float, int, float], tuple[float, int, float]]]) -> str:
    header = f"{'task':<15}{'metric':<18}{'steps':>6}{'official':>10}{'scratch':>10}{'time off.':>11}{'time scr.':>11}"
    lines = [header, "-" * len(header)]
    for case, official, scratch in rows:
        lines.append(
            f"{case.task:<15}{case.metric:<18}{official[1]:>6}{_value(official[0]):>10}{_value(scratch[0]):>10}"
            f"{official[2]:>10.0f}s{scratch[2]:>10.0f}s"
        )
    return "\n".join(lines)


def plot(rows: list[tuple[Case, tuple[float, int, float], tuple[float, int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3.2), squeeze=False)
    for axis, (case, official, scratch) in zip(axes[0], rows):
        axis.bar(["official", "scratch"], [official[0], scratch[0]], color=["tab:blue", "tab:gray"])
        better = "higher" if case.higher_is_better else "lower"
        axis.set_title(f"{case.task}\n{case.metric} ({better} is better)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("transfer_out"), help="data, runs, table and plot")
    parser.add_argument("--tasks", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in CASES]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {list(CASES)}")
    rows = []
    for task in tasks:
        root = args.out / task
        print(f"\n=== {task} ===", flush=True)
        case = CASES[task](root / "data", args.quick)
        official = run_case(case, True, root / "official")
        scratch = run_case(case, False, root / "scratch")
        rows.append((case, official, scratch))
        print(format_table(rows[-1:]), flush=True)
    table = format_table(rows)
    print("\n=== transfer: official 0.25_128 ImageNet weights vs from scratch ===\n" + table)
    write_text_atomic(args.out / "transfer.txt", table + "\n")
    plot(rows, args.out / "transfer.png")
    print(f"\nwrote {args.out / 'transfer.txt'} and {args.out / 'transfer.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
