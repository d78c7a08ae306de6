"""Face-search indexes over embeddings of a ``FaceEmbedder`` checkpoint, persisted with faiss.

An index directory holds ``meta.json`` (id → image path and identity, the model's sha256, embedding size,
metric, index type and parameters, the "unknown" threshold, creation time) and the faiss file it names
(``index-<token>.faiss``). Saving writes a new faiss file, then replaces ``meta.json`` atomically
(``os.replace``) and only then deletes the old faiss file: a crash or full disk at any point leaves either
the old or the new index complete, never a mix. An ``ivf-rerank`` index has a second file of the exact vectors
(``vectors-<token>.faiss``, named by ``meta.json``'s ``vectors_file``), written and swapped the same way.
A save killed before its clean-up (SIGKILL, power loss) leaves faiss files that ``meta.json`` does not name,
or hidden temporaries; the next save removes them (``FaceIndex.orphaned_files``), so nothing accumulates.

Similarity is the inner product of L2-normalised embeddings (cosine); every faiss index is built with
``METRIC_INNER_PRODUCT``. Index types: ``flat`` (exact), ``ivf`` (IVF-Flat), ``ivf-rerank`` (IVF lists of
4-bit PQ fast-scan codes pick candidates, exact inner products re-rank them), ``hnsw`` (graph) and ``ivfpq``
(IVF with product quantisation, for very large galleries).

Built from images by the model (``create``), or from embedding shards without it (``create_from_shards``,
``add_shards``: ``tasks/faces/shards.py``): the IVF / PQ training reads a sample of the shards, then they
stream in, so memory holds the sample and the index, never all the embeddings at once. ``meta.json``'s
``model`` records the model's ``fingerprint`` (its weights and preprocessing), and shards of another model
are refused. Indexes built alike on disjoint images (``create_from_shards(like=...)``: one training, reused)
merge into one (``merge``) whose search results are those of one index built on everything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import atomic_path, temporary_pattern
from mobilenets.datasets.images import CorruptImageError, load_rgb
from mobilenets.datasets.transforms import ClassificationTransform
from mobilenets.tasks.base import BaseTask, CheckpointError
from mobilenets.tasks.faces.shards import ShardSet, model_fingerprint
from mobilenets.tasks.teacher import file_sha256

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "ivf-rerank", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "ivf-rerank", "hnsw", "ivfpq")
RERANK_KIND = "ivf-rerank"
METADATA_FILE = "meta.json"
FORMAT_VERSION = 1
#: fast-scan PQ codes are 4-bit: 16 centroids per sub-quantizer, so training needs at least 16 vectors.
FAST_SCAN_CENTROIDS = 16
#: Galleries up to this size get an exact index by default; beyond it IVF + re-ranking; beyond IVF_LIMIT IVF-PQ.
EXACT_LIMIT = 100_000
IVF_LIMIT = 10_000_000
#: Fallback "unknown" threshold (cosine) when neither the model nor the user provides one.
FALLBACK_THRESHOLD = 0.5


class FaceIndexError(MobilenetsError, ValueError):
    """A face index, model or probe that cannot be used as asked; the message names the file."""


# --------------------------------------------------------------------------- choosing and making indexes
def default_index_kind(num_vectors: int) -> IndexKind:
    """Exact search up to ~100k faces, IVF fast-scan + exact re-ranking up to ~10M, IVF-PQ beyond (memory)."""
    if num_vectors <= EXACT_LIMIT:
        return "flat"
    if num_vectors <= IVF_LIMIT:
        return "ivf-rerank"
    return "ivfpq"


def _power_of_two_near(value: float) -> int:
    return 1 << max(0, round(math.log2(max(value, 1.0))))


def _pq_subquantizers(dim: int, sub_dim: int) -> int:
    """The largest divisor of ``dim`` that is at most dim / sub_dim (sub-vectors of at least ``sub_dim``)."""
    for m in range(max(1, dim // sub_dim), 0, -1):
        if dim % m == 0:
            return m
    return 1


def default_index_params(kind: IndexKind, num_vectors: int, dim: int) -> dict[str, int]:
    """Parameters for ``kind`` at this gallery size (powers of two, nlist capped by n).

    IVF kinds: nlist ≈ 4√n (faiss' guideline) and nprobe = max(8, nlist / 128), i.e. 32 of 4096 lists at
    1 M faces, the coarse k-means trained on up to 256 vectors per list.
    ivf-rerank: 4-d sub-vectors of 4 bits (m = 32 at 128-d, 16 bytes a face) and the k·16 best candidates
    re-ranked by exact inner products. On 1 M clustered face-like vectors (benchmarks/face_index.py, 2000
    queries, 2 threads, timed in turns with exact search) it found exact search's top-1 face 97.2% of the
    time at 106x exact's queries/s; nprobe 16 → 94.3% (107x), 24 → 96.4% (109x), 64 → 98.5% (69x);
    k_factor 8 → 93.8% (102x), 32 → 97.2% (61x). IVF-Flat over the same lists gave the same recall at each
    nprobe but 12x at nprobe 32 (18x at 16). The top-1 face showed the right person in 100% everywhere.
    IVF-PQ (beyond 10 M faces, memory bound): the same lists with 8-d sub-vectors of 8 bits.
    """
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 40, "efSearch": 64}
    nlist = max(1, min(_power_of_two_near(4 * math.sqrt(max(num_vectors, 1))), num_vectors))
    nprobe = min(max(8, nlist // 128), nlist)
    if kind == "ivf":
        return {"nlist": nlist, "nprobe": nprobe}
    if kind == RERANK_KIND:
        return {"nlist": nlist, "nprobe": nprobe, "m": _pq_subquantizers(dim, 4), "k_factor": 16}
    nbits = max(1, min(8, int(math.log2(max(num_vectors, 2)))))
    return {"nlist": nlist, "nprobe": nprobe, "m": _pq_subquantizers(dim, 8), "nbits": nbits}


class RerankedIVFIndex:
    """IVF lists of 4-bit PQ fast-scan codes (``codes``) propose the k·``k_factor`` best candidates of a
    query; exact inner products with the float32 embeddings kept by id (``vectors``, an IndexIDMap2 over
    IndexFlatIP) re-rank them. The compressed scan is fast but coarse and the re-ranking makes the final
    order and similarities exact. Offers the part of faiss' index interface that ``FaceIndex`` uses
    (``d``, ``ntotal``, ``is_trained``, ``train``, ``add_with_ids``, ``remove_ids``, ``search``).

    faiss' own IndexRefineFlat is not used: it supports neither add_with_ids nor remove_ids, so ids could
    not stay stable, and it does not save k_factor.
    """

    def __init__(self, codes: faiss.Index, vectors: faiss.Index, k_factor: int) -> None:
        self.codes = codes
        self.vectors = vectors
        self.k_factor = int(k_factor)

    @classmethod
    def empty(cls, dim: int, params: dict[str, int]) -> RerankedIVFIndex:
        """An untrained index with ``params``' nlist, m (must divide ``dim``) and k_factor."""
        nlist, m, k_factor = int(params["nlist"]), int(params["m"]), int(params["k_factor"])
        if m < 1 or dim % m:
            raise FaceIndexError(f"ivf-rerank: m={m} PQ sub-quantizers must divide the embedding size {dim}")
        if k_factor < 1:
            raise FaceIndexError(f"ivf-rerank: k_factor must be >= 1, got {k_factor}")
        ip = faiss.METRIC_INNER_PRODUCT
        codes = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, nlist, m, 4, ip)
        return cls(codes, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), k_factor)

    @property
    def d(self) -> int:
        return int(self.codes.d)

    @property
    def ntotal(self) -> int:
        return int(self.codes.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.codes.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        self.codes.train(vectors)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.vectors.add_with_ids(vectors, ids)
        try:
            self.codes.add_with_ids(vectors, ids)
        except BaseException:  # out of memory, interrupted: keep the two halves in step
            self.vectors.remove_ids(np.asarray(ids, dtype=np.int64))
            raise

    def remove_ids(self, ids: np.ndarray) -> int:
        self.vectors.remove_ids(ids)
        return int(self.codes.remove_ids(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss' (similarities, ids) of the ``k`` best faces per query row (-1 where fewer exist)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        candidates = min(max(k, k * self.k_factor), max(self.ntotal, 1))
        _, ids = self.codes.search(queries, candidates)
        valid = ids >= 0
        if valid.all():
            stored = self.vectors.reconstruct_batch(ids.ravel())
        else:  # lists too short to fill every query's candidates
            stored = np.zeros((ids.size, self.d), dtype=np.float32)
            stored[valid.ravel()] = self.vectors.reconstruct_batch(ids[valid])
        scores = np.einsum("qcd,qd->qc", stored.reshape(*ids.shape, self.d), queries)
        scores[~valid] = -np.inf
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, best, axis=1)
        top_ids = np.take_along_axis(ids, best, axis=1)
        if k > candidates:  # faiss' convention for missing results: id -1
            top_scores = np.pad(top_scores, ((0, 0), (0, k - candidates)), constant_values=-np.inf)
            top_ids = np.pad(top_ids, ((0, 0), (0, k - candidates)), constant_values=-1)
        top_ids[~np.isfinite(top_scores)] = -1
        return top_scores, top_ids


def make_faiss_index(kind: IndexKind, dim: int, params: dict[str, int]) -> faiss.Index | RerankedIVFIndex:
    """An empty inner-product index of ``kind`` that accepts caller-chosen ids (add_with_ids)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(params["M"]), ip)
        hnsw.hnsw.efConstruction = int(params["efConstruction"])
        return faiss.IndexIDMap2(hnsw)
    if kind == RERANK_KIND:
        return RerankedIVFIndex.empty(dim, params)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), ip)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(
            quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]), ip
        )
    else:
        raise FaceIndexError(f"unknown index type {kind!r}; choose one of {INDEX_KINDS}")
    return index  # faiss' Python wrapper keeps the quantizer alive with the index


def apply_search_params(index: faiss.Index | RerankedIVFIndex, kind: str, params: dict[str, int]) -> None:
    """Set the query-time knobs (nprobe / efSearch / k_factor) that the faiss file may not carry."""
    if isinstance(index, RerankedIVFIndex):
        faiss.extract_index_ivf(index.codes).nprobe = int(params["nprobe"])
        index.k_factor = int(params["k_factor"])
    elif kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = int(params["efSearch"])


def training_sample_size(kind: str, params: dict[str, int]) -> int:
    """Vectors the IVF / PQ training uses at most: 256 per list (faiss' own cap for the coarse k-means: 64 per
    list cost ~5 points of recall@1 at 1 M faces), and for IVF-PQ at least 256 per PQ centroid."""
    nlist = int(params.get("nlist", 1))
    return max(256 * nlist, 256 * (1 << int(params.get("nbits", 0))) if kind == "ivfpq" else 0)


def training_rows(num_vectors: int, sample_size: int, seed: int = 0) -> np.ndarray | None:
    """The sorted rows of a seeded training sample of ``sample_size`` out of ``num_vectors`` (None: all);
    the same rows whether the vectors are one array or streamed from shards."""
    if num_vectors <= sample_size:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_vectors, size=sample_size, replace=False))


def check_training_size(kind: str, params: dict[str, int], num_vectors: int) -> None:
    nlist = int(params.get("nlist", 1))
    needed = max(nlist, FAST_SCAN_CENTROIDS) if kind == RERANK_KIND else nlist
    if num_vectors < needed:
        raise FaceIndexError(
            f"an {kind} index with nlist={nlist} needs at least {needed} vectors to train, got {num_vectors}"
        )


def train_index(
    index: faiss.Index | RerankedIVFIndex,
    vectors: np.ndarray,
    kind: str,
    params: dict[str, int],
    seed: int = 0,
) -> None:
    """Train IVF / PQ indexes on a seeded sample of ``training_sample_size`` vectors."""
    if index.is_trained:
        return
    check_training_size(kind, params, len(vectors))
    rows = training_rows(len(vectors), training_sample_size(kind, params), seed)
    if rows is not None:
        vectors = vectors[rows]
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))


def train_from_shards(
    index: faiss.Index | RerankedIVFIndex, shards: ShardSet, kind: str, params: dict[str, int], seed: int = 0
) -> None:
    """``train_index`` on the rows of ``shards`` that it would sample from them as one array, read from
    the files (memory: the sample, at most ``training_sample_size`` vectors, whatever the shards hold)."""
    if index.is_trained:
        return
    check_training_size(kind, params, shards.count)
    rows = training_rows(shards.count, training_sample_size(kind, params), seed)
    sample = normalize_rows(shards.rows(np.arange(shards.count) if rows is None else rows))
    index.train(sample)


def trained_empty_copy(index: faiss.Index | RerankedIVFIndex, kind: str) -> faiss.Index | RerankedIVFIndex:
    """A copy of ``index`` with its training (coarse quantizer, PQ codebooks) and no vectors: parts built
    from it on other data can be merged (``FaceIndex.merge``)."""
    if kind == "hnsw":
        raise FaceIndexError(
            "an HNSW index cannot be emptied or merged (faiss graphs); use flat, ivf, ivf-rerank or ivfpq"
        )
    if isinstance(index, RerankedIVFIndex):
        codes = faiss.clone_index(index.codes)
        codes.reset()
        return RerankedIVFIndex(codes, faiss.IndexIDMap2(faiss.IndexFlatIP(index.d)), index.k_factor)
    copy = faiss.clone_index(index)
    copy.reset()
    return copy


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- the embedding model
class ImageEmbedder:
    """A trained ``FaceEmbedder`` checkpoint turned into a function image files → unit embeddings."""

    def __init__(self, model: torch.nn.Module, path: Path, checksum: str) -> None:

        self.model = model.eval()
        self.path = path
        self.checksum = checksum
        self.embedding_size = int(model.embedding_size)
        self.input_size = int(model.hparams.input_size)
        self.threshold = float(getattr(model, "threshold", torch.tensor(float("nan"))))
        mean, std = model.normalization
        self.transform = ClassificationTransform(self.input_size, train=False, mean=mean, std=std)

    @classmethod
    def load(cls, ckpt_path: str | Path) -> ImageEmbedder:

        path = Path(ckpt_path)
        try:
            model = BaseTask.load_task(path)
        except CheckpointError as error:
            raise FaceIndexError(str(error)) from error
        if not hasattr(model, "embedding_size"):
            raise FaceIndexError(
                f"{path}: a checkpoint of {type(model).__name__}, not of a face-embedding task"
            )
        return cls(model, path.resolve(), file_sha256(path))

    @property
    def fingerprint(self) -> str:
        """The model's ``model_fingerprint``: what embedding shards record of the model that made them."""
        return model_fingerprint(self.model)

    def model_info(self) -> dict[str, Any]:
        hp = self.model.hparams
        return {
            "path": str(self.path),
            "sha256": self.checksum,
            "fingerprint": self.fingerprint,
            "embedding_size": self.embedding_size,
            "input_size": self.input_size,
            "width_mult": float(hp.width_mult),
            "task": type(self.model).__name__,
        }

    def load_image(self, path: Path) -> torch.Tensor:

        try:
            return self.transform(load_rgb(path, self.transform.decode_size))
        except FileNotFoundError as error:
            raise FaceIndexError(f"{path}: image file not found") from error
        except CorruptImageError as error:
            raise FaceIndexError(f"{path}: unreadable image ({error})") from error

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> np.ndarray:
        return self.model(images).float().numpy()

    def embed_paths(self, paths: Sequence[Path], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Embeddings (N, D) of image files, in order, with a progress bar."""
        from tqdm.auto import tqdm

        out = np.empty((len(paths), self.embedding_size), dtype=np.float32)
        with tqdm(total=len(paths), desc="embedding faces", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                out[start : start + len(chunk)] = self.embed_images(
                    torch.stack([self.load_image(Path(p)) for p in chunk])
                )
                bar.update(len(chunk))
        return out


# --------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class SearchHit:
    """One gallery face returned by a search, with its cosine similarity to the probe."""

    id: int
    path: str
    identity: str
    cosine: float
    above_threshold: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaceIndex:
    """A persisted faiss face index with its metadata (see the module docstring for the layout).

    Build with ``FaceIndex.create``, open with ``FaceIndex.open(directory)``; ``add``/``remove`` change it
    in memory and ``save()`` writes it atomically. ``search`` takes an embedding, a batch of embeddings,
    or an image path (embedded with the index's model).
    """

    def __init__(
        self, directory: Path, index: faiss.Index | RerankedIVFIndex, metadata: dict[str, Any]
    ) -> None:
        self.directory = Path(directory)
        self.index = index
        self.metadata = metadata
        self._embedder: ImageEmbedder | None = None
        apply_search_params(self.index, self.kind, self.params)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.metadata["index_type"]

    @property
    def params(self) -> dict[str, int]:
        return self.metadata["index_params"]

    @property
    def dim(self) -> int:
        return int(self.metadata["embedding_size"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def entries(self) -> dict[str, dict[str, str]]:
        """id (as a string, JSON keys) → {"path", "identity"}."""
        return self.metadata["entries"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        directory: str | Path,
        embeddings: np.ndarray,
        paths: Sequence[str | Path],
        identities: Sequence[str],
        model_info: dict[str, Any],
        kind: IndexKind | None = None,
        params: dict[str, int] | None = None,
        threshold: float | None = None,
        threshold_source: str = "user",
        overwrite: bool = False,
    ) -> FaceIndex:
        """Build an index over ``embeddings`` (rows L2-normalised here) and save it to ``directory``; an
        index already there (perhaps of another model) is replaced only with ``overwrite``."""
        directory = Path(directory)
        _refuse_existing(directory, overwrite)
        if len(embeddings) == 0:
            raise FaceIndexError(f"{directory}: cannot build an index from an empty gallery")
        embeddings = normalize_rows(embeddings)
        dim = embeddings.shape[1]
        if int(model_info.get("embedding_size", dim)) != dim:
            raise FaceIndexError(
                f"{model_info.get('path')}: model embedding size differs from the embeddings' {dim}"
            )
        metadata = _new_metadata(len(embeddings), dim, model_info, kind, params, threshold, threshold_source)
        chosen, merged = metadata["index_type"], metadata["index_params"]
        index = make_faiss_index(chosen, dim, merged)
        train_index(index, embeddings, chosen, merged)
        face_index = cls(directory, index, metadata)
        face_index.add(embeddings, paths, identities)
        face_index.save()
        return face_index

    @classmethod
    def create_from_shards(
        cls,
        directory: str | Path,
        shards: ShardSet,
        kind: IndexKind | None = None,
        params: dict[str, int] | None = None,
        threshold: float | None = None,
        threshold_source: str = "user",
        overwrite: bool = False,
        like: FaceIndex | None = None,
        seed: int = 0,
    ) -> FaceIndex:
        """Build an index from embedding shards without the model, in bounded memory: the IVF / PQ training
        reads a sample (``training_rows``: the rows ``create`` would sample from the same vectors in one
        array), then the shards stream in. With ``like``, an index of the same model, its type, parameters,
        threshold and training are reused instead (parts that ``merge`` can join)."""
        directory = Path(directory)
        _refuse_existing(directory, overwrite)
        if like is not None:
            like.check_shards(shards)
            metadata = {
                **_new_metadata(
                    shards.count, shards.dim, shards.model, like.kind, like.params, like.threshold, ""
                ),
                "threshold_source": like.metadata.get("threshold_source", "?"),
                "index_choice": f"trained like {like.directory}",
            }
            index = trained_empty_copy(like.index, like.kind)
        else:
            recorded = shards.model.get("threshold")
            if threshold is None and recorded is not None and math.isfinite(float(recorded)):
                threshold = float(recorded)
                threshold_source = "validation pairs of the model's training (recorded in the shards)"
            metadata = _new_metadata(
                shards.count, shards.dim, shards.model, kind, params, threshold, threshold_source
            )
            chosen, merged = metadata["index_type"], metadata["index_params"]
            index = make_faiss_index(chosen, shards.dim, merged)
            train_from_shards(index, shards, chosen, merged, seed)
        face_index = cls(directory, index, metadata)
        face_index.add_shards(shards)
        face_index.save()
        return face_index

    @classmethod
    def merge(
        cls, first: FaceIndex, second: FaceIndex, directory: str | Path, overwrite: bool = False
    ) -> FaceIndex:
        """Join two indexes of disjoint images, trained alike (``create_from_shards(like=...)``), into a new
        one saved to ``directory``: ``first``'s ids stay, ``second``'s move past them. Search results equal
        those of one index built on both parts' embeddings with the same training. ``first`` is consumed
        (its in-memory index becomes the merged one); neither directory changes."""
        directory = Path(directory)
        for part in (first, second):
            if directory.resolve() == part.directory.resolve():
                raise FaceIndexError(
                    f"{directory}: the merged index must go to a new folder, not one of its parts"
                )
        _refuse_existing(directory, overwrite)
        if first.kind == "hnsw" or second.kind == "hnsw":
            raise FaceIndexError(
                f"{first.directory if first.kind == 'hnsw' else second.directory}: HNSW indexes cannot be merged"
            )
        structure = ("nlist", "m", "nbits")
        if (first.kind, first.dim, {k: first.params.get(k) for k in structure}) != (
            second.kind,
            second.dim,
            {k: second.params.get(k) for k in structure},
        ):
            raise FaceIndexError(
                f"{second.directory}: a {second.dim}-d {second.kind} index {second.params}, "
                f"{first.directory} is a {first.dim}-d {first.kind} index {first.params}; only indexes of one "
                "type and parameters can be merged"
            )
        first_model, second_model = first.metadata["model"], second.metadata["model"]
        key = (
            "fingerprint" if first_model.get("fingerprint") and second_model.get("fingerprint") else "sha256"
        )
        if first_model.get(key) != second_model.get(key):
            raise FaceIndexError(
                f"{second.directory}: built by another model than {first.directory} ({key} differs)"
            )
        if faiss.serialize_index(_faiss_part(trained_empty_copy(first.index, first.kind))).tobytes() != (
            faiss.serialize_index(_faiss_part(trained_empty_copy(second.index, second.kind))).tobytes()
        ):
            raise FaceIndexError(
                f"{second.directory}: trained apart from {first.directory} (other IVF centroids or PQ "
                f"codebooks); build the parts with --like {first.directory}"
            )
        by_path = {entry["path"]: face_id for face_id, entry in first.entries.items()}
        for face_id, entry in second.entries.items():
            if entry["path"] in by_path:
                raise FaceIndexError(
                    f"{entry['path']}: in both indexes, {first.directory} (id {by_path[entry['path']]}) and "
                    f"{second.directory} (id {face_id})"
                )
        offset = int(first.metadata["next_id"])
        if isinstance(first.index, RerankedIVFIndex) and isinstance(second.index, RerankedIVFIndex):
            first.index.codes.merge_from(second.index.codes, offset)
            first.index.vectors.merge_from(second.index.vectors, offset)
        else:
            first.index.merge_from(second.index, offset)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        metadata = {
            **first.metadata,
            "entries": {
                **first.entries,
                **{str(int(face_id) + offset): entry for face_id, entry in second.entries.items()},
            },
            "next_id": offset + int(second.metadata["next_id"]),
            "merged_from": [str(first.directory.resolve()), str(second.directory.resolve())],
            "created": now,
            "updated": now,
            "index_file": None,
            "vectors_file": None,
        }
        merged = cls(directory, first.index, metadata)
        merged.save()
        return merged

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | Path, ckpt_path: str | Path | None = None) -> FaceIndex:
        """Open a saved index; with ``ckpt_path`` also check that it is the model the index was built with."""
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not meta_path.is_file():
            raise FaceIndexError(f"{meta_path}: no face index here (metadata file missing)")
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise FaceIndexError(f"{meta_path}: unreadable index metadata ({error})") from error
        for key in (
            "index_type",
            "index_params",
            "embedding_size",
            "entries",
            "index_file",
            "model",
            "threshold",
        ):
            if key not in metadata:
                raise FaceIndexError(f"{meta_path}: index metadata lacks the {key!r} entry")
        if metadata.get("metric") != "inner_product":
            raise FaceIndexError(f"{meta_path}: metric {metadata.get('metric')!r}, expected 'inner_product'")
        index: faiss.Index | RerankedIVFIndex = _read_faiss_file(directory, metadata, "index_file")
        if metadata["index_type"] == RERANK_KIND:
            vectors = _read_faiss_file(directory, metadata, "vectors_file")
            vectors_path = directory / str(metadata["vectors_file"])
            if not isinstance(vectors, faiss.IndexIDMap2):
                raise FaceIndexError(
                    f"{vectors_path}: not the IndexIDMap2 of exact vectors that an {RERANK_KIND} index keeps "
                    f"(found a faiss {type(vectors).__name__})"
                )
            stored = faiss.vector_to_array(vectors.id_map)
            listed = np.fromiter(
                map(int, metadata["entries"]), dtype=np.int64, count=len(metadata["entries"])
            )
            if not np.array_equal(np.sort(stored), np.sort(listed)):
                raise FaceIndexError(
                    f"{vectors_path}: its face ids differ from those {meta_path} lists (a file of another save?)"
                )
            index = RerankedIVFIndex(index, vectors, int(metadata["index_params"]["k_factor"]))
        face_index = cls(directory, index, metadata)
        if ckpt_path is not None:
            face_index.use_model(ckpt_path)
        return face_index

    # ------------------------------------------------------------------ the model
    def use_model(self, ckpt_path: str | Path) -> ImageEmbedder:
        """Load (and check) the embedding model for image queries and additions."""
        ckpt_path = Path(ckpt_path)
        if not ckpt_path.is_file():
            raise FaceIndexError(f"{ckpt_path}: model checkpoint not found (index {self.directory})")
        expected = self.metadata["model"].get("sha256")
        expected_fingerprint = self.metadata["model"].get("fingerprint")
        checksum = file_sha256(ckpt_path)
        # the same file, or (an index of embedding shards records no file) the same weights
        if expected and checksum != expected:
            raise FaceIndexError(
                f"{ckpt_path}: this index ({self.directory}) was built by another model "
                f"(sha256 {expected[:12]}…, this file {checksum[:12]}…); rebuild the index or pass its model"
            )
        embedder = ImageEmbedder.load(ckpt_path)
        if not expected and expected_fingerprint and embedder.fingerprint != expected_fingerprint:
            raise FaceIndexError(
                f"{ckpt_path}: this index ({self.directory}) holds embeddings of another model (fingerprint "
                f"{expected_fingerprint[:12]}…, this model {embedder.fingerprint[:12]}…); pass the model that "
                "made its embedding shards"
            )
        if embedder.embedding_size != self.dim:
            raise FaceIndexError(
                f"{ckpt_path}: model gives {embedder.embedding_size}-d embeddings, index {self.directory} holds {self.dim}-d"
            )
        self._embedder = embedder
        return embedder

    @property
    def embedder(self) -> ImageEmbedder:
        if self._embedder is None:
            path = self.metadata["model"].get("path")
            if not path:
                raise FaceIndexError(
                    f"{self.directory}: this index was built from embedding shards of a model without a "
                    "checkpoint file; pass the model (--ckpt_path) to embed images"
                )
            self.use_model(path)
        assert self._embedder is not None
        return self._embedder

    # ------------------------------------------------------------------ changes
    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise FaceIndexError(
                f"{self.directory}: {what} of shape {tuple(vectors.shape)}, index expects (N, {self.dim}) "
                "embeddings (made by another model?)"
            )
        return normalize_rows(vectors)

    def ids_of_paths(self, paths: Sequence[str | Path]) -> dict[str, int]:
        by_path = {entry["path"]: int(i) for i, entry in self.entries.items()}
        return {str(p): by_path[str(p)] for p in (str(Path(p).resolve()) for p in paths) if str(p) in by_path}

    def add(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | Path],
        identities: Sequence[str],
        replace: bool = False,
    ) -> list[int]:
        """Add faces with new stable ids (never reused). A path already in the index is refused, or with
        ``replace`` its vector is replaced and its id kept. Call ``save()`` to persist."""
        vectors = self._check_vectors(embeddings, "embeddings")
        if not (len(vectors) == len(paths) == len(identities)):
            raise FaceIndexError(
                f"{len(vectors)} embeddings, {len(paths)} paths and {len(identities)} identities"
            )
        resolved = [str(Path(p).resolve()) for p in paths]
        if len(set(resolved)) != len(resolved):
            duplicate = next(p for p in resolved if resolved.count(p) > 1)
            raise FaceIndexError(f"{duplicate}: listed twice in one addition")
        existing = self.ids_of_paths(resolved)
        if existing and not replace:
            first = next(iter(existing))
            raise FaceIndexError(
                f"{first}: already in the index {self.directory} (id {existing[first]}); "
                f"{len(existing)} such image(s); use replace (--replace) to update them"
            )
        if existing:
            self._remove_ids(list(existing.values()), "replace")
        ids = []
        next_id = int(self.metadata["next_id"])
        for path in resolved:
            if path in existing:
                ids.append(existing[path])
            else:
                ids.append(next_id)
                next_id += 1
        self.index.add_with_ids(vectors, np.array(ids, dtype=np.int64))
        self.metadata["next_id"] = next_id
        for face_id, path, identity in zip(ids, resolved, identities):
            self.entries[str(face_id)] = {"path": path, "identity": str(identity)}
        return ids

    def check_shards(self, shards: ShardSet) -> None:
        """Embedding shards must come from the model this index was built with (its fingerprint) and have
        its embedding size; the error names the first shard."""
        shard = shards.shards[0].header_path
        if shards.dim != self.dim:
            raise FaceIndexError(
                f"{shard}: {shards.dim}-d embeddings, the index {self.directory} holds {self.dim}-d"
            )
        expected = self.metadata["model"].get("fingerprint")
        if not expected:
            raise FaceIndexError(
                f"{self.directory}: the index records no model fingerprint (built before embedding shards "
                "existed), so shards cannot be checked against its model; rebuild the index"
            )
        found = shards.model["fingerprint"]
        if found != expected:
            raise FaceIndexError(
                f"{shard}: embeddings of another model than the index {self.directory} was built with "
                f"(fingerprint {found[:12]}…, the index's {expected[:12]}…)"
            )

    def add_shards(self, shards: ShardSet, replace: bool = False) -> list[int]:
        """``add`` for embedding shards, streamed in (never all in memory); the shards' paths are kept as
        written (absolute). On an error (a shard changed since its header) the faces added so far are
        taken out again. Call ``save()`` to persist."""
        self.check_shards(shards)
        by_path = {entry["path"]: int(face_id) for face_id, entry in self.entries.items()}
        paths = shards.paths
        existing = [(row, by_path[path]) for row, path in enumerate(paths) if path in by_path]
        if existing and not replace:
            row, face_id = existing[0]
            shard = shards.shards[int(np.searchsorted(shards.starts, row, side="right")) - 1]
            raise FaceIndexError(
                f"{paths[row]}: in {shard.header_path} and already in the index {self.directory} (id {face_id}); "
                f"{len(existing)} such image(s); use replace (--replace) to update them"
            )
        if existing:
            self._remove_ids([face_id for _, face_id in existing], "replace")
        kept = dict(existing)
        next_id = int(self.metadata["next_id"])
        ids = np.empty(len(paths), dtype=np.int64)
        for row in range(len(paths)):
            if row in kept:
                ids[row] = kept[row]
            else:
                ids[row] = next_id
                next_id += 1
        done = 0
        try:
            for chunk in shards.iter_rows():
                self.index.add_with_ids(normalize_rows(chunk), ids[done : done + len(chunk)])
                done += len(chunk)
        except BaseException:
            if done:
                self.index.remove_ids(ids[:done])
            raise
        self.metadata["next_id"] = next_id
        for face_id, path, identity in zip(ids.tolist(), paths, shards.identities):
            self.entries[str(face_id)] = {"path": path, "identity": identity}
        return ids.tolist()

    def _remove_ids(self, ids: Sequence[int], action: str) -> int:
        if self.kind == "hnsw":
            raise FaceIndexError(
                f"{self.directory}: an HNSW index cannot {action} faces (faiss graphs do not support removal); "
                "rebuild it with --index flat or ivf"
            )
        removed = int(self.index.remove_ids(np.array(ids, dtype=np.int64)))
        for face_id in ids:
            self.entries.pop(str(face_id), None)
        return removed

    def remove(
        self, ids: Sequence[int] = (), paths: Sequence[str | Path] = (), identity: str | None = None
    ) -> int:
        """Remove faces by id, by image path or all of one identity; returns how many. Unknown ids/paths
        are an error. Call ``save()`` to persist."""
        wanted = [int(i) for i in ids]
        missing = [i for i in wanted if str(i) not in self.entries]
        if missing:
            raise FaceIndexError(f"{self.directory}: no faces with ids {missing}")
        found = self.ids_of_paths(paths)
        not_found = [str(Path(p).resolve()) for p in paths if str(Path(p).resolve()) not in found]
        if not_found:
            raise FaceIndexError(f"{not_found[0]}: not in the index {self.directory}")
        wanted += list(found.values())
        if identity is not None:
            of_identity = [int(i) for i, e in self.entries.items() if e["identity"] == identity]
            if not of_identity:
                raise FaceIndexError(f"{self.directory}: no faces of identity {identity!r}")
            wanted += of_identity
        if not wanted:
            raise FaceIndexError("nothing to remove: give ids, paths or an identity")
        return self._remove_ids(sorted(set(wanted)), "remove")

    # ------------------------------------------------------------------ saving (atomic)
    def _faiss_parts(self) -> dict[str, tuple[str, faiss.Index]]:
        """meta.json key → (file name prefix, faiss index) of each file this index is saved as."""
        if isinstance(self.index, RerankedIVFIndex):
            return {
                "index_file": ("index", self.index.codes),
                "vectors_file": ("vectors", self.index.vectors),
            }
        return {"index_file": ("index", self.index)}

    def save(self) -> None:
        """Write the faiss file(s) under new names, then atomically replace ``meta.json`` (the pointer to
        them), then delete the previous files. Failure at any step leaves the previous index intact."""
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        parts = self._faiss_parts()
        old_files = [self.metadata.get(key) for key in ("index_file", "vectors_file")]
        token = uuid.uuid4().hex[:12]
        new_files = {key: f"{prefix}-{token}.faiss" for key, (prefix, _) in parts.items()}
        metadata = {**self.metadata, "index_file": None, "vectors_file": None, **new_files}
        metadata["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        written: list[Path] = []
        try:
            for key, (_, part) in parts.items():
                target = directory / new_files[key]
                with atomic_path(target) as temp:  # a temp name, renamed only once complete
                    faiss.write_index(part, str(temp))
                    _fsync(temp)
                written.append(target)
            with atomic_path(directory / METADATA_FILE) as temp, open(temp, "w", encoding="utf-8") as stream:
                json.dump(metadata, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
        except BaseException as error:
            for leftover in written:
                leftover.unlink(missing_ok=True)
            if isinstance(error, Exception):
                raise FaceIndexError(
                    f"{directory}: could not write the index ({type(error).__name__}: {error}); "
                    "the previous index on disk is unchanged"
                ) from error
            raise
        self.metadata = metadata
        for old_file in old_files:
            if old_file and old_file not in new_files.values():
                (directory / old_file).unlink(missing_ok=True)
        for orphan in self.orphaned_files():
            log.info("removed %s, left by an interrupted save of this index", orphan)
            orphan.unlink(missing_ok=True)

    def orphaned_files(self) -> list[Path]:
        """Files of this index's naming scheme that its ``meta.json`` does not name: the new files of a save
        killed before it replaced ``meta.json``, the old files of one killed after, hidden temporaries.
        Only a save removes them: a reader must not delete what a concurrent save is writing."""
        named = {self.metadata.get(key) for key in ("index_file", "vectors_file")}
        candidates = [
            *self.directory.glob("index-*.faiss"),
            *self.directory.glob("vectors-*.faiss"),
            *self.directory.glob(temporary_pattern("index-*.faiss")),
            *self.directory.glob(temporary_pattern("vectors-*.faiss")),
            *self.directory.glob(temporary_pattern(METADATA_FILE)),
        ]
        return sorted(path for path in candidates if path.name not in named and path.is_file())

    # ------------------------------------------------------------------ search
    def embed_query(self, query: str | Path | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(query, str | Path):
            return self.embedder.embed_paths([Path(query)], progress=False)
        if isinstance(query, torch.Tensor):
            query = query.detach().cpu().numpy()
        return self._check_vectors(query, "query")

    def search(self, query: str | Path | np.ndarray | torch.Tensor, k: int = 5) -> list[SearchHit]:
        """The ``k`` most similar gallery faces to one probe (an image path or an embedding)."""
        vectors = self.embed_query(query)
        if len(vectors) != 1:
            raise FaceIndexError(f"search takes one probe, got {len(vectors)}; use search_batch")
        return self.search_batch(vectors, k)[0]

    def search_batch(self, embeddings: np.ndarray, k: int = 5) -> list[list[SearchHit]]:
        """Top-``k`` hits for each row of ``embeddings`` (normalised here)."""
        if k < 1:
            raise FaceIndexError(f"k must be >= 1, got {k}")
        vectors = self._check_vectors(embeddings, "queries")
        if len(self) == 0:
            return [[] for _ in vectors]
        scores, ids = self.index.search(vectors, min(k, len(self)))
        threshold = self.threshold
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, face_id in zip(row_scores, row_ids):
                if face_id < 0:
                    continue
                entry = self.entries[str(int(face_id))]
                hits.append(
                    SearchHit(
                        int(face_id), entry["path"], entry["identity"], float(score), float(score) > threshold
                    )
                )
            results.append(hits)
        return results

    def identify(self, hits: Sequence[SearchHit]) -> str:
        """The best hit's identity if it clears the threshold, else ``"unknown"``."""
        return hits[0].identity if hits and hits[0].above_threshold else "unknown"

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "exact"
        return (
            f"{self.directory}: {len(self)} faces, {self.kind} ({params}), {self.dim}-d inner product, "
            f"threshold {self.threshold:.3f} ({self.metadata.get('threshold_source', '?')})"
        )


def _refuse_existing(directory: Path, overwrite: bool) -> None:
    existing = directory / METADATA_FILE
    if existing.exists() and not overwrite:
        raise FaceIndexError(
            f"{directory}: already holds a face index ({existing}); choose another folder or pass "
            "--overwrite to replace it"
        )


def _new_metadata(
    num_vectors: int,
    dim: int,
    model_info: dict[str, Any],
    kind: str | None,
    params: dict[str, int] | None,
    threshold: float | None,
    threshold_source: str,
) -> dict[str, Any]:
    """``meta.json`` of a new, empty index: the chosen type and parameters for ``num_vectors`` faces."""
    chosen = kind or default_index_kind(num_vectors)
    if chosen not in INDEX_KINDS:
        raise FaceIndexError(f"unknown index type {chosen!r}; choose one of {INDEX_KINDS}")
    merged = {**default_index_params(chosen, num_vectors, dim), **(params or {})}  # type: ignore[arg-type]
    if "nprobe" in merged:
        merged["nprobe"] = max(1, min(int(merged["nprobe"]), int(merged["nlist"])))
    if threshold is None or not math.isfinite(threshold):
        threshold, threshold_source = FALLBACK_THRESHOLD, "fallback (no validated threshold available)"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "format_version": FORMAT_VERSION,
        "index_type": chosen,
        "index_params": merged,
        "index_choice": "requested" if kind else f"default for {num_vectors} faces",
        "metric": "inner_product",
        "embedding_size": dim,
        "model": model_info,
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "created": now,
        "updated": now,
        "next_id": 0,
        "entries": {},
        "index_file": None,
        "vectors_file": None,
    }


def _faiss_part(index: faiss.Index | RerankedIVFIndex) -> faiss.Index:
    """The faiss index that holds the training (for a re-ranked index, its codes)."""
    return index.codes if isinstance(index, RerankedIVFIndex) else index


def _read_faiss_file(directory: Path, metadata: dict[str, Any], key: str) -> faiss.Index:
    """The faiss file that ``meta.json``'s ``key`` names, checked against its dimension and face count."""
    meta_path = directory / METADATA_FILE
    if not metadata.get(key):
        raise FaceIndexError(f"{meta_path}: index metadata lacks the {key!r} entry")
    path = directory / str(metadata[key])
    if not path.is_file():
        raise FaceIndexError(f"{path}: faiss index file missing (named in {meta_path})")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise FaceIndexError(
            f"{path}: cannot read the faiss index (truncated or corrupt file?): {str(error).splitlines()[0]}"
        ) from error
    if index.d != int(metadata["embedding_size"]):
        raise FaceIndexError(
            f"{path}: index dimension {index.d} differs from the embedding size "
            f"{metadata['embedding_size']} in {meta_path}"
        )
    if index.ntotal != len(metadata["entries"]):
        raise FaceIndexError(
            f"{path}: holds {index.ntotal} vectors but {meta_path} lists {len(metadata['entries'])} faces"
        )
    return index


def _fsync(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())
