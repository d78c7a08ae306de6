"""Every task family under DDP: two CPU processes (gloo) run ``mobilenets fit``, ``test`` and ``predict``
through the command's own entry, launched the two ways a cluster launches it (``torchrun``, and SLURM's
variables as ``srun`` sets them), and one process then validates, tests and predicts with the checkpoint they
wrote: the metrics and the output files must be the same.

One launch runs a family's commands in sequence (``ddp_probe.py``, written beside the run: it calls
``mobilenets.tasks.cli.main`` once per command line), which saves the start-up of a launch per command.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import yaml

from mobilenets.datasets.synthetic.celeba import make_celeba
from mobilenets.datasets.synthetic.coco import make_coco_shapes
from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.datasets.synthetic.stanford_dogs import make_stanford_dogs
from mobilenets.tasks.cli import main
from mobilenets.tasks.faces.index import FaceIndex

pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = '''"""Run ``mobilenets`` command lines in sequence (argv: a JSON file of lists), and the callback that
writes what each process saw."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl


class Probe(pl.Callback):
    """Writes ``<folder>/<stage>.rank<r>.json``: the callback metrics and world size at the end of each
    stage, and for fit the sample indices this process trained on, batch by batch."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "index" in batch:
            self.batches.append([int(i) for i in batch["index"]])

    def _write(self, trainer, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        record = {"world_size": trainer.world_size, "metrics": metrics, "batches": self.batches}
        (self.folder / f"{stage}.rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test")


if __name__ == "__main__":
    from mobilenets.tasks.cli import main

    for argv in json.loads(Path(sys.argv[1]).read_text()):
        status = main(argv)
        if status:
            sys.exit(status)
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of ``ddp_probe.py``, importable here (the single-process runs) and in the launched
    processes (through PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("probe")
    (folder / "ddp_probe.py").write_text(PROBE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(probe: Path, script: list[str], launcher: Literal["torchrun", "slurm"], log: Path) -> None:
    """Run the Python ``script`` (its path, then its arguments) in two processes on this machine.

    ``torchrun``: ``python -m torch.distributed.run --nproc_per_node 2`` (the README's command).
    ``slurm``: two plain processes with the variables ``srun --ntasks-per-node 2`` gives each task, so
    Lightning's SLURM detection sets up the process group (the README's sbatch script)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    for key in [k for k in env if k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))]:
        del env[key]
    port = free_port()
    if launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        argv += ["--master_addr", "127.0.0.1", "--master_port", str(port), *script]
        runs = [(argv, env)]
    else:
        common = {
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "mobilenets-fit",
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        runs = [
            (
                [sys.executable, *script],
                {**env, **common, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            )
            for rank in range(2)
        ]
    outputs = [log.with_name(f"{log.name}.{n}.txt") for n in range(len(runs))]
    processes = [
        subprocess.Popen(argv, env=run_env, stdout=out.open("w"), stderr=subprocess.STDOUT)
        for (argv, run_env), out in zip(runs, outputs)
    ]
    try:
        codes = [process.wait(timeout=400) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if any(codes):
        tails = "\n".join(out.read_text()[-4000:] for out in outputs)
        pytest.fail(f"{launcher} launch exited {codes}:\n{tails}")


def probed(folder: Path, stage: str, rank: int = 0) -> dict[str, Any]:
    return json.loads((folder / f"{stage}.rank{rank}.json").read_text())


def base_config(root: Path, devices: int, model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """One epoch, no sanity check, last.ckpt in ``root/ckpt``, the probe writing to ``root/probe``."""
    trainer: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": devices,
        "num_nodes": 1,
        "default_root_dir": str(root),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "callbacks": [
            {
                "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root / "ckpt"), "save_last": True},
            },
            {"class_path": "ddp_probe.Probe", "init_args": {"folder": str(root / "probe")}},
        ],
    }
    if devices > 1:
        trainer["strategy"] = "ddp"
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def run_family(
    tmp_path: Path,
    probe: Path,
    model: dict[str, Any],
    data: dict[str, Any],
    outputs: dict[str, str],
    launcher: Literal["torchrun", "slurm"] = "torchrun",
    stages: tuple[str, ...] = ("test", "predict"),
    readme_fit: bool = False,
) -> tuple[Path, Path]:
    """``fit`` then ``stages`` in two processes, then ``validate`` and ``stages`` in this one on the
    checkpoint the two wrote. ``outputs``: model option → file name, placed under each run's own folder.
    ``readme_fit``: launch ``fit`` on its own with the README's command line (``torchrun ... -m
    mobilenets.tasks.cli fit --config ... --trainer.strategy ddp --trainer.num_nodes 1``) instead of in the
    probe's sequence. Returns the two run folders (``ddp``, ``single``)."""
    runs = {}
    for name, devices in (("ddp", 2), ("single", 1)):
        root = tmp_path / name
        options = {key: str(root / "out" / file) for key, file in outputs.items()}
        model_config = {**model, "init_args": {**model["init_args"], **options}}
        config = root / "family.yaml"  # not config.yaml: each run saves its own config there
        root.mkdir()
        config.write_text(yaml.safe_dump(base_config(root, devices, model_config, data)))
        runs[name] = (root, config)
    ddp_root, ddp_config = runs["ddp"]
    checkpoint = str(ddp_root / "ckpt" / "last.ckpt")
    commands = [["fit", "--config", str(ddp_config)]]
    if readme_fit:
        argv = ["-m", "mobilenets.tasks.cli", *commands.pop(), "--trainer.strategy", "ddp"]
        launch(probe, [*argv, "--trainer.num_nodes", "1"], launcher, tmp_path / "fit")
    commands += [[stage, "--config", str(ddp_config), "--ckpt_path", checkpoint] for stage in stages]
    commands_file = tmp_path / "commands.json"
    commands_file.write_text(json.dumps(commands))
    launch(probe, [str(probe / "ddp_probe.py"), str(commands_file)], launcher, tmp_path / "launch")
    single_root, single_config = runs["single"]
    for stage in ("validate", *stages):
        assert main([stage, "--config", str(single_config), "--ckpt_path", checkpoint]) == 0
    # the metrics of the two runs: fit's last validation against validate, then test
    fit = probed(ddp_root / "probe", "fit")
    assert fit["world_size"] == 2
    validated = probed(single_root / "probe", "validate")["metrics"]
    assert validated, "validate logged no metrics"
    assert_same_metrics(fit["metrics"], validated)
    if "test" in stages:
        ddp_test, single_test = (probed(root / "probe", "test") for root in (ddp_root, single_root))
        assert ddp_test["world_size"] == 2 and single_test["world_size"] == 1
        assert ddp_test["metrics"] == probed(ddp_root / "probe", "test", rank=1)["metrics"]
        assert_same_metrics(ddp_test["metrics"], single_test["metrics"])
    return ddp_root, single_root


def assert_same_metrics(ddp: dict[str, float], single: dict[str, float]) -> None:
    """Every evaluation metric of the single-process run has the same value in the DDP run."""
    shared = {key for key in single if not key.startswith("train/")}
    assert shared <= set(ddp), f"missing under DDP: {sorted(shared - set(ddp))}"
    for key in sorted(shared):
        assert ddp[key] == pytest.approx(single[key], abs=1e-4, nan_ok=True), key


def train_batches(root: Path) -> dict[int, list[list[int]]]:
    return {rank: probed(root / "probe", "fit", rank)["batches"] for rank in (0, 1)}


def assert_same_csv(ddp: Path, single: Path, tolerance: float = 1e-4) -> None:
    """The same header and rows in the same order; numbers within ``tolerance`` (float noise of other
    batch compositions), text exactly."""
    with ddp.open(newline="") as a, single.open(newline="") as b:
        rows_a, rows_b = list(csv.reader(a)), list(csv.reader(b))
    assert rows_a[0] == rows_b[0] and len(rows_a) == len(rows_b) > 1
    for row_a, row_b in zip(rows_a[1:], rows_b[1:]):
        for cell_a, cell_b in zip(row_a, row_b, strict=True):
            try:
                assert float(cell_a) == pytest.approx(float(cell_b), abs=tolerance)
            except ValueError:
                assert cell_a == cell_b
    assert not list(ddp.parent.glob(f"{ddp.stem}.rank*")), "the shards were left beside the merged file"


# --------------------------------------------------------------------------- the families
@pytest.mark.slow
def test_classification_torchrun(probe: Path, tmp_path: Path) -> None:
    dogs = make_stanford_dogs(
        tmp_path / "dogs", num_classes=3, train_per_class=8, test_per_class=4, size=(40, 32)
    )
    model = {
        "class_path": "mobilenets.tasks.classification.ImageClassifier",
        "init_args": {"width_mult": 0.25, "input_size": 32, "optimizer": "adamw", "lr": 0.003},
    }
    data = {
        "class_path": "mobilenets.datasets.stanford_dogs.StanfordDogsDataModule",
        "init_args": {
            "root": str(dogs.root),
            "batch_size": 4,
            "num_workers": 0,
            "val_fraction": 0.25,
            "predict_dir": str(dogs.root / "Images"),
        },
    }
    outputs = {"predictions_file": "predictions.csv"}
    ddp, single = run_family(tmp_path, probe, model, data, outputs, readme_fit=True)
    batches = train_batches(ddp)
    seen = [{i for batch in batches[rank] for i in batch} for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) > 0 and not seen[0] & seen[1]
    assert_same_csv(ddp / "out" / "predictions.csv", single / "out" / "predictions.csv")
    assert_same_csv(ddp / "per_class_accuracy.csv", single / "per_class_accuracy.csv")  # the test report


@pytest.mark.slow
def test_attributes_with_a_cached_teacher(probe: Path, tmp_path: Path) -> None:
    make_celeba(tmp_path / "celeba", 32, size=(40, 48), fractions=(0.5, 0.25))
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 40))
    torch.jit.script(net).save(str(teacher))
    model = {
        "class_path": "mobilenets.tasks.attributes.AttributeModel",
        "init_args": {
            "width_mult": 0.25,
            "input_size": 32,
            "teacher": str(teacher),
            "teacher_input_size": 32,
            "teacher_cache_dir": str(tmp_path / "cache"),
            "teacher_batch_size": 5,
        },
    }
    data = {
        "class_path": "mobilenets.datasets.celeba.CelebADataModule",
        "init_args": {"root": str(tmp_path / "celeba"), "batch_size": 4, "num_workers": 0, "augment": False},
    }
    ddp, single = run_family(tmp_path, probe, model, data, {"predictions_file": "predictions.csv"})
    (array,) = (tmp_path / "cache").glob("*.npy")  # built once, by the two processes together
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the array and its index, no temporaries
    # the shares of the images were put back in order: the cache holds what one process computes
    from mobilenets.datasets.celeba import CelebADataModule
    from mobilenets.tasks.attributes import AttributeModel
    from mobilenets.tasks.teacher import Teacher, TeacherInputs, cached_teacher_outputs

    loaded = Teacher.load(teacher, expected_outputs=40)
    datamodule = CelebADataModule(str(tmp_path / "celeba"), input_size=32, num_workers=0)
    datamodule.setup("fit")
    inputs = TeacherInputs.of(loaded, 32, AttributeModel(width_mult=0.25, input_size=32))
    alone = cached_teacher_outputs(
        loaded, datamodule.image_paths, inputs.key, inputs.batch(), tmp_path / "alone", activation="sigmoid"
    )
    np.testing.assert_allclose(np.load(array), alone.outputs, atol=1e-6)
    assert_same_csv(ddp / "out" / "predictions.csv", single / "out" / "predictions.csv")
    assert_same_csv(ddp / "attribute_ap.csv", single / "attribute_ap.csv")  # the test report


@pytest.mark.slow
def test_geolocation_under_slurm_variables(probe: Path, tmp_path: Path) -> None:
    geo = make_geotags(
        tmp_path / "geo",
        num_regions=3,
        train_per_region=8,
        val_per_region=2,
        test_per_region=4,
        image_size=32,
    )
    partition = tmp_path / "partition.csv"
    argv = ["geo", "partition", str(geo.train_csv), "--out", str(partition), "--max-photos", "8"]
    assert main([*argv, "--min-photos", "2"]) == 0
    model = {
        "class_path": "mobilenets.tasks.geolocation.GeoClassifier",
        "init_args": {"partition": str(partition), "width_mult": 0.25, "input_size": 32, "top_k": 2},
    }
    data = {
        "class_path": "mobilenets.datasets.geotags.GeotagDataModule",
        "init_args": {
            "partition": str(partition),
            "train_csv": str(geo.train_csv),
            "val_csv": str(geo.val_csv),
            "test_csv": str(geo.test_csv),
            "predict_csv": str(geo.test_csv),
            "image_root": str(geo.image_root),
            "batch_size": 4,
            "num_workers": 0,
        },
    }
    ddp, single = run_family(tmp_path, probe, model, data, {"predictions_dir": "geo"}, launcher="slurm")
    test = probed(ddp / "probe", "test")["metrics"]
    assert {"test/acc_2500km", "test/median_km"} <= set(test)
    assert_same_csv(ddp / "out" / "geo" / "predictions.csv", single / "out" / "geo" / "predictions.csv")
    assert (ddp / "out" / "geo" / "accuracy_vs_distance.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["SSDDetection", "FasterRCNNDetection"])
def test_detection(probe: Path, tmp_path: Path, detector: str) -> None:
    root = make_coco_shapes(tmp_path / "shapes", {"train": 8, "val": 6}, size_range=(64, 64), max_objects=2)
    model = {
        "class_path": f"mobilenets.tasks.detection.{detector}",
        "init_args": {"width_mult": 0.25, "input_size": 64, "num_classes": 4, "score_thresh": 0.0},
    }
    data = {
        "class_path": "mobilenets.datasets.coco.CocoDataModule",
        "init_args": {
            "root": str(root),
            "train_split": "train",
            "val_split": "val",
            "test_split": "val",
            "augment": "none",
            "batch_size": 2,
            "num_workers": 0,
            "predict_dir": str(root / "val"),
        },
    }
    ddp, single = run_family(tmp_path, probe, model, data, {"predictions_dir": "detections"})
    assert "val/mAP" in probed(ddp / "probe", "fit")["metrics"]
    merged, alone = (
        json.loads((run / "out" / "detections" / "detections.json").read_text()) for run in (ddp, single)
    )
    assert len(merged) == len(alone) > 0
    assert [d["image_id"] for d in merged] == [d["image_id"] for d in alone]
    np.testing.assert_allclose([d["score"] for d in merged], [d["score"] for d in alone], atol=1e-4)
    np.testing.assert_allclose([d["bbox"] for d in merged], [d["bbox"] for d in alone], atol=1e-2)
    # the test's gathered COCO results, in the dataset's image order as one process lists them
    tested = [json.loads((run / "test_detections.json").read_text()) for run in (ddp, single)]
    assert [d["image_id"] for d in tested[0]] == [d["image_id"] for d in tested[1]] and tested[0]


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_identity_folders(root / "train", num_identities=8, images_per_identity=4, size=36, seed=2)
    make_identity_folders(
        root / "lfw", num_identities=6, images_per_identity=3, size=36, seed=3, prefix="Test"
    )
    make_lfw_pairs(root / "lfw" / "pairs.txt", root / "lfw", folds=3, pairs_per_fold=2, seed=3)
    return root


def face_configs(faces: Path, **model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {
            "class_path": "mobilenets.tasks.faces.embedding.FaceEmbedder",
            "init_args": {"width_mult": 0.25, "input_size": 32, "embedding_size": 16, **model},
        },
        {
            "class_path": "mobilenets.datasets.faces.FaceDataModule",
            "init_args": {
                "train_dir": str(faces / "train"),
                "pairs_file": str(faces / "lfw" / "pairs.txt"),
                "pairs_dir": str(faces / "lfw"),
                "identities_per_batch": 2,
                "images_per_identity": 2,
                "batches_per_epoch": 2,
                "batch_size": 4,
                "num_workers": 0,
            },
        },
    )


@pytest.mark.slow
def test_faces_triplet_with_the_pk_sampler(probe: Path, faces: Path, tmp_path: Path) -> None:
    model, data = face_configs(faces, loss="triplet")
    data["init_args"]["predict_dir"] = str(faces / "lfw")
    outputs = {"plot_dir": "plots", "embeddings_file": "embeddings.csv"}
    ddp, single = run_family(tmp_path, probe, model, data, outputs)
    assert "val/accuracy" in probed(ddp / "probe", "fit")["metrics"]
    identity = [folder.name for folder in sorted((faces / "train").iterdir()) for _ in folder.iterdir()]
    batches = train_batches(ddp)
    assert len(batches[0]) == len(batches[1]) == 2
    for step in range(2):  # the two processes' simultaneous batches: P×K each, no identity in both
        people = [Counter(identity[i] for i in batches[rank][step]) for rank in (0, 1)]
        assert all(sorted(p.values()) == [2, 2] for p in people)
        assert not set(people[0]) & set(people[1])
    reports = [json.loads((run / "out" / "plots" / "faces_report.json").read_text()) for run in (ddp, single)]
    assert reports[0]["num_pairs"] == 12 and reports[0] == pytest.approx(reports[1], abs=1e-4)
    threshold = torch.load(ddp / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]["threshold"]
    assert torch.isfinite(threshold)
    # predict: each process wrote its embedding shard, merged into the single-process file
    assert_same_csv(ddp / "out" / "embeddings.csv", single / "out" / "embeddings.csv")
    shards = sorted(p.name for p in (ddp / "out").glob("embeddings.shard-*.npy"))
    assert shards == ["embeddings.shard-00000-of-00002.npy", "embeddings.shard-00001-of-00002.npy"]
    counts = [len(np.load(ddp / "out" / name)) for name in shards]
    assert sum(counts) == 18 and min(counts) > 0  # the 6 x 3 gallery faces, split between the processes
    # and the index built from the two shards, without the model, equals the one of the single run's shard
    found = {}
    for run in (ddp, single):
        index = run / "index"
        assert main(["faces", "index", "build", "--embeddings", str(run / "out"), "--out", str(index)]) == 0
        opened = FaceIndex.open(index)
        probe_image = sorted((faces / "lfw").rglob("*.jpg"))[4]
        hits = opened.search(np.load(run / "out" / "embeddings.npy")[4], k=3)
        found[run.name] = (len(opened), [(h.path, round(h.cosine, 4)) for h in hits])
        assert hits[0].path == str(probe_image.resolve())
    assert found["ddp"] == found["single"] and found["ddp"][0] == 18


@pytest.mark.slow
def test_faces_distillation_from_a_cached_teacher(probe: Path, faces: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16))
    torch.jit.script(net).save(str(teacher))
    model, data = face_configs(
        faces, loss="distill", teacher=str(teacher), teacher_cache_dir=str(tmp_path / "cache")
    )
    data["init_args"]["sampler"] = "shuffle"
    ddp, _ = run_family(tmp_path, probe, model, data, {"plot_dir": "plots"}, stages=("test",))
    (array,) = (tmp_path / "cache").glob("*.npy")
    assert np.load(array).shape == (32, 16)
    batches = train_batches(ddp)
    seen = [{i for batch in batches[rank] for i in batch} for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) > 0 and not seen[0] & seen[1]


# --------------------------------------------------------------------------- the pieces, function by function
TEACHER_SCRIPT = '''"""Two processes build one teacher cache: argv = images folder, cache folder, report folder."""

import json
import sys
from pathlib import Path

import torch

from mobilenets.tasks.distributed import leave_together_at_exit
from mobilenets.tasks.teacher import Teacher, cached_teacher_outputs

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
images, cache_dir, report = (Path(arg) for arg in sys.argv[1:4])
paths = sorted(images.iterdir())
seen = []


def forward(batch):
    seen.extend(int(v) for v in batch[:, 0])
    return torch.cat([batch, 2 * batch], 1)


def make_batch(chunk):
    return torch.tensor([[float(path.stem)] for path in chunk])


teacher = Teacher(forward, Path(sys.argv[0]), checksum="0" * 64)
first = cached_teacher_outputs(teacher, paths, "counting", make_batch, cache_dir, batch_size=2)
ran = list(seen)
seen.clear()
second = cached_teacher_outputs(teacher, paths, "counting", make_batch, cache_dir, batch_size=2)
record = {"ran": ran, "built": first.built, "outputs": first.outputs.tolist()}
record.update(ran_again=seen, built_again=second.built)
(report / f"rank{rank}.json").write_text(json.dumps(record))
leave_together_at_exit()  # as the CLI does: one process leaving first made the other abort at exit
'''


@pytest.mark.slow
def test_teacher_cache_is_built_once_by_both_processes_sharing_the_images(
    probe: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for number in range(7):  # an odd count: the shares differ by one
        (images / f"{number:02d}.txt").write_text(str(number))
    script = tmp_path / "teacher_job.py"
    script.write_text(TEACHER_SCRIPT)
    report = tmp_path / "report"
    report.mkdir()
    launch(
        probe,
        [str(script), str(images), str(tmp_path / "cache"), str(report)],
        "torchrun",
        tmp_path / "launch",
    )
    records = [json.loads((report / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["ran"] == [0, 2, 4, 6] and records[1]["ran"] == [1, 3, 5]  # each image once
    expected = [[float(n), 2.0 * n] for n in range(7)]
    assert all(r["outputs"] == expected and r["built"] for r in records)  # every process reads all rows
    assert all(r["ran_again"] == [] and not r["built_again"] for r in records)  # then the cache is reused
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]


class _Trainer:
    """What ``merge_predict_shards`` reads of a trainer, for one process of a run (the barrier: nothing to
    wait for when the processes are run one after the other)."""

    def __init__(self, world_size: int, global_rank: int) -> None:
        self.world_size, self.global_rank = world_size, global_rank
        self.is_global_zero = global_rank == 0
        self.strategy = self
        self.log_dir = None
        self.default_root_dir = "."

    def barrier(self, name: str | None = None) -> None:
        pass


def test_csv_shards_merge_into_the_single_process_order(tmp_path: Path) -> None:
    from mobilenets.datasets.atomic import write_csv_atomic
    from mobilenets.tasks.prediction_files import merge_predict_shards, predict_output_path

    rows = [["path", "score"]] + [[f"img{n}.jpg", f"{n / 10:.6f}"] for n in range(5)]
    output = tmp_path / "predictions.csv"
    shards = []
    for rank in (1, 0):  # process 0 merges, once both shards are there
        trainer = _Trainer(2, rank)
        shard = predict_output_path(trainer, output, "predictions.csv")
        assert shard.name == f"predictions.rank{rank}.csv"
        write_csv_atomic(shard, [rows[0], *rows[1 + rank :: 2]])  # the sampler's share: every second image
        shards.append(merge_predict_shards(trainer, shard))
    assert shards == [output, output]
    assert output.read_text() == "".join(",".join(row) + "\n" for row in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_npy_shards_merge_into_the_single_process_order(tmp_path: Path) -> None:
    from mobilenets.tasks.prediction_files import PredictShardError, merge_npy_shards

    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    shards = [tmp_path / f"e.rank{rank}.npy" for rank in (0, 1)]
    for rank, shard in enumerate(shards):
        np.save(shard, rows[rank::2])  # the sampler's share: every second image
    merge_npy_shards(shards, tmp_path / "e.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), rows)
    np.save(shards[1], np.zeros((2, 3), np.float32))
    with pytest.raises(
        PredictShardError, match=r"e.rank1.npy: rows of shape \(3,\), but .*different row shapes"
    ):
        merge_npy_shards(shards, tmp_path / "f.npy")
    assert not (tmp_path / "f.npy").exists()


def test_shards_that_do_not_fit_are_refused_naming_the_shard(tmp_path: Path) -> None:
    from mobilenets.datasets.atomic import write_csv_atomic
    from mobilenets.tasks.prediction_files import PredictShardError, merge_csv_shards, merge_predict_shards

    a, b = tmp_path / "p.rank0.csv", tmp_path / "p.rank1.csv"
    write_csv_atomic(a, [["path", "x"], ["0", "0"], ["2", "2"]])
    write_csv_atomic(b, [["path", "y"], ["1", "1"]])
    with pytest.raises(PredictShardError, match=r"p\.rank1\.csv: header \['path', 'y'\] differs"):
        merge_csv_shards([a, b], tmp_path / "p.csv")
    write_csv_atomic(b, [["path", "x"]])
    with pytest.raises(
        PredictShardError, match=r"p\.rank1\.csv: 0 rows, expected 2 or 1 \(process 0's share has 2"
    ):
        merge_csv_shards([a, b], tmp_path / "p.csv")
    b.unlink()
    with pytest.raises(PredictShardError, match=r"p\.rank1\.csv: predict shard of process 1 not found"):
        merge_predict_shards(_Trainer(2, 0), a)
    assert not (tmp_path / "p.csv").exists()  # nothing half-merged


def test_json_shards_merge_in_image_order(tmp_path: Path) -> None:
    from operator import itemgetter

    from mobilenets.tasks.prediction_files import merge_json_shards

    shards = [tmp_path / "d.rank0.json", tmp_path / "d.rank1.json"]
    # image 2 has no detection: a per-image interleave would misplace the rest, the image order does not
    shards[0].write_text(
        json.dumps([{"image_id": 0, "s": 1}, {"image_id": 0, "s": 2}, {"image_id": 4, "s": 3}])
    )
    shards[1].write_text(json.dumps([{"image_id": 1, "s": 4}, {"image_id": 3, "s": 5}]))
    merge_json_shards(shards, tmp_path / "d.json", order=itemgetter("image_id"))
    merged = json.loads((tmp_path / "d.json").read_text())
    assert [(d["image_id"], d["s"]) for d in merged] == [(0, 1), (0, 2), (1, 4), (3, 5), (4, 3)]


LEAVE_SCRIPT = '''"""Two processes leave: rank 1 finishes 2 s after rank 0; argv = report folder."""

import atexit
import sys
import time
from pathlib import Path

import torch

from mobilenets.tasks.distributed import leave_together_at_exit

report = Path(sys.argv[1])
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
# registered first, so it runs after leave_together_at_exit's handler (atexit runs last-in first-out)
atexit.register(lambda: (report / f"exit{rank}.txt").write_text(repr(time.time())))
leave_together_at_exit()
leave_together_at_exit()  # once per process, however often it is called
if rank == 1:
    time.sleep(2)
(report / f"done{rank}.txt").write_text(repr(time.time()))
'''


@pytest.mark.slow
def test_processes_leave_together_and_exit_cleanly(probe: Path, tmp_path: Path) -> None:
    script = tmp_path / "leave_job.py"
    script.write_text(LEAVE_SCRIPT)
    report = tmp_path / "report"
    report.mkdir()
    launch(probe, [str(script), str(report)], "torchrun", tmp_path / "launch")  # fails unless both exit 0
    stamp = {p.stem: float(p.read_text()) for p in report.iterdir()}
    assert set(stamp) == {"done0", "done1", "exit0", "exit1"}
    assert stamp["exit0"] >= stamp["done1"]  # rank 0 waited for rank 1 before it left
    assert not torch.distributed.is_initialized()  # this process was never part of it
