"""Every shipped config: parsed by the suite's CLI as a user's command line would, built without its ImageNet
weights, and trained for one batch (``fast_dev_run``) on small generated data in that config's format."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.synthetic.celeba import make_celeba, make_unlabeled_faces
from mobilenets.datasets.synthetic.coco import make_coco_shapes
from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.datasets.synthetic.folder import make_image_folder
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.datasets.synthetic.stanford_dogs import make_stanford_dogs
from mobilenets.tasks.attributes import AttributeModel
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.cli import main
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.faces.embedding import FaceEmbedder

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DETECTORS = ("mobilenets.tasks.detection.SSDDetection", "mobilenets.tasks.detection.FasterRCNNDetection")

# tiny models run fastest on one thread (two contend badly on a shared 2-core runner)
pytestmark = pytest.mark.usefixtures("one_thread")


class GeneratedData:
    """Small data sets in every format a config reads, each written once, on first use."""

    def __init__(self, root: Path, save_checkpoint: Callable[[BaseTask, Path], Path]) -> None:
        self.root = root
        self.save_checkpoint = save_checkpoint
        self.made: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self.made:
            self.made[name] = getattr(self, f"_make_{name}")(self.root / name)
        return self.made[name]

    def _make_dogs(self, root: Path) -> Path:
        return make_stanford_dogs(
            root, num_classes=3, train_per_class=4, test_per_class=2, size=(48, 40)
        ).root

    def _make_folder(self, root: Path) -> Path:
        return make_image_folder(root, ["cat", "dog", "owl"], per_class=4, size=(48, 40))

    def _make_celeba(self, root: Path) -> Path:
        make_celeba(root, 24, size=(40, 48), fractions=(0.5, 0.25))
        make_unlabeled_faces(root / "unlabeled", 4, size=(40, 48))
        return root

    def _make_coco(self, root: Path) -> Path:
        return make_coco_shapes(root, {"train": 4, "val": 2}, size_range=(64, 80))

    def _make_faces(self, root: Path) -> Path:
        make_identity_folders(root / "train", 6, 3, size=40, seed=0)
        make_identity_folders(root / "lfw", 20, 2, size=40, seed=1)
        make_lfw_pairs(root / "lfw" / "pairs.txt", root / "lfw", folds=10, pairs_per_fold=1, seed=1)
        return root

    def _make_geotags(self, root: Path) -> tuple[Any, Path]:
        data = make_geotags(root, num_regions=3, train_per_region=6, val_per_region=2, test_per_region=2)
        partition = root / "partition.csv"
        argv = ["geo", "partition", str(data.train_csv), "--out", str(partition), "--max-photos", "6"]
        assert main([*argv, "--min-photos", "2"]) == 0
        return data, partition

    def _make_attribute_teacher(self, root: Path) -> Path:
        root.mkdir(parents=True)
        teacher = AttributeModel(num_attributes=40, width_mult=0.25, input_size=32)
        return self.save_checkpoint(teacher, root / "teacher.ckpt")

    def _make_face_teacher(self, root: Path) -> Path:
        root.mkdir(parents=True)
        teacher = FaceEmbedder(embedding_size=128, width_mult=0.25, input_size=32)
        return self.save_checkpoint(teacher, root / "teacher.ckpt")


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory, save_checkpoint: Callable[[BaseTask, Path], Path]
) -> GeneratedData:
    return GeneratedData(tmp_path_factory.mktemp("generated"), save_checkpoint)


def format_options(
    model_class: str, model: dict[str, Any], data_class: str, data: dict[str, Any], generated: GeneratedData
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model options, data options) that point a task's model and datamodule at generated data in its
    format, keyed by ``init_args`` name."""
    model_options: dict[str, Any] = {}
    options: dict[str, Any] = {"batch_size": 2, "num_workers": 0}
    if data_class.endswith("StanfordDogsDataModule"):
        options["root"] = generated.get("dogs")
        model_options["num_classes"] = None  # the generated breeds, not the 120 of the real set
    elif data_class.endswith("FolderDataModule"):
        options["root"] = generated.get("folder")
        if model_class.endswith("ImageClassifier"):
            model_options["num_classes"] = None
    elif data_class.endswith("CelebADataModule"):
        root = generated.get("celeba")
        options["root"] = root
        if (
            "teacher" in model
        ):  # a distillation recipe: with a teacher and unlabeled faces, as its header says
            model_options["teacher"] = generated.get("attribute_teacher")
            options["unlabeled_dirs"] = [str(root / "unlabeled")]
    elif data_class.endswith("CocoDataModule"):
        options["root"] = generated.get("coco")
        options |= {"train_split": "train", "val_split": "val"}
    elif data_class.endswith("FaceDataModule"):
        root = generated.get("faces")
        options |= {
            "train_dir": root / "train",
            "pairs_file": root / "lfw" / "pairs.txt",
            "pairs_dir": root / "lfw",
        }
        if data.get("sampler") == "pk":
            options |= {"identities_per_batch": 2, "images_per_identity": 2}
        if model.get("loss") == "distill":
            model_options["teacher"] = generated.get("face_teacher")
    elif data_class.endswith("GeotagDataModule"):
        tags, partition = generated.get("geotags")
        model_options["partition"] = partition
        options |= {f"{split}_csv": getattr(tags, f"{split}_csv") for split in ("train", "val", "test")}
        options |= {"partition": partition, "image_root": tags.image_root}
    else:
        pytest.fail(f"{data_class}: no generated data for this format yet: add it to tests/test_configs.py")
    return model_options, options


def overrides_for(config: dict[str, Any], generated: GeneratedData) -> dict[str, Any]:
    """The options that point a config at generated data in its format and keep it small. A multi-task
    config's tasks and datamodules are nested mappings: their options are written into ``config`` itself."""
    model_class, model = config["model"]["class_path"], config["model"]["init_args"]
    data_class, data = config["data"]["class_path"], config["data"]["init_args"]
    options: dict[str, Any] = {"model.init_args.weights": None}
    options |= {"data.init_args.batch_size": 2, "data.init_args.num_workers": 0}
    if data_class.endswith("MultiDataModule"):
        detector = False
        for name, spec in data["datamodules"].items():
            task = model["tasks"][name]
            detector |= task["class_path"] in DETECTORS
            model_options, data_options = format_options(
                task["class_path"], task["init_args"], spec["class_path"], spec["init_args"], generated
            )
            task["init_args"] |= {k: str(v) if isinstance(v, Path) else v for k, v in model_options.items()}
            spec["init_args"] |= {k: str(v) if isinstance(v, Path) else v for k, v in data_options.items()}
        options["model.init_args.input_size"] = 64 if detector else 32
        return options
    options["model.init_args.input_size"] = 64 if model_class in DETECTORS else 32
    model_options, data_options = format_options(model_class, model, data_class, data, generated)
    options |= {f"model.init_args.{key}": value for key, value in model_options.items()}
    options |= {f"data.init_args.{key}": value for key, value in data_options.items()}
    return options


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def as_arguments(options: dict[str, Any]) -> list[str]:
    """``{"a.b": v}`` → ``["--a.b", v]`` as a shell would pass it (None as null, lists as JSON)."""
    argv = []
    for key, value in options.items():
        if value is None:
            text = "null"
        elif isinstance(value, list | dict):
            text = json.dumps(value)
        else:
            text = str(value)
        argv += [f"--{key}", text]
    return argv


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_trains_one_batch(path: Path, generated: GeneratedData, tmp_path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    trainer = {
        "trainer.fast_dev_run": 1,
        "trainer.default_root_dir": tmp_path / "run",
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
    }
    options = overrides_for(config, generated)  # may write into config (a multi-task config's nested tasks)
    written = tmp_path / path.name
    written.write_text(yaml.safe_dump(config))
    argv = ["--config", str(written), *as_arguments(options | trainer)]
    cli = lightning_cli(argv, run=False)

    model, datamodule = cli.model, cli.datamodule
    assert isinstance(model, class_of(config["model"]["class_path"]))
    assert isinstance(datamodule, class_of(config["data"]["class_path"]))
    assert model.hparams.width_mult == config["model"]["init_args"]["width_mult"]  # α as configured
    assert datamodule.input_size == model.hparams.input_size  # linked, stated once
    assert (datamodule.mean, datamodule.std) == tuple(map(tuple, model.normalization))
    cli.trainer.fit(model, datamodule=datamodule)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
