"""Embedding shards: written by ``predict``, read by ``faces index build|add --embeddings`` without the model,
checked against each other and against the index's model; two indexes built alike merge into the index built
on everything."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mobilenets.datasets.images import list_images
from mobilenets.datasets.synthetic.faces import make_identity_folders
from mobilenets.tasks.cli import main
from mobilenets.tasks.faces.embedding import FaceEmbedder
from mobilenets.tasks.faces.index import (
    FaceIndex,
    FaceIndexError,
    ImageEmbedder,
    training_sample_size,
)
from mobilenets.tasks.faces.shards import ShardError, ShardSet, model_fingerprint, shard_stem, write_shard

DIM = 16
MODEL = {"fingerprint": "f" * 64, "path": None, "embedding_size": DIM}
OTHER_MODEL = {"fingerprint": "0" * 64, "path": None, "embedding_size": DIM}
KIND_PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "ivf": {"nlist": 8, "nprobe": 3},
    "ivf-rerank": {"nlist": 8, "nprobe": 3, "k_factor": 4},
    "ivfpq": {"nlist": 8, "nprobe": 3, "m": 4, "nbits": 4},
}


def gallery(count: int = 400, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """``count`` faces of count/10 people, clustered."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(count // 10, dim))
    people = np.arange(count) % len(centres)
    vectors = (centres[people] + 0.3 * rng.normal(size=(count, dim))).astype(np.float32)
    identities = [f"id{p}" for p in people]
    return vectors, [f"/gallery/{name}/{i}.jpg" for i, name in enumerate(identities)], identities


def write_shards(
    folder: Path,
    vectors: np.ndarray,
    paths: list[str],
    identities: list[str],
    parts: int,
    model: dict = MODEL,
) -> list[Path]:
    bounds = np.linspace(0, len(vectors), parts + 1).astype(int)
    return [
        write_shard(folder, shard_stem("emb", rank, parts), vectors[a:b], paths[a:b], identities[a:b], model)
        for rank, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def hits(index: FaceIndex, queries: np.ndarray, k: int = 5) -> list[list[tuple[int, str, str, float]]]:
    """Each query's hits, with cosines to 4 decimals (two builds may round the last float32 bit apart)."""
    return [
        [(h.id, h.path, h.identity, round(h.cosine, 4)) for h in row]
        for row in index.search_batch(queries, k)
    ]


def faces_main(argv: list[str]) -> int:
    return main(["faces", *argv])


# --------------------------------------------------------------------------- the format
def test_shards_read_back_in_rank_order_with_their_tables(tmp_path: Path) -> None:
    vectors, paths, identities = gallery(100)
    headers = write_shards(tmp_path, vectors, paths, identities, parts=3)
    assert [h.name for h in headers] == [f"emb.shard-0000{r}-of-00003.json" for r in range(3)]
    header = json.loads(headers[1].read_text())
    assert header["count"] == 33 and header["embedding_size"] == DIM and header["model"] == MODEL
    shards = ShardSet.open(tmp_path)
    assert shards.count == 100 and shards.dim == DIM
    assert shards.paths == paths and shards.identities == identities
    np.testing.assert_array_equal(np.concatenate(list(shards.iter_rows(batch_rows=7))), vectors)
    rows = np.array([0, 5, 33, 34, 99])
    np.testing.assert_array_equal(shards.rows(rows), vectors[rows])
    assert not list(tmp_path.glob(".*"))  # no temporaries left


@pytest.mark.parametrize("kind", list(KIND_PARAMS))
def test_index_from_shards_equals_the_index_of_one_array(kind: str, tmp_path: Path) -> None:
    vectors, paths, identities = gallery(400)
    write_shards(tmp_path / "shards", vectors, paths, identities, parts=2)
    params = KIND_PARAMS[kind]
    in_memory = FaceIndex.create(tmp_path / "a", vectors, paths, identities, MODEL, kind=kind, params=params)
    shards = ShardSet.open(tmp_path / "shards")
    streamed = FaceIndex.create_from_shards(tmp_path / "b", shards, kind=kind, params=params)
    queries = vectors[::9] + 0.05
    assert hits(streamed, queries) == hits(in_memory, queries)
    reopened = FaceIndex.open(tmp_path / "b")
    assert hits(reopened, queries) == hits(in_memory, queries)
    assert reopened.metadata["model"]["fingerprint"] == MODEL["fingerprint"]


def test_training_reads_only_a_sample_and_adding_streams(tmp_path: Path, monkeypatch: Any) -> None:
    vectors, paths, identities = gallery(400)
    write_shards(tmp_path / "shards", vectors, paths, identities, parts=2)
    shards = ShardSet.open(tmp_path / "shards")
    requested: list[int] = []
    read_rows = ShardSet.rows
    monkeypatch.setattr(
        ShardSet, "rows", lambda self, rows: requested.append(len(rows)) or read_rows(self, rows)
    )
    chunks: list[int] = []
    iter_rows = ShardSet.iter_rows
    monkeypatch.setattr(
        ShardSet,
        "iter_rows",
        lambda self: (chunks.append(len(c)) or c for c in iter_rows(self, batch_rows=64)),
    )
    params = {"nlist": 1, "nprobe": 1}  # a training sample of 256 of the 400 faces
    index = FaceIndex.create_from_shards(tmp_path / "index", shards, kind="ivf", params=params)
    assert requested == [training_sample_size("ivf", params)] == [256]
    assert max(chunks) == 64 and sum(chunks) == 400 and len(index) == 400


# --------------------------------------------------------------------------- bad shards
def test_shards_of_another_size_or_model_are_refused_naming_the_shard(tmp_path: Path) -> None:
    vectors, paths, identities = gallery(40)
    write_shard(tmp_path / "dims", shard_stem("a", 0, 1), vectors, paths, identities, MODEL)
    wide, wide_paths, _ = gallery(40, dim=32, seed=1)
    bad = write_shard(
        tmp_path / "dims", shard_stem("b", 0, 1), wide, [p + "x" for p in wide_paths], identities, MODEL
    )
    with pytest.raises(ShardError, match=rf"{bad}: 32-d embeddings, a\.shard-00000-of-00001\.json has 16-d"):
        ShardSet.open(tmp_path / "dims")

    write_shard(tmp_path / "models", shard_stem("a", 0, 1), vectors, paths, identities, MODEL)
    other = [p + "x" for p in paths]
    bad = write_shard(tmp_path / "models", shard_stem("b", 0, 1), vectors, other, identities, OTHER_MODEL)
    with pytest.raises(ShardError, match=rf"{bad}: made by another model than a\.shard-00000-of-00001\.json"):
        ShardSet.open(tmp_path / "models")


def test_a_path_in_two_shards_is_refused_naming_both(tmp_path: Path) -> None:
    vectors, paths, identities = gallery(40)
    headers = write_shards(tmp_path, vectors, paths[:20] + paths[:20], identities, parts=2)
    with pytest.raises(ShardError) as error:
        ShardSet.open(tmp_path)
    assert str(error.value) == f"{paths[0]}: in two shards, {headers[0]} and {headers[1]}"


@pytest.mark.parametrize(
    "damage", ["missing npy", "truncated npy", "truncated csv", "missing rank", "no header"]
)
def test_a_missing_or_truncated_file_is_named(damage: str, tmp_path: Path) -> None:
    vectors, paths, identities = gallery(40)
    headers = write_shards(tmp_path, vectors, paths, identities, parts=2)
    npy, csv = headers[1].with_suffix(".npy"), headers[1].with_suffix(".csv")
    if damage == "missing npy":
        npy.unlink()
        expected = f"{npy}: shard file missing"
    elif damage == "truncated npy":
        npy.write_bytes(npy.read_bytes()[:-10])
        expected = f"{npy}: truncated"
    elif damage == "truncated csv":
        csv.write_bytes(csv.read_bytes()[:-5])
        expected = f"{csv}: truncated"
    elif damage == "missing rank":
        for suffix in (".json", ".npy", ".csv"):
            headers[0].with_suffix(suffix).unlink()
        expected = f"{headers[0]}: shard missing (1 of the 2 shards of 'emb' found)"
    else:  # a writer killed before its header: data files alone
        headers[1].unlink()
        expected = f"{headers[1].with_suffix('.csv')}: shard without its header"
    with pytest.raises(ShardError) as error:
        ShardSet.open(tmp_path)
    assert str(error.value).startswith(expected)


def test_changed_embeddings_fail_the_build_and_leave_nothing(tmp_path: Path) -> None:
    vectors, paths, identities = gallery(400)
    headers = write_shards(tmp_path / "shards", vectors, paths, identities, parts=2)
    npy = headers[1].with_suffix(".npy")
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF  # same size, other contents: found while streaming
    npy.write_bytes(bytes(data))
    shards = ShardSet.open(tmp_path / "shards")
    with pytest.raises(ShardError, match=rf"{npy}: contents differ from the sha256"):
        FaceIndex.create_from_shards(tmp_path / "index", shards, kind="ivf", params=KIND_PARAMS["ivf"])
    assert not (tmp_path / "index").exists() or not list((tmp_path / "index").iterdir())


# --------------------------------------------------------------------------- adding to an index
def test_add_from_shards_checks_the_model_and_the_paths(tmp_path: Path) -> None:
    vectors, paths, identities = gallery(400)
    write_shards(tmp_path / "first", vectors[:300], paths[:300], identities[:300], parts=2)
    write_shards(tmp_path / "more", vectors[300:], paths[300:], identities[300:], parts=1)
    params = KIND_PARAMS["ivf-rerank"]
    index = FaceIndex.create_from_shards(
        tmp_path / "index", ShardSet.open(tmp_path / "first"), "ivf-rerank", params
    )
    ids = index.add_shards(ShardSet.open(tmp_path / "more"))
    index.save()
    assert ids == list(range(300, 400)) and len(FaceIndex.open(tmp_path / "index")) == 400
    reference = FaceIndex.create(tmp_path / "ref", vectors, paths, identities, MODEL, "ivf-rerank", params)
    queries = vectors[::11] + 0.05
    # trained on a sample of the first 300 only, so compare what exact re-ranking makes exact: the top hit
    assert [row[0] for row in hits(FaceIndex.open(tmp_path / "index"), queries)] == [
        row[0] for row in hits(reference, queries)
    ]

    before = (tmp_path / "index" / "meta.json").read_bytes()
    again = ShardSet.open(tmp_path / "more")
    with pytest.raises(
        FaceIndexError, match=rf"{paths[300]}: in .*emb\.shard-00000-of-00001\.json and already in"
    ):
        index.add_shards(again)
    write_shards(
        tmp_path / "other", vectors[:5], [p + "x" for p in paths[:5]], identities[:5], 1, OTHER_MODEL
    )
    with pytest.raises(FaceIndexError, match="embeddings of another model than the index"):
        index.add_shards(ShardSet.open(tmp_path / "other"))
    assert (tmp_path / "index" / "meta.json").read_bytes() == before


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", list(KIND_PARAMS))
def test_two_indexes_built_alike_merge_into_the_index_of_everything(kind: str, tmp_path: Path) -> None:
    vectors, paths, identities = gallery(400)
    write_shards(tmp_path / "a", vectors[:250], paths[:250], identities[:250], parts=2)
    write_shards(tmp_path / "b", vectors[250:], paths[250:], identities[250:], parts=1)
    write_shards(tmp_path / "all", vectors, paths, identities, parts=3)
    first = FaceIndex.create_from_shards(
        tmp_path / "A", ShardSet.open(tmp_path / "a"), kind, KIND_PARAMS[kind]
    )
    FaceIndex.create_from_shards(tmp_path / "B", ShardSet.open(tmp_path / "b"), like=first)
    everything = FaceIndex.create_from_shards(
        tmp_path / "all-index", ShardSet.open(tmp_path / "all"), like=first
    )
    merged = FaceIndex.merge(FaceIndex.open(tmp_path / "A"), FaceIndex.open(tmp_path / "B"), tmp_path / "C")
    queries = vectors[::7] + 0.05
    assert len(merged) == 400 and merged.metadata["next_id"] == 400
    assert hits(FaceIndex.open(tmp_path / "C"), queries) == hits(everything, queries)
    assert len(FaceIndex.open(tmp_path / "A")) == 250  # the parts are unchanged


def test_merge_refuses_parts_trained_apart_or_sharing_an_image(tmp_path: Path) -> None:
    vectors, paths, identities = gallery(400)
    write_shards(tmp_path / "a", vectors[:200], paths[:200], identities[:200], parts=1)
    write_shards(tmp_path / "b", vectors[200:], paths[200:], identities[200:], parts=1)
    params = KIND_PARAMS["ivf"]
    FaceIndex.create_from_shards(tmp_path / "A", ShardSet.open(tmp_path / "a"), "ivf", params)
    FaceIndex.create_from_shards(tmp_path / "B", ShardSet.open(tmp_path / "b"), "ivf", params)
    with pytest.raises(FaceIndexError, match="trained apart from"):
        FaceIndex.merge(FaceIndex.open(tmp_path / "A"), FaceIndex.open(tmp_path / "B"), tmp_path / "C")
    FaceIndex.create_from_shards(
        tmp_path / "A2", ShardSet.open(tmp_path / "a"), like=FaceIndex.open(tmp_path / "A")
    )
    with pytest.raises(FaceIndexError) as error:
        FaceIndex.merge(FaceIndex.open(tmp_path / "A"), FaceIndex.open(tmp_path / "A2"), tmp_path / "C")
    assert str(error.value).startswith(
        f"{paths[0]}: in both indexes, {tmp_path / 'A'} (id 0) and {tmp_path / 'A2'}"
    )
    assert not (tmp_path / "C").exists()


# --------------------------------------------------------------------------- predict → shards → index, by the CLI
def test_fingerprint_is_of_the_weights_not_the_file_or_threshold(
    tmp_path: Path, save_checkpoint: Any
) -> None:
    torch.manual_seed(0)
    task = FaceEmbedder(embedding_size=DIM, width_mult=0.25, input_size=32).eval()
    loaded = ImageEmbedder.load(save_checkpoint(task, tmp_path / "a.ckpt"))
    assert loaded.fingerprint == model_fingerprint(task)
    task.threshold.fill_(0.3)  # calibrating the threshold does not change the embeddings
    assert model_fingerprint(task) == loaded.fingerprint
    with torch.no_grad():
        task.embedding[0].weight[0, 0] += 1e-3
    assert model_fingerprint(task) != loaded.fingerprint


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_predict_shards_build_an_index_without_the_model(
    tmp_path: Path, save_checkpoint: Any, run_predict: Any, capsys: pytest.CaptureFixture
) -> None:
    make_identity_folders(tmp_path / "faces", num_identities=3, images_per_identity=2, size=40, seed=4)
    make_identity_folders(
        tmp_path / "later", num_identities=1, images_per_identity=2, size=40, seed=5, prefix="L"
    )
    torch.manual_seed(0)
    task = FaceEmbedder(embedding_size=8, width_mult=0.25, input_size=32).eval()
    ckpt = save_checkpoint(task, tmp_path / "faces.ckpt")
    options = {
        "model.init_args.width_mult": 0.25,
        "model.init_args.input_size": 32,
        "model.init_args.embedding_size": 8,
        "data.init_args.batch_size": 4,
    }
    for name in ("faces", "later"):
        run_predict(
            "faces_triplet.yaml",
            ckpt,
            tmp_path / f"run-{name}",
            {
                **options,
                "data.init_args.predict_dir": tmp_path / name,
                "model.init_args.embeddings_file": tmp_path / name / "out" / "embeddings.csv",
            },
        )
    out = tmp_path / "faces" / "out"
    header = json.loads((out / "embeddings.shard-00000-of-00001.json").read_text())
    assert header["count"] == 6 and header["model"]["fingerprint"] == ImageEmbedder.load(ckpt).fingerprint
    assert header["model"]["path"] == str(ckpt.resolve())
    np.testing.assert_array_equal(
        np.load(out / "embeddings.shard-00000-of-00001.npy"), np.load(out / "embeddings.npy")
    )
    shards = ShardSet.open(out)
    assert shards.paths == [str(p.resolve()) for p in list_images(tmp_path / "faces")]
    assert shards.identities == [Path(p).parent.name for p in shards.paths]

    index_dir = tmp_path / "index"
    capsys.readouterr()
    assert faces_main(["index", "build", "--embeddings", str(out), "--out", str(index_dir)]) == 0
    assert "built" in capsys.readouterr().out
    later = tmp_path / "later" / "out"
    assert faces_main(["index", "add", "--index", str(index_dir), "--embeddings", str(later)]) == 0
    assert "added 2 faces" in capsys.readouterr().out
    assert faces_main(["index", "add", "--index", str(index_dir), "--embeddings", str(later)]) == 2
    assert "already in the index" in capsys.readouterr().err
    probe = sorted((tmp_path / "faces").rglob("*.jpg"))[3]
    assert faces_main(["search", "--index", str(index_dir), "--image", str(probe), "-k", "1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["hits"][0]["path"] == str(probe.resolve()) and found["hits"][0]["cosine"] == pytest.approx(
        1.0
    )

    torch.manual_seed(1)  # the same architecture, other weights: its shards are refused
    other = save_checkpoint(
        FaceEmbedder(embedding_size=8, width_mult=0.25, input_size=32), tmp_path / "o.ckpt"
    )
    make_identity_folders(
        tmp_path / "new", num_identities=1, images_per_identity=1, size=40, seed=6, prefix="N"
    )
    run_predict(
        "faces_triplet.yaml",
        other,
        tmp_path / "run-new",
        {
            **options,
            "data.init_args.predict_dir": tmp_path / "new",
            "model.init_args.embeddings_file": tmp_path / "n.csv",
        },
    )
    assert faces_main(["index", "add", "--index", str(index_dir), "--embeddings", str(tmp_path)]) == 2
    assert "embeddings of another model than the index" in capsys.readouterr().err
    argv = ["search", "--index", str(index_dir), "--image", str(probe), "--ckpt_path", str(other)]
    assert faces_main(argv) == 2
    assert f"{other}: this index ({index_dir}) holds embeddings of another model" in capsys.readouterr().err


def test_cli_merge_of_parts_built_like_the_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vectors, paths, identities = gallery(400)
    write_shards(tmp_path / "a", vectors[:200], paths[:200], identities[:200], parts=2)
    write_shards(tmp_path / "b", vectors[200:], paths[200:], identities[200:], parts=2)
    a, b, c = (str(tmp_path / name) for name in ("A", "B", "C"))
    build = ["index", "build", "--index", "ivf", "--nlist", "8", "--nprobe", "8"]
    assert faces_main([*build, "--embeddings", str(tmp_path / "a"), "--out", a]) == 0
    assert faces_main(["index", "build", "--embeddings", str(tmp_path / "b"), "--out", b, "--like", a]) == 0
    assert faces_main(["index", "merge", a, b, "--out", c]) == 0
    assert "400 faces" in capsys.readouterr().out
    assert faces_main(["index", "merge", a, b, "--out", c]) == 2
    assert f"{c}: already holds a face index" in capsys.readouterr().err
    assert (
        faces_main(
            ["index", "build", "--embeddings", str(tmp_path / "nowhere"), "--out", str(tmp_path / "D")]
        )
        == 2
    )
    assert f"{tmp_path / 'nowhere'}: embedding shard folder not found" in capsys.readouterr().err
