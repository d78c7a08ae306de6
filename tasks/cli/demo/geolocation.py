"""Demo step: PlaNet geolocation on generated geotagged photos."""

from __future__ import annotations

from pathlib import Path

from mobilenets.datasets.synthetic_geo import write_geotag_dataset
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.geo import partition_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.geolocation import PAPER_TABLE11


def run_demo(root: Path, quick: bool) -> list:
    """Generate geotagged photos whose look depends on their region, partition, train, test in km."""

    regions = 6 if quick else 12
    data = write_geotag_dataset(
        root / "data",
        num_regions=regions,
        train_per_region=24 if quick else 80,
        val_per_region=4 if quick else 10,
        test_per_region=6 if quick else 20,
        image_size=40 if quick else 64,
    )
    partition_csv = root / "partition.csv"
    # thresholds scaled to the toy set: cities split into a few cells, stray photos dropped
    max_photos, min_photos = (16, 3) if quick else (40, 5)
    status = partition_main(
        [
            str(data.train_csv),
            "--out",
            str(partition_csv),
            "--max-photos",
            str(max_photos),
            "--min-photos",
            str(min_photos),
        ]
    )
    if status:
        raise RuntimeError(f"geo partition failed with status {status}")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 4 if quick else 12,
            "accelerator": "auto",  # the GPU where there is one
            "devices": 1,
            "default_root_dir": str(root / "runs"),
            "enable_model_summary": False,
            "log_every_n_steps": 5,
        },
        "model": {
            "class_path": "mobilenets.tasks.geolocation.GeoClassifier",
            "init_args": {
                "partition": str(partition_csv),
                "width_mult": 0.25,
                "input_size": 32 if quick else 64,
                "optimizer": "adamw",
                "lr": 0.01,
                "weight_decay": 0.0,
                "label_smoothing": 0.1,
                "dropout": 0.0,
                "warmup_epochs": 0.0,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.geotags.GeotagDataModule",
            "init_args": {
                "partition": str(partition_csv),
                "train_csv": str(data.train_csv),
                "val_csv": str(data.val_csv),
                "test_csv": str(data.test_csv),
                "image_root": str(data.image_root),
                "input_size": 32 if quick else 64,
                "batch_size": 8 if quick else 32,
            },
        },
    }
    cli = lightning_cli({"fit": config}, run=True)
    model, datamodule = cli.model, cli.datamodule
    cli.trainer.test(model, datamodule=datamodule, verbose=False)
    ours = model.last_test_accuracy
    rows = [DemoRow("geolocation", "partition cells", str(model.num_cells), "26,263 (91 M photos)")]
    for scale, km, _, _, paper in PAPER_TABLE11:
        rows.append(
            DemoRow(
                "geolocation",
                f"within {km:g} km ({scale.lower()})",
                f"{100 * ours[km]:.1f}%",
                f"{paper:.1f}%",
            )
        )
    rows.append(DemoRow("geolocation", "median error", f"{ours['median']:.0f} km"))
    return rows
