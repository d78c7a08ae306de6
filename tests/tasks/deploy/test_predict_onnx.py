"""``mobilenets predict --ckpt_path model.onnx``: the task's own predict loop served by ONNX Runtime writes
the same files as with the checkpoint; exports that do not fit the config are refused by key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.images import list_images
from mobilenets.datasets.synthetic.folder import make_image_folder
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.tasks.attributes import AttributeModel
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.classification import ImageClassifier
from mobilenets.tasks.cli import main
from mobilenets.tasks.cli.onnx_predict import onnx_predict, prediction_rows
from mobilenets.tasks.deploy.export import ExportError, export_int8, export_onnx, preprocess_images
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError, OnnxNetwork
from mobilenets.tasks.deploy.speed import delta_orthogonal_, realistic_
from mobilenets.tasks.faces.embedding import FaceEmbedder
from mobilenets.tasks.geolocation import GeoClassifier

# tiny models run fastest on one thread (two contend badly on a shared 2-core runner)
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder"), CLASSES, per_class=4, size=(48, 40))


@pytest.fixture(scope="module")
def classifier_files(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, save_checkpoint: Any
) -> tuple[Path, Path]:
    """A 3-class 0.25 MobileNet-32 with trained-like margins (no training run) as a .ckpt and an .onnx."""
    torch.manual_seed(0)
    task = ImageClassifier(num_classes=3, class_names=CLASSES, width_mult=0.25, input_size=SIZE)
    paths = list_images(folder)
    images = torch.from_numpy(preprocess_images(paths, task.export_metadata()))
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    backbone = task.backbone
    delta_orthogonal_(backbone)
    realistic_(backbone, images, labels, lambda x: backbone.forward_head(backbone.forward_features(x), True))
    task.eval()
    root = tmp_path_factory.mktemp("classifier")
    export_onnx(task, root / "model.onnx")
    return save_checkpoint(task, root / "model.ckpt"), root / "model.onnx"


@pytest.fixture
def classify(read_rows: Any, run_predict: Any) -> Any:
    """``mobilenets predict`` with the shipped folder config at α 0.25 / 32 px; its ImageNet ``weights`` point
    to a missing file, so a run that tried to load them would fail."""

    def classify(folder: Path, model: Path, out: Path, run: Path) -> list[dict[str, str]]:
        run_predict(
            "folder_finetune.yaml",
            model,
            run,
            {
                "model.init_args.width_mult": 0.25,
                "model.init_args.input_size": SIZE,
                "model.init_args.weights": run / "missing_imagenet.safetensors",
                "model.init_args.predictions_file": out,
                "data.init_args.root": folder,
                "data.init_args.batch_size": 5,
                "data.init_args.predict_dir": folder,
            },
        )
        return read_rows(out)

    return classify


def top_classes(row: dict[str, str], prefix: str = "class", name: str = "name") -> dict[str, float]:
    ranks = sorted({int(k[len(prefix) :].split("_")[0]) for k in row if k.startswith(prefix) and "_" in k})
    return {row[f"{prefix}{r}_{name}"]: float(row[f"{prefix}{r}_probability"]) for r in ranks}


def assert_same_probabilities(expected: dict[str, float], got: dict[str, float]) -> None:
    assert set(got) == set(expected)
    assert max(abs(got[k] - expected[k]) for k in expected) < 1e-4


def test_predict_with_onnx_writes_the_checkpoints_csv(
    classifier_files: tuple[Path, Path],
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    classify: Any,
) -> None:
    ckpt, onnx = classifier_files
    expected = classify(folder, ckpt, tmp_path / "ckpt.csv", tmp_path / "run_ckpt")
    got = classify(folder, onnx, tmp_path / "onnx.csv", tmp_path / "run_onnx")
    assert f"predicting with {onnx} (ONNX Runtime)" in capsys.readouterr().out
    assert len(expected) == len(list_images(folder)) == 12
    assert list(got[0]) == list(expected[0])  # the same columns, in the same order
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for e, g in zip(expected, got):
        # 3 classes: the top-5 columns hold every class, so this compares every probability
        assert_same_probabilities(top_classes(e), top_classes(g))
        assert g["class1_name"] == e["class1_name"]
    # the export's class names reach the CSV although the config has num_classes: null and no names
    assert {r["class1_name"] for r in got} <= set(CLASSES)


def test_predict_with_an_int8_export(
    classifier_files: tuple[Path, Path], folder: Path, tmp_path: Path, classify: Any
) -> None:
    ckpt, _ = classifier_files
    task = BaseTask.load_task(ckpt)
    paths = list_images(folder)
    int8 = tmp_path / "model.int8.onnx"
    export_int8(task, int8, paths[::2], paths[1::2], min_agreement=0.0)
    expected = classify(folder, ckpt, tmp_path / "ckpt.csv", tmp_path / "run_ckpt")
    got = classify(folder, int8, tmp_path / "int8.csv", tmp_path / "run_int8")
    assert [r["path"] for r in got] == [r["path"] for r in expected] and list(got[0]) == list(expected[0])
    # the predict loop serves the int8 graph itself: ONNX Runtime on the same images gives the same numbers
    image_paths = [Path(row["path"]) for row in got]
    header, *direct = prediction_rows(image_paths, *onnx_predict(int8, image_paths))
    for row, values in zip(got, direct):
        assert_same_probabilities(top_classes(dict(zip(header, values))), top_classes(row))
        assert abs(sum(top_classes(row).values()) - 1) < 1e-3


def test_exports_of_another_task_size_or_normalisation_are_refused_by_key(
    classifier_files: tuple[Path, Path], folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, onnx = classifier_files
    with pytest.raises(
        ExportMismatchError, match=r"metadata key 'task'.*'AttributeModel'.*'ImageClassifier'"
    ):
        AttributeModel(num_attributes=3, width_mult=0.25, input_size=SIZE).use_exported(onnx)
    with pytest.raises(
        ExportMismatchError, match=r"model.onnx: metadata key 'input_size'.* 64, the export has 32"
    ):
        ImageClassifier(width_mult=0.25, input_size=64).use_exported(onnx)

    class OtherNormalization(ImageClassifier):
        @property
        def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
            return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    OtherNormalization.__name__ = "ImageClassifier"
    with pytest.raises(ExportMismatchError, match=r"metadata key 'mean'"):
        OtherNormalization(width_mult=0.25, input_size=SIZE).use_exported(onnx)
    with pytest.raises(ExportError, match=r"none.onnx: ONNX model not found"):
        ImageClassifier(width_mult=0.25, input_size=SIZE).use_exported(tmp_path / "none.onnx")
    # through the CLI: the config's input size is not the export's; one line, exit 2
    capsys.readouterr()
    assert main(
        [
            "predict",
            "--config", str(CONFIG_DIR / "folder_finetune.yaml"),
            "--model.init_args.input_size", "64",
            "--data.init_args.root", str(folder),
            "--data.init_args.num_workers", "0",
            "--data.init_args.predict_dir", str(folder),
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", "false",
            f"--ckpt_path={onnx}",
        ]
    ) == 2  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"mobilenets predict: error: {onnx}: metadata key 'input_size'"), err


def test_onnx_serves_predict_only(
    classifier_files: tuple[Path, Path], folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, onnx = classifier_files
    argv = ["--config", str(CONFIG_DIR / "folder_finetune.yaml"), "--data.init_args.root", str(folder)]
    assert main(["test", *argv, "--ckpt_path", str(onnx)]) == 2
    assert capsys.readouterr().err == (
        f"mobilenets test: error: {onnx}: an exported .onnx model serves 'predict' only; 'test' needs the "
        "task's .ckpt checkpoint\n"
    )


def test_onnx_network_checks_the_image_size(classifier_files: tuple[Path, Path]) -> None:
    network = OnnxNetwork(classifier_files[1])
    assert network(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"takes 32x32 images, got 48x48"):
        network(torch.zeros(1, 3, 48, 48))


# ------------------------------------------------------------------ the other task kinds
def _tiny_tasks() -> dict[str, BaseTask]:
    tiny = dict(width_mult=0.25, input_size=SIZE)
    return {
        "attributes": AttributeModel(num_attributes=4, attribute_names=["w", "x", "y", "z"], **tiny),
        "geolocation": GeoClassifier(num_cells=5, **tiny),
        "embedding": FaceEmbedder(embedding_size=8, **tiny),
    }


@pytest.mark.parametrize("name", ["attributes", "geolocation", "embedding"])
def test_predict_network_of_an_export_equals_the_task(name: str, tmp_path: Path) -> None:
    task = _tiny_tasks()[name].eval()
    if name == "embedding":
        task.threshold.fill_(0.42)
    if name == "geolocation":  # level-1 S2 cells; the served task below is a shell without a cell table
        task.cell_ids.copy_(torch.tensor([(2 * k + 1) << 58 for k in range(5)]))
        task.cell_centers.copy_(torch.tensor([[10.0 * k, -20.0 * k] for k in range(5)], dtype=torch.float64))
    onnx = tmp_path / f"{name}.onnx"
    export_onnx(task, onnx)
    served = _tiny_tasks()[name].eval()
    served.use_exported(onnx)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = task(x)
        assert torch.equal(expected, task.export_module()(x))  # what is exported is what predict runs
        got = served.predict_network(x)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    if name == "geolocation":
        assert served.cell_tokens() == task.cell_tokens()
        assert torch.allclose(served.cell_centers, task.cell_centers)
    if name == "embedding":
        assert float(served.threshold) == pytest.approx(0.42)


def test_adopted_and_refused_task_keys(tmp_path: Path) -> None:
    tiny = dict(width_mult=0.25, input_size=SIZE)
    attributes = tmp_path / "attributes.onnx"
    export_onnx(AttributeModel(num_attributes=4, attribute_names=["w", "x", "y", "z"], **tiny), attributes)
    served = AttributeModel(num_attributes=4, **tiny)
    served.use_exported(attributes)
    assert served.attribute_names == ["w", "x", "y", "z"]
    with pytest.raises(ExportMismatchError, match=r"metadata key 'attributes': this config expects 40"):
        AttributeModel(**tiny).use_exported(attributes)
    embedding = tmp_path / "embedding.onnx"
    export_onnx(FaceEmbedder(embedding_size=8, **tiny), embedding)
    with pytest.raises(ExportMismatchError, match=r"metadata key 'embedding_size': this config expects 16"):
        FaceEmbedder(embedding_size=16, **tiny).use_exported(embedding)
    geolocation = tmp_path / "geolocation.onnx"
    export_onnx(GeoClassifier(num_cells=5, **tiny), geolocation)
    with pytest.raises(ExportMismatchError, match=r"metadata key 'cells': this config has 6 cells"):
        GeoClassifier(num_cells=6, **tiny).use_exported(geolocation)
    classifier = ImageClassifier(num_classes=7, **tiny)
    exported = tmp_path / "classifier.onnx"
    export_onnx(ImageClassifier(num_classes=2, class_names=["cat", "dog"], **tiny), exported)
    classifier.use_exported(exported)  # as --ckpt_path does: the model's classes replace the config's
    assert classifier.class_count == 2 and classifier.class_name(1) == "dog"
    assert json.loads(classifier.export_metadata()["class_names"]) == ["cat", "dog"]


def test_faster_rcnn_cannot_be_served_from_an_export(tmp_path: Path) -> None:
    from mobilenets.tasks.detection import FasterRCNNDetection

    task = FasterRCNNDetection(num_classes=3, width_mult=0.25, input_size=64)
    with pytest.raises(
        ExportMismatchError, match=r"x.onnx: Faster R-CNN cannot be served from an exported file"
    ):
        task.use_exported(tmp_path / "x.onnx")


def test_ssd_served_from_onnx_gives_the_detectors_detections(tmp_path: Path) -> None:
    from mobilenets.tasks.detection import SSDDetection

    def build() -> SSDDetection:
        torch.manual_seed(0)
        task = SSDDetection(num_classes=3, width_mult=0.25, input_size=128, score_thresh=0.3)
        with torch.no_grad():  # a random but decisive head: varied class scores above the threshold
            for module in task.model.head.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.normal_(0, 0.3)
                    module.bias.zero_()
        return task.eval()

    task = build()
    task.hparams.update(class_names=["circle", "square"], category_ids=[3, 7])
    onnx = tmp_path / "ssd.onnx"
    export_onnx(task, onnx)
    served = SSDDetection(num_classes=3, width_mult=0.25, input_size=128).eval()
    served.use_exported(onnx)
    assert served.hparams.score_thresh == 0.3 and served.hparams.category_ids == [3, 7]
    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 150, 200, generator=generator), torch.rand(3, 128, 96, generator=generator)]
    with torch.no_grad():
        expected = task.predict_detections(images)
        got = served.predict_detections(images)
    for e, g in zip(expected, got, strict=True):
        assert len(e["boxes"]) > 0 and torch.equal(e["labels"], g["labels"])
        assert (e["boxes"] - g["boxes"]).abs().max() < 1e-2  # pixels of the original image
        assert (e["scores"] - g["scores"]).abs().max() < 1e-4
    with pytest.raises(ExportMismatchError, match=r"metadata key 'num_anchors'"):
        SSDDetection(num_classes=3, width_mult=0.25, input_size=128, min_scale=0.1, head_kernel_size=1,
                     extra_depths=[512, 256, 256]).use_exported(onnx)  # fmt: skip


# ------------------------------------------------------------------ geolocation through the CLI
def test_geolocation_predict_with_onnx_writes_the_checkpoints_csv(
    tmp_path: Path, read_rows: Any, save_checkpoint: Any
) -> None:
    data = make_geotags(
        tmp_path / "data",
        num_regions=3,
        train_per_region=8,
        val_per_region=2,
        test_per_region=3,
        image_size=32,
    )
    partition = tmp_path / "partition.csv"
    argv = ["geo", "partition", str(data.train_csv), "--out", str(partition), "--max-photos", "8"]
    assert main([*argv, "--min-photos", "2"]) == 0
    torch.manual_seed(0)
    task = GeoClassifier(partition=str(partition), width_mult=0.25, input_size=SIZE, top_k=50).eval()
    ckpt = save_checkpoint(task, tmp_path / "geo.ckpt")
    onnx = tmp_path / "geo.onnx"
    export_onnx(task, onnx)
    config = yaml.safe_load((CONFIG_DIR / "planet_mobilenet.yaml").read_text())
    config["trainer"].update(logger=False, enable_progress_bar=False, callbacks=[])
    config["model"]["init_args"].update(
        partition=str(partition), width_mult=0.25, input_size=SIZE, top_k=50, weights=None
    )
    config["data"]["init_args"].update(
        partition=str(partition),
        predict_csv=str(data.test_csv),
        image_root=str(data.image_root),
        batch_size=4,
        num_workers=0,
    )
    results = {}
    for model in (ckpt, onnx):
        out_dir = tmp_path / model.suffix[1:]
        # the checkpoint leaves output locations out: the config's predictions_dir is where files go
        config["model"]["init_args"]["predictions_dir"] = str(out_dir)
        config["trainer"]["default_root_dir"] = str(tmp_path / "root")
        config_path = tmp_path / f"{model.suffix[1:]}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        assert main(["predict", "--config", str(config_path), "--ckpt_path", str(model)]) == 0
        results[model.suffix] = read_rows(out_dir / "predictions.csv")
        assert (out_dir / "predictions_map.png").stat().st_size > 1000
    expected, got = results[".ckpt"], results[".onnx"]
    assert len(got) == len(expected) == 9 and list(got[0]) == list(expected[0])
    for e, g in zip(expected, got):
        assert g["image"] == e["image"] and g["true_lat"] == e["true_lat"]

        def cells(row: dict[str, str]) -> dict[str, float]:
            extra = {row[k]: float(row[f"probability_{k[5:]}"]) for k in row if k.startswith("cell_")}
            return {row["cell"]: float(row["probability"]), **extra}

        assert_same_probabilities(cells(e), cells(g))
        assert len(cells(g)) == task.num_cells  # top_k covers every cell: all probabilities compared


def test_ssd_predict_with_onnx_writes_the_checkpoints_detections(
    tmp_path: Path, save_checkpoint: Any
) -> None:
    from mobilenets.datasets.synthetic.coco import make_coco_shapes
    from mobilenets.tasks.cli.lightning import lightning_cli
    from mobilenets.tasks.detection import SSDDetection

    root = make_coco_shapes(tmp_path / "shapes", {"train": 2, "val": 4}, size_range=(64, 80))
    torch.manual_seed(0)
    task = SSDDetection(
        num_classes=4,
        width_mult=0.25,
        input_size=64,
        score_thresh=0.3,
        class_names=["circle", "square", "star"],
    )
    task.hparams.category_ids = [3, 7, 12]
    with torch.no_grad():  # a random but decisive head: varied class scores above the threshold
        for module in task.model.head.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0, 0.3)
                module.bias.zero_()
    task.eval()
    ckpt = save_checkpoint(task, tmp_path / "ssd.ckpt")
    onnx = tmp_path / "ssd.onnx"
    export_onnx(task, onnx)
    # the config's model is an untouched default: the checkpoint or the export supplies the rest
    model = {
        "class_path": "mobilenets.tasks.detection.SSDDetection",
        "init_args": {"width_mult": 0.25, "input_size": 64, "num_classes": 4, "draw_score_thresh": 0.0},
    }
    data = {
        "class_path": "mobilenets.datasets.coco.CocoDataModule",
        "init_args": {
            "root": str(root),
            "train_split": "train",
            "val_split": "val",
            "batch_size": 3,
            "num_workers": 0,
            "predict_dir": str(root / "val"),
        },
    }
    results = {}
    for path in (ckpt, onnx):
        trainer = {"default_root_dir": str(tmp_path / path.suffix[1:]), "enable_progress_bar": False}
        lightning_cli({"predict": {"model": model, "data": data, "trainer": trainer, "ckpt_path": str(path)}})
        out = tmp_path / path.suffix[1:] / "predictions"
        assert len(list(out.glob("*_detections.png"))) == 4
        results[path.suffix] = json.loads((out / "detections.json").read_text())
    expected, got = results[".ckpt"], results[".onnx"]
    assert expected and len(got) == len(expected)
    assert {r["category_id"] for r in got} <= {3, 7, 12}
    for e, g in zip(expected, got):
        assert (g["file_name"], g["image_id"], g["category_id"]) == (
            e["file_name"],
            e["image_id"],
            e["category_id"],
        )
        assert abs(g["score"] - e["score"]) < 1e-4
        assert max(abs(a - b) for a, b in zip(g["bbox"], e["bbox"])) < 1e-2
