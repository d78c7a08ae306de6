"""``mobilenets predict`` for the attributes and face-embedding tasks: the files it writes, with a checkpoint
and with an exported ``.onnx``, hold the model's outputs in the columns of ``mobilenets onnx-predict``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mobilenets.datasets.faces import FaceDataError, FaceDataModule
from mobilenets.datasets.images import list_images
from mobilenets.datasets.synthetic.faces import make_identity_folders
from mobilenets.tasks.attributes import AttributeModel
from mobilenets.tasks.cli import main
from mobilenets.tasks.deploy.export import export_onnx, preprocess_images
from mobilenets.tasks.faces.embedding import FaceEmbedder
from mobilenets.tasks.prediction_files import PRESENT_COLUMN, predict_output_path

# tiny models run fastest on one thread (two contend badly on a shared 2-core runner)
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
NAMES = ["w", "x", "y", "z"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven face images in identity folders (predict_dir is searched recursively)."""
    root = tmp_path_factory.mktemp("faces")
    make_identity_folders(root, num_identities=3, images_per_identity=(2, 3), size=40, seed=4)
    assert len(list_images(root)) == 7
    return root


def _floats(row: dict[str, str], columns: list[str]) -> np.ndarray:
    return np.array([float(row[c]) for c in columns])


# ------------------------------------------------------------------ attributes
@pytest.fixture(scope="module")
def attribute_files(
    tmp_path_factory: pytest.TempPathFactory, save_checkpoint: Any
) -> tuple[AttributeModel, Path, Path]:
    torch.manual_seed(0)
    task = AttributeModel(num_attributes=4, attribute_names=NAMES, width_mult=0.25, input_size=SIZE)
    with torch.no_grad():  # w always present, x never: the present column has both kinds of attribute
        task.backbone.classifier.bias.copy_(torch.tensor([6.0, -6.0, 0.0, 0.0]))
    task.eval()
    root = tmp_path_factory.mktemp("attributes")
    ckpt = save_checkpoint(task, root / "attributes.ckpt")
    onnx = root / "attributes.onnx"
    export_onnx(task, onnx)
    return task, ckpt, onnx


@pytest.fixture
def predict_attributes(run_predict: Any) -> Any:
    """The shipped student config at α 0.25 / 32 px on a folder, with no CelebA files under data.root."""

    def predict_attributes(faces: Path, model: Path, run: Path, out: Path | None) -> None:
        options: dict[str, object] = {
            "model.init_args.num_attributes": 4,
            "model.init_args.input_size": SIZE,
            "data.init_args.root": run / "no_celeba_here",
            "data.init_args.predict_dir": faces,
            "data.init_args.batch_size": 3,
        }
        if out is not None:
            options["model.init_args.predictions_file"] = out
        run_predict("attributes_distill_0.25_128.yaml", model, run, options)

    return predict_attributes


def test_attribute_predict_writes_probabilities_and_present_attributes(
    attribute_files: tuple[AttributeModel, Path, Path],
    faces: Path,
    tmp_path: Path,
    read_rows: Any,
    predict_attributes: Any,
) -> None:
    task, ckpt, _ = attribute_files
    out = tmp_path / "out" / "attributes.csv"
    predict_attributes(faces, ckpt, tmp_path / "run", out)
    rows = read_rows(out)
    paths = list_images(faces)
    assert list(rows[0]) == ["path", *NAMES, PRESENT_COLUMN]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    images = torch.from_numpy(preprocess_images(paths, task.export_metadata()))
    with torch.no_grad():
        expected = task(images).sigmoid().double().numpy()
    got = np.stack([_floats(r, NAMES) for r in rows])
    assert ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    for row, probabilities in zip(rows, expected):
        present = row[PRESENT_COLUMN].split(";") if row[PRESENT_COLUMN] else []
        assert present == [n for n, p in zip(NAMES, probabilities) if p >= 0.5]
        assert "w" in present and "x" not in present


def test_attribute_predict_with_onnx_writes_the_same_csv_as_the_checkpoint(
    attribute_files: tuple[AttributeModel, Path, Path],
    faces: Path,
    tmp_path: Path,
    read_rows: Any,
    predict_attributes: Any,
) -> None:
    _, ckpt, onnx = attribute_files
    predict_attributes(faces, ckpt, tmp_path / "ckpt", tmp_path / "ckpt.csv")
    predict_attributes(faces, onnx, tmp_path / "onnx", None)  # default: predictions.csv in the log dir
    expected, got = read_rows(tmp_path / "ckpt.csv"), read_rows(tmp_path / "onnx" / "predictions.csv")
    assert list(got[0]) == list(expected[0]) and [r["path"] for r in got] == [r["path"] for r in expected]
    for e, g in zip(expected, got):
        assert np.abs(_floats(g, NAMES) - _floats(e, NAMES)).max() < 1e-4
    # onnx-predict's multi-label CSV has the same columns, from the same row formatting
    assert (
        main(["onnx-predict", "--model", str(onnx), "--images", str(faces), "--out", str(tmp_path / "o.csv")])
        == 0
    )
    standalone = read_rows(tmp_path / "o.csv")
    assert list(standalone[0]) == list(expected[0])
    for e, s in zip(expected, standalone, strict=True):
        assert s["path"] == e["path"] and np.abs(_floats(s, NAMES) - _floats(e, NAMES)).max() < 1e-4
        assert s["present_attributes"] == e["present_attributes"]


# ------------------------------------------------------------------ face embeddings
@pytest.fixture(scope="module")
def embedder_files(
    tmp_path_factory: pytest.TempPathFactory, save_checkpoint: Any
) -> tuple[FaceEmbedder, Path, Path]:
    torch.manual_seed(0)
    task = FaceEmbedder(embedding_size=8, width_mult=0.25, input_size=SIZE)
    norm = task.embedding[1]
    with torch.no_grad():  # statistics as after training (and unlike a fresh model of the same seed)
        norm.running_mean.copy_(torch.randn(8) * 0.1)
        norm.running_var.copy_(torch.rand(8) * 0.05 + 0.01)
    task.eval()
    root = tmp_path_factory.mktemp("embedder")
    ckpt = save_checkpoint(task, root / "faces.ckpt")
    onnx = root / "faces.onnx"
    export_onnx(task, onnx)
    return task, ckpt, onnx


@pytest.fixture
def predict_embeddings(run_predict: Any) -> Any:
    """The shipped triplet config at α 0.25 / 32 px: its training folder and pairs do not exist here."""

    def predict_embeddings(faces: Path, model: Path, run: Path, out: Path | None) -> None:
        options: dict[str, object] = {
            "model.init_args.width_mult": 0.25,
            "model.init_args.input_size": SIZE,
            "model.init_args.embedding_size": 8,
            "data.init_args.predict_dir": faces,
            "data.init_args.batch_size": 3,
        }
        if out is not None:
            options["model.init_args.embeddings_file"] = out
        run_predict("faces_triplet.yaml", model, run, options)

    return predict_embeddings


def test_embedding_predict_writes_unit_embeddings_as_csv_and_npy(
    embedder_files: tuple[FaceEmbedder, Path, Path],
    faces: Path,
    tmp_path: Path,
    read_rows: Any,
    predict_embeddings: Any,
) -> None:
    task, ckpt, _ = embedder_files
    predict_embeddings(faces, ckpt, tmp_path / "run", tmp_path / "out" / "faces.csv")
    rows = read_rows(tmp_path / "out" / "faces.csv")
    stored = np.load(tmp_path / "out" / "faces.npy")
    paths = list_images(faces)
    columns = [f"e{i}" for i in range(8)]
    assert list(rows[0]) == ["path", *columns]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert stored.dtype == np.float32 and stored.shape == (len(paths), 8)
    got = np.stack([_floats(r, columns) for r in rows])
    np.testing.assert_allclose(got, stored, rtol=1e-6, atol=1e-7)  # the CSV's rows are the .npy's
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    images = torch.from_numpy(preprocess_images(paths, task.export_metadata()))
    with torch.no_grad():
        expected = task(images).numpy()
    np.testing.assert_allclose(stored, expected, atol=1e-5, rtol=0)


def test_embedding_predict_with_onnx_writes_the_same_files_as_the_checkpoint(
    embedder_files: tuple[FaceEmbedder, Path, Path],
    faces: Path,
    tmp_path: Path,
    read_rows: Any,
    predict_embeddings: Any,
) -> None:
    _, ckpt, onnx = embedder_files
    predict_embeddings(faces, ckpt, tmp_path / "ckpt", tmp_path / "ckpt.csv")
    predict_embeddings(faces, onnx, tmp_path / "onnx", None)  # default: embeddings.csv/.npy in the log dir
    expected, got = read_rows(tmp_path / "ckpt.csv"), read_rows(tmp_path / "onnx" / "embeddings.csv")
    columns = [f"e{i}" for i in range(8)]
    assert list(got[0]) == list(expected[0]) and [r["path"] for r in got] == [r["path"] for r in expected]
    for e, g in zip(expected, got):
        assert np.abs(_floats(g, columns) - _floats(e, columns)).max() < 1e-4
    stored = np.load(tmp_path / "onnx" / "embeddings.npy")
    np.testing.assert_allclose(stored, np.load(tmp_path / "ckpt.npy"), atol=1e-4, rtol=0)
    assert (
        main(["onnx-predict", "--model", str(onnx), "--images", str(faces), "--out", str(tmp_path / "o.csv")])
        == 0
    )
    assert list(read_rows(tmp_path / "o.csv")[0]) == ["path", *columns]


def test_embeddings_file_must_be_a_csv() -> None:
    with pytest.raises(ValueError, match=r"embeddings_file must name a \.csv file.*'faces\.npy'"):
        FaceEmbedder(embedding_size=8, width_mult=0.25, input_size=SIZE, embeddings_file="faces.npy")


def test_face_predict_folder_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FaceDataError, match=r"predict needs predict_dir"):
        FaceDataModule(input_size=SIZE, num_workers=0).setup("predict")
    with pytest.raises(FaceDataError, match=r"missing: predict_dir is not a folder"):
        FaceDataModule(input_size=SIZE, predict_dir=str(tmp_path / "missing")).setup("predict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FaceDataError, match=r"empty: predict_dir holds no images"):
        FaceDataModule(input_size=SIZE, predict_dir=str(tmp_path / "empty")).setup("predict")


# ------------------------------------------------------------------ where the files go
@pytest.mark.parametrize(
    ("file", "world_size", "rank", "expected"),
    [
        (None, 1, 0, "logs/predictions.csv"),
        (None, 2, 1, "logs/predictions.rank1.csv"),
        ("out/mine.csv", 1, 0, "out/mine.csv"),
        ("out/mine.csv", 4, 3, "out/mine.rank3.csv"),
    ],
)
def test_predict_files_are_per_rank_under_several_processes(
    file: str | None, world_size: int, rank: int, expected: str
) -> None:
    trainer = SimpleNamespace(
        log_dir="logs", default_root_dir="root", world_size=world_size, global_rank=rank
    )
    assert predict_output_path(trainer, file, "predictions.csv") == Path(expected)
