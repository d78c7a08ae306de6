"""Demo step: SSD on generated shapes in COCO format, then ``detect-eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mobilenets.datasets.synthetic_detection import make_shapes_coco
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.detect_eval import main as detect_eval_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.detection import SSDDetection


def run_demo(root: Path, quick: bool) -> list[Any]:
    """Shapes in COCO format → SSD (α 0.25, small input) trained briefly → ``detect-eval`` on the val split."""

    root = Path(root)
    n_train, n_val, size, epochs, batch = (24, 8, 64, 8, 8) if quick else (320, 64, 128, 40, 16)
    data_root = root / "shapes"
    if not (data_root / "annotations" / "instances_val.json").is_file():
        make_shapes_coco(data_root, {"train": n_train, "val": n_val}, size_range=(size, int(size * 1.4)))
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "mobilenets.tasks.detection.SSDDetection",
            "init_args": {
                "width_mult": 0.25,
                "input_size": size,
                "num_classes": 4,
                "optimizer": "adamw",
                "lr": 0.003,
                "weight_decay": 0.0,
                "scheduler": "cosine",
                "warmup_epochs": 1,
                "recompute_bn_batches": 4,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.coco.CocoDataModule",
            "init_args": {
                "root": str(data_root),
                "train_split": "train",
                "val_split": "val",
                "input_size": size,
                "batch_size": batch,
                "num_workers": 0,
                "predict_dir": str(data_root / "val"),
            },
        },
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(root / "run"),
            "check_val_every_n_epoch": max(epochs // 4, 1),
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 5,
            "enable_progress_bar": not quick,
        },
    }
    config_path = root / "ssd_shapes.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = lightning_cli({"fit": config})
    ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    out_dir = root / "detect_eval"
    detect_eval_main(["--config", str(config_path), "--ckpt_path", str(ckpt), "--out", str(out_dir)])
    stats = json.loads((out_dir / "coco_eval.json").read_text())
    rows = [
        DemoRow("detection", f"SSD α0.25-{size} shapes val AP", f"{100 * stats['AP']:.1f}%", "19.3% (COCO)"),
        DemoRow("detection", f"SSD α0.25-{size} shapes val AP50", f"{100 * stats['AP50']:.1f}%"),
    ]
    if not quick:
        prof = SSDDetection(num_classes=91).profile()
        rows.append(
            DemoRow(
                "detection",
                "SSD300 MAdds / params",
                f"{prof.mult_adds / 1e9:.2f}B / {prof.million_parameters:.2f}M",
                "1.2B / 6.8M",
            )
        )
    return rows
