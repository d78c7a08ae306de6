"""Demo step: face embeddings from the shipped triplet recipe and the built-in ImageNet weights, 10-fold
verification on held-out people, and a search index of them probed with photos it has not seen."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.tasks.cli.demo.recipe import OFFICIAL_WEIGHTS, quiet_trainer, shipped_config
from mobilenets.tasks.cli.demo.rows import DemoRow
from mobilenets.tasks.cli.faces import main as faces_main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.faces.index import FaceIndex

#: (training identities, images each, held-out identities, image size, input size, epochs, batches per epoch)
#: (seeds 0-2: 10-fold accuracy 94.5-96.5% with 48 identities and 5 epochs of 10 batches; 97-99% as here)
FULL = (192, 8, 30, 72, 64, 20, 20)
QUICK = (24, 5, 20, 56, 48, 3, 6)
#: identities of the held-out gallery whose last photo is kept out of it and used as a probe
PROBES = 5
#: matched (and as many mismatched) test pairs per fold of the 10-fold protocol
PAIRS_PER_FOLD = 10


def run_demo(root: Path, quick: bool) -> list[Any]:
    """Identity folders on cluttered backgrounds → triplet fine-tuning → 10-fold verification on people
    seen neither in training nor in validation → an index of that gallery → searches with held-out photos."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    identities, per_identity, held_out, size, input_size, epochs, batches = QUICK if quick else FULL
    make_identity_folders(
        root / "train", identities, per_identity, size=size, seed=0, clutter=True
    )  # fmt: skip
    val, lfw = root / "val", root / "lfw"
    make_identity_folders(val, 20, 4, size=size, seed=2, prefix="Val", clutter=True)
    make_identity_folders(lfw, held_out, 5, size=size, seed=1, prefix="Test", clutter=True)
    probes = []
    for number in range(PROBES):  # held out of the gallery and of the pairs
        name = f"Test_{number * (held_out // PROBES):04d}"
        probe = root / "probes" / f"{name}_0005.jpg"
        probe.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(lfw / name / f"{name}_0005.jpg", probe)
        probes.append((name, probe))
    make_lfw_pairs(val / "pairs.txt", val, folds=10, pairs_per_fold=5, seed=2)
    make_lfw_pairs(lfw / "pairs.txt", lfw, folds=10, pairs_per_fold=PAIRS_PER_FOLD, seed=1)

    config = shipped_config(
        "faces_triplet",
        {
            "trainer": quiet_trainer(str(root / "runs"), epochs, log_every_n_steps=2),
            "model": {
                "init_args": {
                    **OFFICIAL_WEIGHTS,
                    "input_size": input_size,
                    "embedding_size": 64,
                    "plot_dir": str(root / "plots"),
                }
            },
            "data": {
                "init_args": {
                    "train_dir": str(root / "train"),
                    "pairs_file": str(val / "pairs.txt"),
                    "pairs_dir": str(val),
                    "test_pairs_file": str(lfw / "pairs.txt"),
                    "test_pairs_dir": str(lfw),
                    "identities_per_batch": 8,
                    "images_per_identity": 4,
                    "batch_size": 64,
                    "batches_per_epoch": batches,
                    "num_workers": 0,
                }
            },
        },
    )
    fit = lightning_cli({"subcommand": "fit", "fit": config})
    callback = fit.trainer.checkpoint_callback
    checkpoint = callback.best_model_path or callback.last_model_path
    test = lightning_cli({"subcommand": "test", "test": {**config, "ckpt_path": checkpoint}})
    report = test.model.last_report

    index_dir = root / "index"
    build = ["index", "build", "--gallery", str(lfw), "--ckpt_path", checkpoint, "--out", str(index_dir)]
    if faces_main(build) != 0:
        raise RuntimeError(f"building the demo index in {index_dir} failed (see the error above)")
    name, probe = probes[0]
    print(f"\nsearching the gallery with the held-out photo {probe} (of {name}):")
    faces_main(["search", "--index", str(index_dir), "--image", str(probe), "-k", "5"])
    index = FaceIndex.open(index_dir)
    answers = [(name, index.identify(index.search(probe, k=5))) for name, probe in probes]
    found = sum(answer == name for name, answer in answers)
    first_hits = index.search(probes[0][1], k=5)
    return [
        DemoRow(
            "faces",
            f"10-fold accuracy ({20 * PAIRS_PER_FOLD} pairs of held-out people)",
            f"{100 * report.accuracy:.1f}%",
            baseline="50.0% (chance)",
        ),
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
            f"search held-out {name} photo",
            f"{answers[0][1]} (top-1 {first_hits[0].identity}, cosine {first_hits[0].cosine:.3f})",
        ),
        DemoRow(
            "faces",
            f"held-out probes identified (gallery of {held_out})",
            f"{found}/{len(probes)}",
            baseline=f"{len(probes) / held_out:.1f}/{len(probes)} (chance)",
        ),
    ]
