"""Demo step: face embeddings, 10-fold verification and a search index."""

from __future__ import annotations

import shutil
from pathlib import Path

from mobilenets.datasets.synthetic_faces import make_identity_folders, make_pairs_file
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.faces import main as faces_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.faces.index import FaceIndex


def run_demo(root: Path, quick: bool) -> list:
    """Synthetic identity folders and pairs.txt → a short triplet-loss training → 10-fold evaluation →
    an index of the gallery → a search with a held-out photo of a gallery identity."""

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    size, input_size = (40, 32) if quick else (72, 64)
    make_identity_folders(
        root / "train", num_identities=16 if quick else 40, images_per_identity=6, size=size, seed=0
    )
    lfw = root / "lfw"
    make_identity_folders(lfw, num_identities=20, images_per_identity=4, size=size, seed=1, prefix="Test")
    probe_identity = "Test_0003"
    probe = root / "probes" / f"{probe_identity}_0004.jpg"
    probe.parent.mkdir(parents=True)
    shutil.move(lfw / probe_identity / f"{probe_identity}_0004.jpg", probe)  # held out of gallery and pairs
    make_pairs_file(lfw / "pairs.txt", lfw, folds=10, pairs_per_fold=2, seed=1)

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 3 if quick else 15,
            "default_root_dir": str(root / "runs"),
            "accelerator": "auto",  # the GPU where there is one
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "mobilenets.tasks.faces.embedding.FaceEmbedder",
            "init_args": {
                "width_mult": 0.25,
                "input_size": input_size,
                "embedding_size": 32,
                "loss": "triplet",
                "margin": 0.2,
                "optimizer": "adamw",
                "lr": 0.003,
                "weight_decay": 0.0,
                "plot_dir": str(root / "plots"),
                "recalibrate_bn_batches": 4,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.faces.FaceDataModule",
            "init_args": {
                "train_dir": str(root / "train"),
                "pairs_file": str(lfw / "pairs.txt"),
                "pairs_dir": str(lfw),
                "input_size": input_size,
                "identities_per_batch": 6,
                "images_per_identity": 4,
                "batch_size": 64,
                "batches_per_epoch": 6 if quick else 12,
                "num_workers": 0,
            },
        },
    }
    fit = lightning_cli({"subcommand": "fit", "fit": config})
    checkpoint = (
        fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    )
    test = lightning_cli({"subcommand": "test", "test": {**config, "ckpt_path": checkpoint}})
    report = test.model.last_report

    index_dir = root / "index"
    if (
        faces_main(
            ["index", "build", "--gallery", str(lfw), "--ckpt_path", checkpoint, "--out", str(index_dir)]
        )
        != 0
    ):
        raise RuntimeError(f"building the demo index in {index_dir} failed (see the error above)")
    print(f"\nsearching the gallery with the held-out photo {probe} (of {probe_identity}):")
    faces_main(["search", "--index", str(index_dir), "--image", str(probe), "-k", "5"])
    index = FaceIndex.open(index_dir)
    hits = index.search(probe, k=5)
    answer = index.identify(hits)
    rows = [
        DemoRow("faces", "10-fold accuracy (synthetic pairs)", f"{100 * report.accuracy:.1f}%"),
        DemoRow("faces", "VAL@FAR=1e-3", f"{100 * report.val_at_far_1e3:.1f}%"),
        DemoRow(
            "faces",
            "VAL@FAR=1e-4 (Table 14 '1e-4 acc.')",
            f"{100 * report.val_at_far_1e4:.1f}%",
            "79.4% (1.0-160, LFW)",
        ),
        DemoRow("faces", "index", f"{index.kind}, {len(index)} faces, threshold {index.threshold:.3f}"),
        DemoRow(
            "faces",
            f"search held-out {probe_identity} photo",
            f"{answer} (top-1 {hits[0].identity}, cosine {hits[0].cosine:.3f})",
        ),
    ]
    return rows
