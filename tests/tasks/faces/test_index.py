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

from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.tasks.base import TASK_CLASS_KEY
from mobilenets.tasks.cli import main
from mobilenets.tasks.faces.embedding import FaceEmbedder
from mobilenets.tasks.faces.index import (
    FaceIndex,
    FaceIndexError,
    ImageEmbedder,
    RerankedIVFIndex,
    default_index_kind,
    default_index_params,
    train_index,
)
from mobilenets.tasks.faces.shards import ShardSet, shard_stem, write_shard

DIM = 16


def faces_main(argv: list[str]) -> int:
    """``mobilenets faces ...`` through the command's entry, where errors become one line and exit 2."""
    return main(["faces", *argv])


MODEL = {"path": "model.ckpt", "sha256": "0" * 64, "embedding_size": DIM}
KIND_PARAMS = {
    "flat": {},
    "ivf": {"nlist": 4, "nprobe": 4},
    "ivf-rerank": {"nlist": 4, "nprobe": 4},
    "hnsw": {},
    "ivfpq": {"nlist": 2, "nprobe": 2, "m": 4, "nbits": 4},
}


def clustered(
    num_identities: int, per_identity: int, seed: int = 0, dim: int = DIM
) -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_identities, dim))
    vectors = np.repeat(centres, per_identity, axis=0) + 0.2 * rng.normal(
        size=(num_identities * per_identity, dim)
    )
    identities = [f"id{i // per_identity}" for i in range(len(vectors))]
    paths = [f"/gallery/{name}/{i}.jpg" for i, name in enumerate(identities)]
    return vectors.astype(np.float32), paths, identities


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf-rerank", "hnsw", "ivfpq"])
def test_round_trip_per_index_type(kind: str, tmp_path: Path) -> None:
    vectors, paths, identities = clustered(20, 5)
    FaceIndex.create(
        tmp_path, vectors, paths, identities, MODEL, kind=kind, params=KIND_PARAMS[kind], threshold=0.5
    )
    index = FaceIndex.open(tmp_path)
    assert index.kind == kind and len(index) == 100 and index.metadata["metric"] == "inner_product"
    stored = index.index.codes if kind == "ivf-rerank" else index.index
    assert faiss.downcast_index(stored).metric_type == faiss.METRIC_INNER_PRODUCT
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
    assert default_index_kind(100_001) == "ivf-rerank" and default_index_kind(10_000_000) == "ivf-rerank"
    assert default_index_kind(1_000_000) == "ivf-rerank" and default_index_kind(20_000_000) == "ivfpq"
    assert default_index_params("ivf", 1_000_000, 128) == {"nlist": 4096, "nprobe": 32}
    params = default_index_params("ivf-rerank", 1_000_000, 128)
    assert params == {"nlist": 4096, "nprobe": 32, "m": 32, "k_factor": 16}
    assert default_index_params("ivf-rerank", 1_000_000, 100)["m"] == 25  # a divisor of d
    assert default_index_params("ivfpq", 20_000_000, 128)["m"] == 16


class _RecordingIndex:
    is_trained = False

    def __init__(self) -> None:
        self.trained_on: list[np.ndarray] = []

    def train(self, vectors: np.ndarray) -> None:
        self.trained_on.append(vectors)


def test_training_samples_256_vectors_per_list_deterministically() -> None:
    vectors = np.random.default_rng(0).normal(size=(3000, 4)).astype(np.float32)
    first, second = _RecordingIndex(), _RecordingIndex()
    for recorder in (first, second):
        train_index(recorder, vectors, "ivf", {"nlist": 8, "nprobe": 2})  # type: ignore[arg-type]
    assert first.trained_on[0].shape == (256 * 8, 4)
    np.testing.assert_array_equal(first.trained_on[0], second.trained_on[0])
    everything = _RecordingIndex()
    train_index(everything, vectors, "ivf-rerank", {"nlist": 16, "nprobe": 2})  # type: ignore[arg-type]
    np.testing.assert_array_equal(everything.trained_on[0], vectors)  # fewer than 256 per list: all
    with pytest.raises(FaceIndexError, match="ivf-rerank index with nlist=2 needs at least 16 vectors"):
        train_index(_RecordingIndex(), vectors[:10], "ivf-rerank", {"nlist": 2})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ivf-rerank
def _exact_top1(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    probes = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argmax(probes @ unit.T, axis=1)


def test_ivf_rerank_recall_and_exact_similarities(tmp_path: Path) -> None:
    dim = 32
    vectors, paths, identities = clustered(300, 10, dim=dim)  # 3000 faces, 10 per person
    model = {**MODEL, "embedding_size": dim}
    params = {"nlist": 32, "nprobe": 8}
    index = FaceIndex.create(tmp_path, vectors, paths, identities, model, kind="ivf-rerank", params=params)
    assert index.params == {"nlist": 32, "nprobe": 8, "m": 8, "k_factor": 16}
    rng = np.random.default_rng(3)
    centres = vectors.reshape(300, 10, dim).mean(axis=1)
    queries = (centres[rng.integers(0, 300, 400)] + 0.2 * rng.normal(size=(400, dim))).astype(np.float32)
    truth = _exact_top1(vectors, queries)

    results = index.search_batch(queries, k=5)
    recall = np.mean([hits[0].id == t for hits, t in zip(results, truth)])
    assert recall >= 0.9
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    probes = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for probe, hits in zip(probes, results):
        assert len(hits) == 5 and len({h.id for h in hits}) == 5
        np.testing.assert_allclose([h.cosine for h in hits], unit[[h.id for h in hits]] @ probe, atol=1e-5)
        assert all(a.cosine >= b.cosine for a, b in itertools.pairwise(hits))

    # the 4-bit codes alone rank near neighbours coarsely: re-ranking more candidates is what gives recall
    index.index.k_factor = 1
    coarse = np.mean([hits[0].id == t for hits, t in zip(index.search_batch(queries, k=1), truth)])
    assert coarse < recall - 0.1

    reopened = FaceIndex.open(tmp_path)  # k_factor and nprobe come from meta.json
    assert isinstance(reopened.index, RerankedIVFIndex) and reopened.index.k_factor == 16
    assert faiss.extract_index_ivf(reopened.index.codes).nprobe == 8
    again = reopened.search_batch(queries, k=5)
    assert [[h.id for h in hits] for hits in again] == [[h.id for h in hits] for hits in results]
    np.testing.assert_allclose(
        [[h.cosine for h in hits] for hits in again], [[h.cosine for h in hits] for hits in results]
    )


def test_ivf_rerank_add_failing_half_way_keeps_codes_and_vectors_in_step() -> None:
    dim = 16
    vectors, _, _ = clustered(40, 5, dim=dim)
    index = RerankedIVFIndex.empty(dim, {"nlist": 4, "nprobe": 4, "m": 4, "k_factor": 4})
    index.train(vectors)
    index.add_with_ids(vectors[:100], np.arange(100, dtype=np.int64))

    class FailingCodes:
        def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
            raise MemoryError("simulated")

    codes, index.codes = index.codes, FailingCodes()
    with pytest.raises(MemoryError):
        index.add_with_ids(vectors[100:], np.arange(100, 200, dtype=np.int64))
    index.codes = codes
    assert index.vectors.ntotal == index.codes.ntotal == 100


def test_ivf_rerank_parameters_are_checked(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(10, 3)
    with pytest.raises(FaceIndexError, match="m=5 PQ sub-quantizers must divide the embedding size 16"):
        FaceIndex.create(tmp_path, vectors, paths, identities, MODEL, kind="ivf-rerank", params={"m": 5})
    with pytest.raises(FaceIndexError, match="needs at least 16 vectors"):
        FaceIndex.create(tmp_path, vectors[:12], paths[:12], identities[:12], MODEL, kind="ivf-rerank")
    assert not (tmp_path / "meta.json").exists()


def _vectors_file(directory: Path) -> Path:
    return directory / json.loads((directory / "meta.json").read_text())["vectors_file"]


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        ("truncated", r"cannot read the faiss index \(truncated"),
        ("fewer", r"holds 29 vectors but .*meta\.json lists 30 faces"),
        ("narrower", r"index dimension 8 differs from the embedding size 16"),
        ("other ids", r"its face ids differ from those .*meta\.json lists"),
        ("not an id map", r"not the IndexIDMap2 of exact vectors .*\(found a faiss IndexFlatIP\)"),
    ],
)
def test_ivf_rerank_bad_vectors_file_is_an_error_naming_it(
    tmp_path: Path, replacement: str, message: str
) -> None:
    vectors, paths, identities = clustered(10, 3)
    FaceIndex.create(tmp_path, vectors, paths, identities, MODEL, kind="ivf-rerank", params={"nlist": 2})
    target = _vectors_file(tmp_path)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    if replacement == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    elif replacement == "not an id map":
        flat = faiss.IndexFlatIP(DIM)
        flat.add(unit)
        faiss.write_index(flat, str(target))
    else:
        dim = 8 if replacement == "narrower" else DIM
        count = 29 if replacement == "fewer" else 30
        other = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        other.add_with_ids(np.ascontiguousarray(unit[:count, :dim]), np.arange(count, dtype=np.int64) + 1)
        faiss.write_index(other, str(target))
    with pytest.raises(FaceIndexError, match=rf"{target.name}: {message}"):
        FaceIndex.open(tmp_path)


def test_unknown_below_the_threshold(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(5, 2)
    index = FaceIndex.create(tmp_path, vectors, paths, identities, MODEL, threshold=0.9)
    hits = index.search(vectors[3], k=3)
    assert index.identify(hits) == identities[3]
    stranger = np.random.default_rng(7).normal(size=DIM)
    stranger_hits = index.search(stranger, k=3)
    assert max(h.cosine for h in stranger_hits) < 0.9 and index.identify(stranger_hits) == "unknown"


@pytest.mark.parametrize(("kind", "files"), [("flat", 1), ("ivf-rerank", 2)])
def test_a_failed_write_leaves_the_previous_index_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, files: int
) -> None:
    vectors, paths, identities = clustered(10, 3)
    params = {"nlist": 2, "nprobe": 2} if kind == "ivf-rerank" else {}
    FaceIndex.create(tmp_path, vectors[:20], paths[:20], identities[:20], MODEL, kind=kind, params=params)
    files_before = sorted(p.name for p in tmp_path.iterdir())
    assert len([p for p in files_before if p.endswith(".faiss")]) == files

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    index = FaceIndex.open(tmp_path)
    index.add(vectors[20:], paths[20:], identities[20:])
    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(FaceIndexError, match="previous index on disk is unchanged"):
        index.save()
    monkeypatch.undo()

    if kind == "ivf-rerank":  # the codes file is written, then the vectors file fails half-way
        real_write = faiss.write_index

        def vectors_half_then_crash(part: faiss.Index, path: str) -> None:
            real_write(part, path)
            if isinstance(part, faiss.IndexIDMap2):
                Path(path).write_bytes(Path(path).read_bytes()[:100])
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(faiss, "write_index", vectors_half_then_crash)
        with pytest.raises(FaceIndexError, match="previous index on disk is unchanged"):
            index.save()
        monkeypatch.undo()
        assert sorted(p.name for p in tmp_path.iterdir()) == files_before

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
    assert len(reopened) == 20 and set(reopened.entries) == {str(i) for i in range(20)}
    assert reopened.search(vectors[4], k=1)[0].id == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before  # no temp files left behind
    index.save()  # and a later successful save replaces it
    assert len(FaceIndex.open(tmp_path)) == 30
    assert len(list(tmp_path.glob("*.faiss"))) == files and not list(tmp_path.glob(".*"))


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
        TASK_CLASS_KEY: "mobilenets.tasks.faces.embedding.FaceEmbedder",
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

    make_lfw_pairs(tmp_path / "pairs.txt", gallery / "faces", folds=2, pairs_per_fold=2, seed=0)
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

    too_few = [*build, "--out", str(tmp_path / "y"), "--index", "ivf-rerank", "--k-factor", "4"]
    assert faces_main(too_few) == 2
    assert (
        "ivf-rerank index with nlist=12 needs at least 16 vectors to train, got 12" in capsys.readouterr().err
    )
    assert not (tmp_path / "y").exists()


def test_a_killed_save_leaves_nothing_after_the_next_save(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(10, 3)
    FaceIndex.create(tmp_path, vectors[:20], paths[:20], identities[:20], MODEL, kind="ivf-rerank",
                     params={"nlist": 2, "nprobe": 2})  # fmt: skip
    named = sorted(p.name for p in tmp_path.iterdir())
    # what SIGKILL leaves at each step of a save: complete new files not yet named by meta.json, their
    # hidden temporaries, a half-written meta.json temporary, and old files of a save killed after the swap
    leftovers = ["index-0123456789ab.faiss", "vectors-0123456789ab.faiss", ".index-ba9876543210.faiss.x1y2.tmp",
                 ".vectors-ba9876543210.faiss.x1y2.tmp", ".meta.json.q1w2e3.tmp", "index-aaaaaaaaaaaa.faiss"]  # fmt: skip
    for name in leftovers:
        (tmp_path / name).write_bytes(b"\0" * 4096)
    index = FaceIndex.open(tmp_path)  # opening neither fails nor deletes (a save may be under way)
    assert sorted(p.name for p in index.orphaned_files()) == sorted(leftovers)
    assert len(list(tmp_path.iterdir())) == len(named) + len(leftovers)
    index.add(vectors[20:], paths[20:], identities[20:])
    index.save()
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert len(remaining) == len(named) and not set(remaining) & set(leftovers)
    assert len(FaceIndex.open(tmp_path)) == 30 and FaceIndex.open(tmp_path).orphaned_files() == []


def test_create_refuses_an_existing_index_unless_overwrite(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(4, 5)
    FaceIndex.create(tmp_path, vectors, paths, identities, MODEL, kind="ivf-rerank", params={"nlist": 2})
    old_files = {p.name for p in tmp_path.glob("*.faiss")}
    with pytest.raises(FaceIndexError, match=f"{tmp_path}: already holds a face index .*--overwrite"):
        FaceIndex.create(tmp_path, vectors[:6], paths[:6], identities[:6], MODEL)
    assert len(FaceIndex.open(tmp_path)) == 20
    FaceIndex.create(tmp_path, vectors[:6], paths[:6], identities[:6], MODEL, kind="flat", overwrite=True)
    replaced = FaceIndex.open(tmp_path)
    assert len(replaced) == 6 and replaced.kind == "flat"
    # the replaced index's two files went with it
    assert not old_files & {p.name for p in tmp_path.iterdir()} and len(list(tmp_path.glob("*.faiss"))) == 1


def test_cli_build_refuses_an_existing_index_and_a_nan_threshold(
    gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "index"
    build = ["index", "build", "--gallery", str(gallery / "faces"), "--ckpt_path", str(gallery / "model.ckpt"),
             "--out", str(out)]  # fmt: skip
    assert faces_main(build) == 0
    meta_before = (out / "meta.json").read_text()
    capsys.readouterr()
    assert faces_main([*build, "--ckpt_path", str(gallery / "other.ckpt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mobilenets faces: error: {out}: already holds a face index ({out / 'meta.json'}); "
        "choose another --out or pass --overwrite to replace it"
    )
    assert (out / "meta.json").read_text() == meta_before
    assert faces_main([*build, "--ckpt_path", str(gallery / "other.ckpt"), "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["model"]["path"].endswith("other.ckpt")
    capsys.readouterr()
    probe = gallery / "faces" / "Person_0002" / "Person_0002_0003.jpg"
    for command in ([*build, "--overwrite"], ["search", "--index", str(out), "--image", str(probe)]):
        with pytest.raises(SystemExit) as exit_info:
            faces_main([*command, "--threshold", "nan"])
        assert exit_info.value.code == 2
        assert (
            "argument --threshold: expected a finite cosine similarity, got 'nan'" in capsys.readouterr().err
        )


def test_an_index_without_a_model_fingerprint_refuses_embedding_shards(tmp_path: Path) -> None:
    vectors, paths, identities = clustered(4, 5)
    index = FaceIndex.create(tmp_path / "idx", vectors, paths, identities, MODEL, kind="flat")
    write_shard(
        tmp_path / "shards",
        shard_stem("e", 0, 1),
        vectors[:2],
        ["/new/a.jpg", "/new/b.jpg"],
        ["x", "x"],
        {"fingerprint": "f"},
    )
    with pytest.raises(FaceIndexError, match=r"idx: the index records no model fingerprint"):
        index.add_shards(ShardSet.open(tmp_path / "shards"))
    assert len(index) == 20


def test_an_index_built_from_images_records_the_fingerprint_of_its_model(
    gallery: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    argv = ["index", "build", "--gallery", str(gallery / "faces"), "--ckpt_path", str(gallery / "model.ckpt")]
    assert faces_main([*argv, "--out", str(out)]) == 0
    model = FaceIndex.open(out).metadata["model"]
    assert model["fingerprint"] == ImageEmbedder.load(gallery / "model.ckpt").fingerprint
    assert model["fingerprint"] != ImageEmbedder.load(gallery / "other.ckpt").fingerprint
