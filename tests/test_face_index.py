"""Face-search indexes: round trips per index type, stable ids, atomic writes, clear errors, and the
``mobilenets faces`` CLI against the Python API."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from mobilenets.datasets.synthetic_faces import make_identity_folders, make_pairs_file
from mobilenets.tasks.base import TASK_CLASS_KEY
from mobilenets.tasks.embedding import FaceEmbedder
from mobilenets.tasks.face_index import (
    FaceIndex,
    FaceIndexError,
    default_index_kind,
    default_index_params,
)
from mobilenets.tasks.faces_cli import main as faces_main

DIM = 16
MODEL = {"path": "model.ckpt", "sha256": "0" * 64, "embedding_size": DIM}
KIND_PARAMS = {
    "flat": {},
    "ivf": {"nlist": 4, "nprobe": 4},
    "hnsw": {},
    "ivfpq": {"nlist": 2, "nprobe": 2, "m": 4, "nbits": 4},
}


def clustered(
    num_identities: int, per_identity: int, seed: int = 0
) -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_identities, DIM))
    vectors = np.repeat(centres, per_identity, axis=0) + 0.2 * rng.normal(
        size=(num_identities * per_identity, DIM)
    )
    identities = [f"id{i // per_identity}" for i in range(len(vectors))]
    paths = [f"/gallery/{name}/{i}.jpg" for i, name in enumerate(identities)]
    return vectors.astype(np.float32), paths, identities


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_round_trip_per_index_type(kind: str, tmp_path: Path) -> None:
    vectors, paths, identities = clustered(20, 5)
    FaceIndex.create(
        tmp_path, vectors, paths, identities, MODEL, kind=kind, params=KIND_PARAMS[kind], threshold=0.5
    )
    index = FaceIndex.open(tmp_path)
    assert index.kind == kind and len(index) == 100 and index.metadata["metric"] == "inner_product"
    assert faiss.downcast_index(index.index).metric_type == faiss.METRIC_INNER_PRODUCT
    results = index.search_batch(vectors, k=5)
    for row, hits in enumerate(results):
        if kind == "ivfpq":  # compressed codes: the face itself among the top 5
            assert row in [h.id for h in hits]
        else:
            assert hits[0].id == row and hits[0].cosine == pytest.approx(1.0, abs=1e-4)
        assert hits[0].identity == identities[row]  # the right person, even through PQ codes
        assert all(h.path == paths[h.id] and h.identity == identities[h.id] for h in hits)
        assert all(a.cosine >= b.cosine for a, b in itertools.pairwise(hits))

    extra, _, _ = clustered(2, 5, seed=1)
    new_paths = [f"/extra/{i}.jpg" for i in range(10)]
    assert index.add(extra, new_paths, ["new"] * 10) == list(range(100, 110))
    index.save()
    index = FaceIndex.open(tmp_path)
    assert len(index) == 110 and index.entries["105"] == {"path": "/extra/5.jpg", "identity": "new"}
    with pytest.raises(FaceIndexError, match=r"/extra/0\.jpg: already in the index .*id 100"):
        index.add(extra[:1], ["/extra/0.jpg"], ["new"])

    if kind == "hnsw":
        with pytest.raises(FaceIndexError, match="HNSW index cannot remove"):
            index.remove(ids=[0])
        with pytest.raises(FaceIndexError, match="HNSW index cannot replace"):
            index.add(extra[:1], ["/extra/0.jpg"], ["new"], replace=True)
        return
    assert index.add(vectors[:1], ["/extra/0.jpg"], ["renamed"], replace=True) == [100]  # id kept
    assert index.remove(ids=[0, 1]) == 2
    assert index.remove(identity="id3") == 5
    index.save()
    index = FaceIndex.open(tmp_path)
    assert len(index) == 103 and "0" not in index.entries and index.entries["100"]["identity"] == "renamed"
    top = index.search(vectors[0], k=1)[0]
    assert top.id == 100 or kind == "ivfpq"  # the replaced vector is the old face 0's
    assert index.add(extra[:1], ["/extra/new.jpg"], ["new"]) == [110]  # removed ids are never reused
    with pytest.raises(FaceIndexError, match="no faces with ids"):
        index.remove(ids=[0])


def test_default_index_type_and_parameters_follow_the_gallery_size() -> None:
    assert default_index_kind(10) == "flat" and default_index_kind(100_000) == "flat"
    assert default_index_kind(1_000_000) == "ivf" and default_index_kind(20_000_000) == "ivfpq"
    params = default_index_params("ivf", 1_000_000, 128)
    assert params == {"nlist": 4096, "nprobe": 32}
    assert default_index_params("ivfpq", 20_000_000, 128)["m"] == 16


def test_unknown_below_the_threshold(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(5, 2)
    index = FaceIndex.create(tmp_path, vectors, paths, identities, MODEL, threshold=0.9)
    hits = index.search(vectors[3], k=3)
    assert index.identify(hits) == identities[3]
    stranger = np.random.default_rng(7).normal(size=DIM)
    stranger_hits = index.search(stranger, k=3)
    assert max(h.cosine for h in stranger_hits) < 0.9 and index.identify(stranger_hits) == "unknown"


def test_a_failed_write_leaves_the_previous_index_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, paths, identities = clustered(6, 3)
    FaceIndex.create(tmp_path, vectors[:10], paths[:10], identities[:10], MODEL)
    files_before = sorted(p.name for p in tmp_path.iterdir())

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    index = FaceIndex.open(tmp_path)
    index.add(vectors[10:], paths[10:], identities[10:])
    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(FaceIndexError, match="previous index on disk is unchanged"):
        index.save()
    monkeypatch.undo()

    real_dump = json.dump

    def dump_half_then_crash(obj: object, stream: Any, **kwargs: Any) -> None:
        text = json.dumps(obj, **kwargs)
        stream.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_half_then_crash)
    with pytest.raises(FaceIndexError, match="could not write the index"):
        index.save()
    monkeypatch.setattr(json, "dump", real_dump)

    reopened = FaceIndex.open(tmp_path)
    assert len(reopened) == 10 and set(reopened.entries) == {str(i) for i in range(10)}
    assert reopened.search(vectors[4], k=1)[0].id == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before  # no temp files left behind
    index.save()  # and a later successful save replaces it
    assert len(FaceIndex.open(tmp_path)) == 18
    assert len(list(tmp_path.glob("*.faiss"))) == 1


def test_truncated_index_file_is_an_error_naming_it(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(4, 3)
    FaceIndex.create(tmp_path, vectors, paths, identities, MODEL)
    index_file = next(tmp_path.glob("*.faiss"))
    index_file.write_bytes(index_file.read_bytes()[:100])
    with pytest.raises(FaceIndexError, match=rf"{index_file.name}: cannot read the faiss index \(truncated"):
        FaceIndex.open(tmp_path)


def test_queries_of_another_dimension_are_refused(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(4, 3)
    index = FaceIndex.create(tmp_path, vectors, paths, identities, MODEL)
    with pytest.raises(FaceIndexError, match=r"index expects \(N, 16\) embeddings"):
        index.search(np.ones(8, dtype=np.float32))


def test_empty_gallery_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FaceIndexError, match="empty gallery"):
        FaceIndex.create(tmp_path / "idx", np.zeros((0, DIM)), [], [], MODEL)


# --------------------------------------------------------------------------- the CLI with a model
def save_checkpoint(path: Path, seed: int, threshold: float = 0.25) -> Path:
    torch.manual_seed(seed)
    model = FaceEmbedder(width_mult=0.25, input_size=32, embedding_size=DIM).eval()
    model.threshold.fill_(threshold)
    state = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        TASK_CLASS_KEY: "mobilenets.tasks.embedding.FaceEmbedder",
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    make_identity_folders(root / "faces", num_identities=4, images_per_identity=3, size=36, seed=5)
    make_identity_folders(
        root / "later", num_identities=1, images_per_identity=2, size=36, seed=6, prefix="Late"
    )
    save_checkpoint(root / "model.ckpt", seed=0)
    save_checkpoint(root / "other.ckpt", seed=1)
    return root


def test_cli_build_search_add_remove_match_the_python_api(
    gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "index"
    assert (
        faces_main(
            [
                "index",
                "build",
                "--gallery",
                str(gallery / "faces"),
                "--ckpt_path",
                str(gallery / "model.ckpt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "index type: flat (default for a gallery of 12 faces)" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["threshold"] == pytest.approx(0.25) and meta["embedding_size"] == DIM
    assert meta["model"]["sha256"] and meta["index_type"] == "flat" and meta["created"]

    probe = gallery / "faces" / "Person_0002" / "Person_0002_0003.jpg"
    assert faces_main(["search", "--index", str(out), "--image", str(probe), "-k", "3", "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    from_api = FaceIndex.open(out).search(probe, k=3)
    assert [h["id"] for h in from_cli["hits"]] == [h.id for h in from_api]
    assert [h["cosine"] for h in from_cli["hits"]] == pytest.approx([h.cosine for h in from_api], abs=1e-6)
    assert from_api[0].path == str(probe.resolve()) and from_cli["answer"] == "Person_0002"

    assert faces_main(["search", "--index", str(out), "--image", str(probe), "--threshold", "1.5"]) == 0
    text = capsys.readouterr().out
    assert "answer: unknown" in text and "Person_0002" in text and str(probe.resolve()) in text

    assert faces_main(["index", "add", "--index", str(out), "--gallery", str(gallery / "faces")]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert faces_main(["index", "add", "--index", str(out), "--gallery", str(gallery / "later")]) == 0
    assert "added 2 faces (ids 12..13)" in capsys.readouterr().out
    assert (
        faces_main(["index", "add", "--index", str(out), "--gallery", str(gallery / "later"), "--replace"])
        == 0
    )
    assert len(FaceIndex.open(out)) == 14
    assert faces_main(["index", "remove", "--index", str(out), "--identity", "Late_0000"]) == 0
    assert "removed 2 faces" in capsys.readouterr().out
    assert len(FaceIndex.open(out)) == 12


def test_cli_errors_name_the_file(gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "index"
    assert (
        faces_main(
            [
                "index",
                "build",
                "--gallery",
                str(gallery / "faces"),
                "--ckpt_path",
                str(gallery / "model.ckpt"),
                "--out",
                str(out),
                "--index",
                "hnsw",
            ]
        )
        == 0
    )
    capsys.readouterr()
    probe = gallery / "faces" / "Person_0001" / "Person_0001_0001.jpg"

    other = gallery / "other.ckpt"
    assert faces_main(["search", "--index", str(out), "--image", str(probe), "--ckpt_path", str(other)]) == 2
    assert f"{other}: this index ({out}) was built by another model" in capsys.readouterr().err

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(probe.read_bytes()[:200])
    assert faces_main(["search", "--index", str(out), "--image", str(broken)]) == 2
    assert f"{broken}: unreadable image" in capsys.readouterr().err

    assert faces_main(["index", "remove", "--index", str(out), "--identity", "Person_0001"]) == 2
    assert "HNSW index cannot remove" in capsys.readouterr().err

    make_pairs_file(tmp_path / "pairs.txt", gallery / "faces", folds=2, pairs_per_fold=2, seed=0)
    calibrated = tmp_path / "calibrated"
    build = [
        "index",
        "build",
        "--gallery",
        str(gallery / "faces"),
        "--ckpt_path",
        str(gallery / "model.ckpt"),
    ]
    assert (
        faces_main(
            [
                *build,
                "--out",
                str(calibrated),
                "--pairs",
                str(tmp_path / "pairs.txt"),
                "--pairs-dir",
                str(gallery / "faces"),
            ]
        )
        == 0
    )
    meta = json.loads((calibrated / "meta.json").read_text())
    assert meta["threshold_source"].startswith("best accuracy on") and -1.0 <= meta["threshold"] <= 1.0
    assert meta["threshold"] != pytest.approx(0.25)  # not the checkpoint's
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        faces_main(
            [
                "index",
                "build",
                "--gallery",
                str(empty),
                "--ckpt_path",
                str(gallery / "model.ckpt"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert f"{empty}: no images found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
