import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mobilenets.datasets.synthetic.calibration import make_calibration_patterns
from mobilenets.tasks.base import TASK_CLASS_KEY, BaseTask
from mobilenets.tasks.cli import main as cli_main
from mobilenets.tasks.deploy import export as export_module_under_test
from mobilenets.tasks.deploy.export import (
    AgreementError,
    ExportError,
    export_int8,
    export_onnx,
    export_torchscript,
    onnx_metadata,
    preprocess_images,
    torchscript_metadata,
)
from mobilenets.tasks.deploy.speed import delta_orthogonal_, realistic_
from mobilenets.tasks.detection.ssd import ssd_postprocess, ssd_preprocess

SIZE = 64
CLASSES = ["circle", "square", "star", "wave", "dot"]


class TinyClassifier(BaseTask):
    """A classifier head on the backbone: the smallest task that follows the export contract."""

    def __init__(self, num_classes: int = 5, **kwargs) -> None:
        self.num_classes = num_classes
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def export_metadata(self) -> dict[str, str]:
        return {**super().export_metadata(), "class_names": json.dumps(CLASSES[: self.num_classes])}


class TinyEmbedder(TinyClassifier):
    """Two outputs and a non-default output kind: the exporter must follow the metadata, not the class."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return nn.functional.normalize(features, dim=1), self.backbone.forward_head(
            self.backbone.forward_features(x)
        )

    def export_metadata(self) -> dict[str, str]:
        return {**super().export_metadata(), "output_kind": "embedding", "output_names": "embedding,logits"}


def save_checkpoint(task: BaseTask, path: Path) -> Path:
    """The checkpoint dict Lightning writes (state_dict, hyper_parameters, the task-class key)."""
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 0}
    task.on_save_checkpoint(checkpoint)
    assert TASK_CLASS_KEY in checkpoint
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def pattern_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patterns")
    make_calibration_patterns(root, per_class=8, num_classes=5, size=80, seed=3)
    return root


def trained_like(task: TinyClassifier, pattern_dir: Path) -> TinyClassifier:
    """A signal-preserving random backbone with batch-norm statistics of the images and a linear head
    trained on its frozen features: outputs with realistic scales and class margins (a random head gives
    near-ties that any noise flips, and Kaiming-random features forget the input by block 6)."""
    paths = sorted(pattern_dir.glob("*/*.jpg"))
    batch = torch.from_numpy(preprocess_images(paths, task.export_metadata()))
    labels = torch.tensor([int(p.parent.name.split("_")[1]) for p in paths])
    backbone = task.backbone
    delta_orthogonal_(backbone)
    realistic_(backbone, batch, labels, lambda x: backbone.forward_head(backbone.forward_features(x), True))
    return task.eval()


@pytest.fixture(scope="module")
def classifier(pattern_dir: Path) -> TinyClassifier:
    torch.manual_seed(0)
    return trained_like(TinyClassifier(width_mult=0.25, input_size=SIZE), pattern_dir)


def test_onnx_round_trip_matches_pytorch_with_metadata_and_dynamic_batch(
    classifier: TinyClassifier, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    result = export_onnx(classifier, out)
    assert out.is_file() and result.max_rel_diff <= 1e-4
    metadata = onnx_metadata(out)
    assert metadata["task"] == "TinyClassifier" and metadata["input_size"] == str(SIZE)
    assert metadata["mean"] == "0.5,0.5,0.5" and json.loads(metadata["class_names"]) == CLASSES
    assert metadata["batchnorm_folded"] == "true"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert not any(node.op_type == "BatchNormalization" for node in _onnx_nodes(out))
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = classifier(x).numpy()
        assert got.shape == (batch, 5)
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert list(tmp_path.iterdir()) == [out]  # no temporary files left


def _onnx_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_torchscript_round_trip_matches_pytorch(classifier: TinyClassifier, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    export_torchscript(classifier, out)
    loaded = torch.jit.load(str(out))
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = classifier(x)
            assert (loaded(x) - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())
    assert torchscript_metadata(out)["input_size"] == str(SIZE)


def test_multi_output_task_exports_named_outputs(pattern_dir: Path, tmp_path: Path) -> None:
    task = TinyEmbedder(num_classes=3, width_mult=0.25, input_size=SIZE).eval()
    out = tmp_path / "embed.onnx"
    export_onnx(task, out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding", "logits"]
    assert onnx_metadata(out)["output_kind"] == "embedding"


def test_export_refuses_and_leaves_no_file_when_verification_fails(
    classifier: TinyClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = export_module_under_test.run_onnx

    def corrupted(session, x):
        return [o * 1.05 + 0.1 for o in original(session, x)]

    monkeypatch.setattr(export_module_under_test, "run_onnx", corrupted)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="above the tolerance"):
        export_onnx(classifier, out)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_fails_loudly_with_nonzero_exit(
    classifier: TinyClassifier, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = save_checkpoint(classifier, tmp_path / "tiny.ckpt")
    out = tmp_path / "exported" / "model.pt"
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out and out.is_file()
    bad = tmp_path / "bad.onnx"
    code = cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(bad), "--tolerance", "-1"])
    assert code != 0 and not bad.exists()
    assert "above the tolerance" in capsys.readouterr().err
    missing = cli_main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(bad)])
    assert missing != 0 and "none.ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_writes_above_the_floor_and_refuses_below(
    classifier: TinyClassifier, pattern_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = sorted(pattern_dir.glob("*/*.jpg"))
    calibration, heldout = paths[::2], paths[1::2]
    for folder, chosen in (("calibration", calibration), ("heldout", heldout)):
        for path in chosen:
            (tmp_path / folder / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / folder / path.parent.name / path.name)
    ckpt = save_checkpoint(classifier, tmp_path / "tiny.ckpt")
    out = tmp_path / "out" / "int8.onnx"
    argv = ["export", "--ckpt_path", str(ckpt), "--out", str(out), "--int8"]
    argv += ["--calibration", str(tmp_path / "calibration"), "--heldout", str(tmp_path / "heldout")]
    assert cli_main([*argv, "--min-agreement", "0.7"]) == 0
    assert "top-1 agreement" in capsys.readouterr().out and out.is_file()
    assert onnx_metadata(out)["quantization"].startswith("int8")
    ops = {node.op_type for node in _onnx_nodes(out)}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the quantized model still classifies like the float one on most held-out images
    int8_top1 = ort.InferenceSession(str(out)).run(
        None, {"input": preprocess_images(heldout, onnx_metadata(out))}
    )
    with torch.no_grad():
        float_top1 = classifier(torch.from_numpy(preprocess_images(heldout, onnx_metadata(out)))).argmax(1)
    assert (int8_top1[0].argmax(1) == float_top1.numpy()).mean() >= 0.7
    refused = tmp_path / "refused.onnx"
    with pytest.raises(AgreementError, match="below the floor"):
        export_int8(classifier, refused, calibration, heldout, min_agreement=1.01)
    assert not refused.exists() and not list((tmp_path / "out").glob(".*"))


def test_onnx_predict_gives_pytorch_top1_and_the_classifier_csv(
    classifier: TinyClassifier, pattern_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    export_onnx(classifier, model)
    out = tmp_path / "preds.csv"
    assert (
        cli_main(["onnx-predict", "--model", str(model), "--images", str(pattern_dir), "--out", str(out)])
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    paths = sorted(pattern_dir.glob("*/*.jpg"))
    assert [Path(r["path"]) for r in rows] == paths
    with torch.no_grad():
        probabilities = classifier(torch.from_numpy(preprocess_images(paths, classifier.export_metadata())))
        probabilities = probabilities.softmax(1)
    assert [int(r["class1_index"]) for r in rows] == probabilities.argmax(1).tolist()
    assert [r["class1_name"] for r in rows] == [CLASSES[i] for i in probabilities.argmax(1).tolist()]
    top = np.array([float(r["class1_probability"]) for r in rows])
    assert np.abs(top - probabilities.max(1).values.numpy()).max() < 1e-4
    assert "class5_probability" in rows[0]


# ------------------------------------------------------------------ every task type of the suite
def _task_factories() -> dict[str, tuple[str, str, dict]]:
    """task name → (module, class, constructor args at α = 0.25 and a small input)."""
    tiny = dict(width_mult=0.25, input_size=SIZE)
    return {
        "classification": (
            "mobilenets.tasks.classification",
            "ImageClassifier",
            dict(num_classes=3, class_names=["a", "b", "c"], **tiny),
        ),
        "attributes": (
            "mobilenets.tasks.attributes",
            "AttributeModel",
            dict(num_attributes=4, attribute_names=["w", "x", "y", "z"], **tiny),
        ),
        "geolocation": ("mobilenets.tasks.geolocation", "GeoClassifier", dict(num_cells=6, **tiny)),
        "embedding": ("mobilenets.tasks.faces.embedding", "FaceEmbedder", dict(embedding_size=16, **tiny)),
        "detection": (
            "mobilenets.tasks.detection",
            "SSDDetection",
            dict(num_classes=3, width_mult=0.25, input_size=128),
        ),
    }


EXPECTED_KIND = {
    "classification": "logits",
    "attributes": "multilabel_logits",
    "geolocation": "logits",
    "embedding": "embedding",
    "detection": "detection",
}


def _build_task(name: str) -> BaseTask:
    import importlib

    module_name, class_name, kwargs = _task_factories()[name]
    task_cls = getattr(importlib.import_module(module_name), class_name)
    return task_cls(**kwargs).eval()


@pytest.mark.parametrize("name", list(EXPECTED_KIND))
def test_every_task_type_exports_from_its_checkpoint(name: str, tmp_path: Path) -> None:
    from mobilenets.tasks.deploy.export import output_kind

    task = _build_task(name)
    ckpt = save_checkpoint(task, tmp_path / f"{name}.ckpt")
    out = tmp_path / f"{name}.onnx"
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(out)]) == 0
    metadata = onnx_metadata(out)
    assert metadata["task"] == type(task).__name__ and output_kind(metadata) == EXPECTED_KIND[name]
    reloaded = BaseTask.load_task(ckpt)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = int(metadata["input_size"])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reloaded.export_module()(x)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = session.run(None, {"input": x.numpy()})
    for e, g in zip(expected, got, strict=True):
        assert np.abs(e.numpy() - g).max() <= 1e-4 * max(1.0, e.abs().max().item())


@pytest.mark.slow
def test_exported_ssd_plus_postprocessing_equals_pytorch_detections(tmp_path: Path) -> None:
    task = _build_task("detection")
    task.hparams.update(score_thresh=0.3, detections_per_img=20)
    task.model.score_thresh, task.model.detections_per_img = 0.3, 20
    with torch.no_grad():  # a random but decisive head: varied class scores, well above the threshold
        for module in task.model.head.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0, 0.3)
                module.bias.zero_()
    out = tmp_path / "ssd.onnx"
    export_onnx(task, out)
    metadata = onnx_metadata(out)
    size = int(metadata["input_size"])
    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(2)]
    with torch.no_grad():
        expected = task.model(images)
    batch = ssd_preprocess(images, size, parse(metadata["mean"]), parse(metadata["std"]))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    raw_boxes, raw_scores = (torch.from_numpy(a) for a in session.run(None, {"input": batch.numpy()}))
    got = ssd_postprocess(
        raw_boxes,
        raw_scores,
        task.anchors(),
        (size, size),
        score_thresh=float(metadata["score_thresh"]),
        nms_thresh=float(metadata["nms_thresh"]),
        topk_candidates=int(metadata["topk_candidates"]),
        detections_per_img=int(metadata["detections_per_img"]),
    )
    for e, g in zip(expected, got, strict=True):
        assert len(e["boxes"]) > 0 and torch.equal(e["labels"], g["labels"])
        assert (e["boxes"] - g["boxes"]).abs().max() < 1e-3
        assert (e["scores"] - g["scores"]).abs().max() < 1e-4


def parse(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def test_speed_report_replaces_only_the_text_between_the_readme_markers(tmp_path: Path) -> None:
    from mobilenets.tasks.deploy.speed import BenchError, update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n")
    readme.chmod(0o644)
    update_readme(readme, "| new | table |")
    assert readme.stat().st_mode & 0o777 == 0o644
    assert (
        readme.read_text()
        == "# title\n\nintro\n<!-- bench:start -->\n| new | table |\n<!-- bench:end -->\nrest\n"
    )
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(BenchError, match="bench:start"):
        update_readme(unmarked, "x")
    assert unmarked.read_text() == "no markers\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "OTHER.md",
        "README.md",
    ]


# ------------------------------------------------------------------ the export metadata record
def test_a_class_name_with_a_comma_round_trips_through_an_ssd_export(tmp_path: Path) -> None:
    from mobilenets.tasks.detection import SSDDetection

    names = ["traffic light, red", "stop sign"]
    task = SSDDetection(num_classes=3, width_mult=0.25, input_size=SIZE, class_names=names).eval()
    task.hparams.category_ids = [10, 13]
    out = tmp_path / "ssd.onnx"
    export_onnx(task, out)
    assert json.loads(onnx_metadata(out)["class_names"]) == names  # names are a JSON list
    served = SSDDetection(num_classes=3, width_mult=0.25, input_size=SIZE).eval()
    served.use_exported(out)
    assert served.hparams.class_names == names and served.hparams.category_ids == [10, 13]


def test_the_record_reads_the_comma_lists_of_older_exports() -> None:
    from mobilenets.tasks.deploy.metadata import ExportMetadata
    from mobilenets.tasks.deploy.onnx_network import ExportMismatchError

    old = {
        "task": "AttributeModel",
        "input_size": "64",
        "mean": "0.5,0.5,0.5",
        "std": "0.5,0.5,0.5",
        "attribute_names": "Smiling, Eyeglasses",
        "category_ids": "3,7",
        "outputs": "logits",
    }
    record = ExportMetadata.from_properties(old, "old.onnx")
    assert record.attribute_names == ("Smiling", "Eyeglasses") and record.category_ids == (3, 7)
    assert record.mean == (0.5, 0.5, 0.5) and dict(record.properties) == {"outputs": "logits"}
    written = record.to_properties()
    assert json.loads(written["attributes"]) == ["Smiling", "Eyeglasses"] and written["mean"] == "0.5,0.5,0.5"
    assert ExportMetadata.from_properties(written) == record
    with pytest.raises(ExportMismatchError, match=r"old.onnx: metadata key 'category_ids': expected comma"):
        ExportMetadata.from_properties({**old, "category_ids": "3,x"}, "old.onnx")
    with pytest.raises(ExportMismatchError, match=r"old.onnx: metadata key 'input_size' is missing"):
        ExportMetadata.from_properties({k: v for k, v in old.items() if k != "input_size"}, "old.onnx")
