"""``MultiTask``: one MobileNet body, the tasks' own heads. Built from task checkpoints that share a backbone
(outputs equal each task's own), the refusals (backbone options, weights, taps, output names), joint training
with resume, predict's files from one body pass, and one ONNX export with a named output per head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mobilenets.datasets.images import list_images
from mobilenets.datasets.synthetic.celeba import make_celeba
from mobilenets.datasets.synthetic.folder import make_image_folder
from mobilenets.tasks.attributes import AttributeModel
from mobilenets.tasks.base import BaseTask, TaskHead
from mobilenets.tasks.classification import ImageClassifier
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.deploy.export import export_onnx
from mobilenets.tasks.detection.ssd import SSDDetection
from mobilenets.tasks.faces.embedding import FaceEmbedder
from mobilenets.tasks.multitask import MultiTask, MultiTaskError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
OPTIONS = {"width_mult": 0.25, "input_size": SIZE}


def _tasks(seed: int = 0) -> dict[str, BaseTask]:
    """Four tasks on one body (the classifier's, copied into the others: a shared frozen backbone)."""
    torch.manual_seed(seed)
    classifier = ImageClassifier(num_classes=3, class_names=["a", "b", "c"], **OPTIONS)
    body = {k: v for k, v in classifier.backbone.state_dict().items() if not k.startswith("classifier")}
    others = {
        "attributes": AttributeModel(num_attributes=5, attribute_names=list("vwxyz"), **OPTIONS),
        "embedding": FaceEmbedder(embedding_size=16, **OPTIONS),
        "detection": SSDDetection(num_classes=3, **OPTIONS),
    }
    for task in others.values():
        task.backbone.load_state_dict(body, strict=False)
    return {"classification": classifier, **others}


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, save_checkpoint: Callable[[BaseTask, Path], Path]
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: save_checkpoint(task.eval(), folder / f"{name}.ckpt") for name, task in _tasks().items()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make_image_folder(root, ["p", "q"], per_class=3, size=(80, 70))
    return root


def test_from_checkpoints_outputs_equal_each_task(checkpoints: dict[str, Path]) -> None:
    model = MultiTask.from_checkpoints(checkpoints)
    singles = {name: BaseTask.load_task(path) for name, path in checkpoints.items()}
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        outputs = model(images)
        for name in ("classification", "attributes", "embedding"):
            torch.testing.assert_close(outputs[name], singles[name](images), rtol=0, atol=1e-6)
        for ours, theirs in zip(outputs["detection"], singles["detection"].export_module()(images)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # one body: the four tasks' networks hold one copy of it
    assert all(task.backbone.blocks is model.backbone.blocks for task in model.tasks.values())
    separate = sum(p.parameters for p in model.separate_profiles().values())
    body = sum(p.numel() for p in model.backbone.parameters())
    assert model.profile().parameters == separate - 3 * body
    assert model.profile().mult_adds < sum(p.mult_adds for p in model.separate_profiles().values()) / 2


@pytest.mark.parametrize("key, value", [("width_mult", 0.5), ("input_size", 96), ("padding", "tf")])
def test_differing_backbone_options_are_refused(
    key: str, value: Any, checkpoints: dict[str, Path], save_checkpoint: Any, tmp_path: Path
) -> None:
    other = save_checkpoint(
        FaceEmbedder(embedding_size=16, **{**OPTIONS, key: value}), tmp_path / "other.ckpt"
    )
    with pytest.raises(MultiTaskError, match=rf"{other}: {key} is"):
        MultiTask.from_checkpoints({"classification": checkpoints["classification"], "embedding": other})


def test_backbone_weights_that_differ_are_refused(
    checkpoints: dict[str, Path], save_checkpoint: Any, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    other = save_checkpoint(FaceEmbedder(embedding_size=16, **OPTIONS), tmp_path / "other.ckpt")
    with pytest.raises(
        MultiTaskError, match=rf"{other}: backbone weight 'backbone\.stem\.conv\.weight' differs"
    ):
        MultiTask.from_checkpoints({"classification": checkpoints["classification"], "embedding": other})


def test_a_head_reading_a_missing_tap_is_refused(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def task_head(self: ImageClassifier) -> TaskHead:
        return TaskHead(self.backbone.classifier, ("block14",), lambda maps: maps["block14"], ("logits",))

    monkeypatch.setattr(ImageClassifier, "task_head", task_head)
    with pytest.raises(MultiTaskError, match="backbone tap 'block14'"):
        MultiTask.from_checkpoints({"classification": checkpoints["classification"]})


def test_colliding_output_names_are_refused(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(MultiTaskError, match="output name 'detection_box_deltas' is also an output of task"):
        MultiTask.from_checkpoints(
            {"detection": checkpoints["detection"], "detection_box_deltas": checkpoints["classification"]}
        )


def test_predict_writes_every_task_file_and_export_serves_them(
    checkpoints: dict[str, Path], photos: Path, tmp_path: Path, read_rows: Any
) -> None:
    model = MultiTask.from_checkpoints(checkpoints)
    onnx_path = tmp_path / "multitask.onnx"
    result = export_onnx(model, onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = ["classification", "attributes", "embedding", "detection_box_deltas", "detection_class_logits"]
    assert [o.name for o in session.get_outputs()] == names
    metadata = result.metadata
    assert json.loads(metadata["heads"]) == list(checkpoints)
    assert json.loads(metadata["classification.class_names"]) == ["a", "b", "c"]
    assert json.loads(metadata["attributes.attributes"]) == list("vwxyz")
    assert metadata["detection.num_anchors"] and metadata["embedding.embedding_size"] == "16"

    config = {
        "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu", "devices": 1},
        "model": {
            "class_path": "mobilenets.tasks.multitask.MultiTask",
            "init_args": {**OPTIONS, "checkpoints": {k: str(v) for k, v in checkpoints.items()}},
        },
        "data": {
            "class_path": "mobilenets.tasks.multitask.MultiDataModule",
            "init_args": {"predict_dir": str(photos), "batch_size": 4, "num_workers": 0},
        },
    }
    files: dict[str, list[Any]] = {}
    for source in ("ckpt", "onnx"):
        run = tmp_path / source
        config["trainer"]["default_root_dir"] = str(run)
        predict = {**config, "ckpt_path": str(onnx_path)} if source == "onnx" else config
        lightning_cli({"predict": predict})
        classes = read_rows(run / "classification" / "predictions.csv")
        attributes = read_rows(run / "attributes" / "predictions.csv")
        embeddings = np.load(run / "embedding" / "embeddings.npy")
        detections = json.loads((run / "detection" / "predictions" / "detections.json").read_text())
        assert len(classes) == len(attributes) == len(embeddings) == 6
        assert {row["class1_name"] for row in classes} <= {"a", "b", "c"}
        assert all(det["image_id"] in range(6) for det in detections)
        drawn = {p.name for p in (run / "detection" / "predictions").glob("*_detections.png")}
        assert drawn == {f"{p.stem}_detections.png" for p in list_images(photos)}  # one per file name
        files[source] = [classes, attributes, embeddings]
    # the export serves predict with the same results as the PyTorch heads
    assert [r["class1_index"] for r in files["onnx"][0]] == [r["class1_index"] for r in files["ckpt"][0]]
    np.testing.assert_allclose(files["onnx"][2], files["ckpt"][2], atol=1e-4)
    probabilities = [[float(r[name]) for name in "vwxyz"] for r in files["ckpt"][1]]
    assert np.all((np.array(probabilities) >= 0) & (np.array(probabilities) <= 1))


@pytest.mark.slow
def test_joint_fit_logs_each_task_and_resumes(tmp_path: Path) -> None:
    make_celeba(tmp_path / "celeba", 16, size=(40, 48), fractions=(0.5, 0.25))
    folder = make_image_folder(tmp_path / "folder", ["cat", "dog"], per_class=4, size=(48, 40))
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "accelerator": "cpu",
            "devices": 1,
        },
        "model": {
            "class_path": "mobilenets.tasks.multitask.MultiTask",
            "init_args": {
                "width_mult": 0.25,
                "input_size": 32,
                "optimizer": "adamw",
                "lr": 0.001,
                "loss_weights": {"attributes": 2.0},
                "freeze_backbone_epochs": 5,
                "tasks": {
                    "attributes": {
                        "class_path": "mobilenets.tasks.attributes.AttributeModel",
                        "init_args": {"num_attributes": 40},
                    },
                    "classification": {"class_path": "mobilenets.tasks.classification.ImageClassifier"},
                },
            },
        },
        "data": {
            "class_path": "mobilenets.tasks.multitask.MultiDataModule",
            "init_args": {
                "datamodules": {
                    "attributes": {
                        "class_path": "mobilenets.datasets.celeba.CelebADataModule",
                        "init_args": {"root": str(tmp_path / "celeba"), "batch_size": 4, "num_workers": 0},
                    },
                    "classification": {
                        "class_path": "mobilenets.datasets.folder.FolderDataModule",
                        "init_args": {"root": str(folder), "batch_size": 4, "num_workers": 0},
                    },
                },
            },
        },
    }
    cli = lightning_cli({"fit": config})
    model = cli.model
    body = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    metrics = cli.trainer.callback_metrics
    assert {"attributes/val/mAP", "classification/val/top1", "train/loss"} <= set(metrics)
    assert cli.trainer.global_step == 2
    # frozen body: only the heads learnt
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in body.items())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    config["trainer"]["max_epochs"] = 2
    resumed = lightning_cli({"fit": {**config, "ckpt_path": "last"}})
    assert resumed.trainer.global_step == 4
    rebuilt = BaseTask.load_task(last)
    assert isinstance(rebuilt, MultiTask) and list(rebuilt.tasks) == ["attributes", "classification"]
    assert rebuilt.tasks["classification"].hparams.class_names == ["cat", "dog"]


CLASSIFIER = "mobilenets.tasks.classification.ImageClassifier"


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"tasks": {"a": {"class_path": CLASSIFIER, "init_args": {"num_classes": 2, "width_mult": 0.5}}}},
            r"tasks\.a\.init_args\.width_mult: the shared backbone's options are the multi-task model's own",
        ),
        (
            {
                "tasks": {"a": {"class_path": CLASSIFIER, "init_args": {"num_classes": 2}}},
                "loss_weights": {"b": 1.0},
            },
            r"loss_weights\.b: no such task",
        ),
        ({"tasks": {"a.b": {"class_path": CLASSIFIER}}}, r"task name 'a\.b'"),
        (
            {"tasks": {"a": {"class_path": "mobilenets.datasets.folder.FolderDataModule"}}},
            "is not a task of this suite",
        ),
        ({"tasks": {}}, "needs at least one task"),
    ],
)
def test_bad_task_specs_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(MultiTaskError, match=message):
        MultiTask(**options, width_mult=0.25, input_size=32)


@pytest.mark.slow
def test_demo_step_shares_the_frozen_body_without_losing_accuracy(tmp_path: Path) -> None:
    from mobilenets.tasks.cli.demo.multitask import TASKS, run_demo

    rows = run_demo(tmp_path, quick=True)
    metrics = {row.metric.split()[0]: row for row in rows if "alone / shared" in row.metric}
    assert sorted(metrics) == sorted(TASKS)
    for row in metrics.values():
        alone, shared, _ = (float(v.rstrip("%")) for v in row.value.split(" / "))
        assert (
            abs(shared - alone) <= 1.0
        )  # the bar: each head within 1 point of its single-task model
    madds = next(row for row in rows if "mult-adds shared / separate" in row.metric)
    shared_madds, separate_madds = (float(v) for v in madds.value.split(" / "))
    assert shared_madds < separate_madds / 3
