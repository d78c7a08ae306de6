"""Demo step: SSD and Faster R-CNN on generated shapes in COCO format, each fine-tuned with its shipped recipe
from the built-in ImageNet weights, then ``detect-eval`` on the held-out val split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.datasets.synthetic.coco import make_coco_shapes
from mobilenets.tasks.cli.demo.recipe import (
    OFFICIAL_WEIGHTS,
    last_checkpoint,
    quick_threads,
    quiet_trainer,
    shipped_config,
)
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.detect_eval import main as detect_eval_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.detection import FasterRCNNDetection, SSDDetection

#: the paper's anchor sizes of Faster R-CNN (x 256 px) are meant for a 300 px shorter side
FRCNN_REFERENCE_SIZE = 300
#: detectors fitted on one intra-op thread in the full demo too: a Faster R-CNN step is many small ops (anchor
#: sampling, NMS, RoIAlign) that a second thread only slows; on two busy cores a step took 4-7 s on two threads
#: against 0.3 s on one
ONE_THREAD = frozenset({"Faster R-CNN"})
#: what a detector without skill (random boxes, or none) scores
NO_SKILL = "~0% (random boxes)"
#: Table 13's COCO mAP of each detector at 300 px
PAPER_AP = {"SSD": "19.3% (SSD300, COCO)", "Faster R-CNN": "16.4% (Faster R-CNN 300, COCO)"}


@dataclass(frozen=True)
class DetectionDemoSize:
    """How much the detection step generates and trains."""

    train_images: int
    val_images: int
    input_size: int
    ssd_epochs: int
    frcnn_epochs: int
    batch_size: int


#: more images rather than more epochs: SSD on 320 images reached val AP50 0.64 after 30 epochs and 0.64 after
#: 50, on 960 images 0.77 after 20 (Faster R-CNN: 0.82 after 8 epochs of 320, 0.87 after 3 of 960)
FULL = DetectionDemoSize(960, 128, 128, 20, 3, 16)
QUICK = DetectionDemoSize(64, 24, 96, 12, 12, 16)


def detector_configs(root: Path, data_root: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """{detector name: config}: the shipped SSD300 and Faster R-CNN 300 recipes with the demo's data, input
    size and epochs, from the built-in weights."""
    size = QUICK if quick else FULL
    # the images are generated at the input size, so the recipes' crop and scale augmentation is left out
    data = {
        "root": str(data_root),
        "train_split": "train",
        "val_split": "val",
        "augment": "none",
        "batch_size": size.batch_size,
        "num_workers": 0,
        "predict_dir": str(data_root / "val"),
    }
    model = {**OFFICIAL_WEIGHTS, "num_classes": 4, "input_size": size.input_size}
    scale = size.input_size / FRCNN_REFERENCE_SIZE
    return {
        "SSD": shipped_config(
            "ssd300_coco",
            {
                "trainer": quiet_trainer(
                    str(root / "ssd"), size.ssd_epochs, check_val_every_n_epoch=size.ssd_epochs
                ),
                "model": {"init_args": model},
                "data": {"init_args": data},
            },
        ),
        "Faster R-CNN": shipped_config(
            "frcnn300_coco",
            {
                "trainer": quiet_trainer(
                    str(root / "frcnn"), size.frcnn_epochs, check_val_every_n_epoch=size.frcnn_epochs
                ),
                "model": {
                    "init_args": {
                        **model,
                        "max_size": size.input_size,
                        "anchor_scales": [s * scale for s in (0.25, 0.5, 1.0, 2.0)],
                        # few objects per image: fewer proposals and sampled RoIs keep the box head cheap
                        "num_proposals": 50,
                        "box_batch_size_per_image": 16,
                    }
                },
                "data": {
                    "init_args": {**data, "max_size": size.input_size, "batch_size": size.batch_size // 2}
                },
            },
        ),
    }


def run_demo(root: Path, quick: bool) -> list[DemoRow]:
    """Shapes in COCO format → SSD and Faster R-CNN (α 0.25, small inputs) fine-tuned briefly →
    ``detect-eval`` on the val split."""
    with quick_threads(quick):
        return _run_demo(Path(root), quick)


def _run_demo(root: Path, quick: bool) -> list[DemoRow]:
    size = QUICK if quick else FULL
    data_root = root / "shapes"
    if not (data_root / "annotations" / "instances_val.json").is_file():
        make_coco_shapes(
            data_root,
            {"train": size.train_images, "val": size.val_images},
            size_range=(size.input_size, size.input_size),
        )
    rows: list[DemoRow] = []
    for name, config in detector_configs(root, data_root, quick).items():
        folder = Path(config["trainer"]["default_root_dir"])
        config_path = folder / "config.yaml"
        out_dir = folder / "detect_eval"
        with quick_threads(name in ONE_THREAD):  # --quick steps already run on one
            cli = lightning_cli({"fit": config})
            write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
            detect_eval_main(
                ["--config", str(config_path), "--ckpt_path", last_checkpoint(cli), "--out", str(out_dir)]
            )
        stats = json.loads((out_dir / "coco_eval.json").read_text())
        label = f"{name} α0.25-{size.input_size} shapes val"
        rows += [
            DemoRow("detection", f"{label} AP50", f"{100 * stats['AP50']:.1f}%", baseline=NO_SKILL),
            DemoRow(
                "detection",
                f"{label} AP",
                f"{100 * stats['AP']:.1f}%",
                PAPER_AP[name],
                baseline=NO_SKILL,
            ),
        ]
    if not quick:
        for name, detector in (("SSD300", SSDDetection), ("Faster R-CNN 300", FasterRCNNDetection)):
            prof = detector(num_classes=91, input_size=300).profile()
            paper = {"SSD300": "1.2B / 6.8M", "Faster R-CNN 300": "25.2B / 6.1M"}[name]
            rows.append(
                DemoRow(
                    "detection",
                    f"{name} MAdds / params",
                    f"{prof.mult_adds / 1e9:.2f}B / {prof.million_parameters:.2f}M",
                    paper,
                )
            )
    return rows
