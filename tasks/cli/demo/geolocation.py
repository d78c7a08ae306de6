"""Demo step: PlaNet geolocation on generated geotagged scenes, from the shipped recipe and the built-in
ImageNet weights, beside the no-skill baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilenets.datasets.geotags import read_geotags
from mobilenets.datasets.s2cells import Partition
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.tasks.cli.demo.recipe import OFFICIAL_WEIGHTS, quiet_trainer, shipped_config
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.geo import partition_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.geolocation import PAPER_TABLE11, haversine_km

#: (regions, train / val / test photos per region, image size, input size, epochs)
FULL = (12, (40, 8, 15), 64, 56, 4)
QUICK = (6, (30, 6, 8), 56, 48, 3)


def no_skill_median_km(partition: Partition, test_csv: Path) -> float:
    """The median error of always answering the cell with the most training photos: a classifier that
    learned nothing from the pixels."""
    most = int(np.argmax(partition.photos))
    test = read_geotags(test_csv, image_column=None)
    return float(np.median(haversine_km(partition.lat[most], partition.lon[most], test.lat, test.lon)))


def run_demo(root: Path, quick: bool) -> list[Any]:
    """Generate geotagged cluttered scenes whose landmarks depend on their region, partition the training
    photos into S2 cells, fine-tune, and test in km against the no-skill baseline."""
    root = Path(root)
    regions, (train, val, test), image_size, input_size, epochs = QUICK if quick else FULL
    data = make_geotags(
        root / "data",
        num_regions=regions,
        train_per_region=train,
        val_per_region=val,
        test_per_region=test,
        image_size=image_size,
        clutter=True,
    )
    partition_csv = root / "partition.csv"
    # thresholds scaled to the toy set: each city splits into a few cells, stray photos are dropped
    max_photos, min_photos = (16, 3) if quick else (30, 5)
    args = [str(data.train_csv), "--out", str(partition_csv)]
    status = partition_main([*args, "--max-photos", str(max_photos), "--min-photos", str(min_photos)])
    if status:
        raise RuntimeError(f"geo partition of {data.train_csv} failed with status {status}")
    paths = {
        "partition": str(partition_csv),
        "train_csv": str(data.train_csv),
        "val_csv": str(data.val_csv),
        "test_csv": str(data.test_csv),
        "image_root": str(data.image_root),
    }
    config = shipped_config(
        "planet_mobilenet",
        {
            "trainer": quiet_trainer(str(root / "runs"), epochs),
            "model": {
                "init_args": {**OFFICIAL_WEIGHTS, "partition": str(partition_csv), "input_size": input_size}
            },
            "data": {"init_args": {**paths, "batch_size": 32, "num_workers": 0}},
        },
    )
    cli = lightning_cli({"fit": config})
    model = cli.model
    cli.trainer.test(model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    ours = model.last_test_accuracy
    baseline = no_skill_median_km(Partition.read_csv(partition_csv), data.test_csv)
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
    rows.append(
        DemoRow(
            "geolocation",
            "median error (test)",
            f"{ours['median']:.0f} km",
            baseline=f"{baseline:.0f} km (always the most frequent cell)",
        )
    )
    return rows
