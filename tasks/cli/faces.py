"""``mobilenets faces``: build, extend and search face-embedding indexes.

mobilenets faces index build --gallery DIR --ckpt_path MODEL.ckpt --out INDEX_DIR [--index flat|ivf|ivf-rerank|hnsw|ivfpq]
mobilenets faces index build --embeddings SHARDS_DIR --out INDEX_DIR [--like TRAINED_INDEX_DIR]
mobilenets faces index add --index INDEX_DIR --gallery DIR [--replace]
mobilenets faces index add --index INDEX_DIR --embeddings SHARDS_DIR [--replace]
mobilenets faces index merge INDEX_A INDEX_B --out INDEX_DIR
mobilenets faces index remove --index INDEX_DIR --path IMG | --id N | --identity NAME
mobilenets faces index info --index INDEX_DIR
mobilenets faces search --index INDEX_DIR --image probe.jpg -k 5
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mobilenets.datasets.faces import FaceDataError, FaceSample, load_face_samples, parse_pairs
from mobilenets.tasks.faces.index import (
    INDEX_KINDS,
    METADATA_FILE,
    FaceIndex,
    FaceIndexError,
    ImageEmbedder,
    SearchHit,
    default_index_kind,
)
from mobilenets.tasks.faces.shards import ShardSet
from mobilenets.tasks.faces.verification import best_accuracy_threshold


def _gallery_samples(args: argparse.Namespace) -> list[FaceSample]:
    if getattr(args, "image", None):
        if not args.identity:
            raise FaceDataError("--image needs --identity (whose face it is)")
        return [FaceSample(Path(p), args.identity) for p in args.image]
    if not args.gallery and not args.csv:
        raise FaceDataError("give --gallery DIR (identity folders) or --csv FILE (path,identity)")
    return load_face_samples(args.gallery, args.csv)


def calibrate_threshold(embedder: ImageEmbedder, pairs_file: Path, pairs_dir: Path, batch_size: int) -> float:
    """The cosine threshold of best accuracy on LFW-style pairs."""
    pairs = parse_pairs(pairs_file, pairs_dir)
    paths = sorted({p for pair in pairs for p in (pair.path_a, pair.path_b)})
    position = {p: i for i, p in enumerate(paths)}
    embeddings = embedder.embed_paths(paths, batch_size)
    a = embeddings[[position[p.path_a] for p in pairs]]
    b = embeddings[[position[p.path_b] for p in pairs]]
    return best_accuracy_threshold((a * b).sum(1), np.array([p.same for p in pairs]))


def _index_params(args: argparse.Namespace) -> dict[str, int]:
    return {
        key: value
        for key, value in (
            ("nlist", args.nlist),
            ("nprobe", args.nprobe),
            ("k_factor", args.k_factor),
            ("M", args.hnsw_m),
            ("efSearch", args.ef_search),
        )
        if value is not None
    }


def build(args: argparse.Namespace) -> int:
    if (args.out / METADATA_FILE).exists() and not args.overwrite:  # before minutes of embedding
        raise FaceIndexError(
            f"{args.out}: already holds a face index ({args.out / METADATA_FILE}); choose another --out or "
            "pass --overwrite to replace it"
        )
    if args.embeddings:
        return build_from_shards(args)
    if args.like:
        raise FaceIndexError("--like builds from embedding shards: give --embeddings FOLDER")
    if not args.ckpt_path:
        raise FaceIndexError("index build needs --ckpt_path MODEL.ckpt (or --embeddings FOLDER of shards)")
    samples = _gallery_samples(args)
    embedder = ImageEmbedder.load(args.ckpt_path)
    params = _index_params(args)
    kind = args.index or default_index_kind(len(samples))
    how = "requested" if args.index else f"default for a gallery of {len(samples)} faces"
    print(f"index type: {kind} ({how})")
    if args.threshold is not None:
        threshold, source = args.threshold, "user (--threshold)"
    elif args.pairs:
        threshold = calibrate_threshold(
            embedder, args.pairs, args.pairs_dir or args.pairs.parent, args.batch_size
        )
        source = f"best accuracy on {args.pairs}"
    else:
        threshold, source = embedder.threshold, "validation pairs of the model's training (checkpoint)"
    embeddings = embedder.embed_paths([s.path for s in samples], args.batch_size)
    index = FaceIndex.create(
        args.out,
        embeddings,
        [s.path for s in samples],
        [s.identity for s in samples],
        embedder.model_info(),
        kind=kind,
        params=params,
        threshold=threshold,
        threshold_source=source,
        overwrite=args.overwrite,
    )
    print(f"built {index.describe()}")
    return 0


def build_from_shards(args: argparse.Namespace) -> int:
    """``index build --embeddings``: the shards' embeddings, without the model."""
    if args.gallery or args.csv or args.pairs or args.ckpt_path:
        raise FaceIndexError(
            "--embeddings builds from embedding shards, which record their model: --gallery, --csv, --pairs "
            "and --ckpt_path build with the model instead"
        )
    if args.like and (args.index or _index_params(args)):
        raise FaceIndexError(
            f"--like {args.like} takes that index's type and parameters: drop --index, --nlist, ..."
        )
    shards = ShardSet.open(args.embeddings)
    print(f"embeddings: {shards.describe()}")
    like = FaceIndex.open(args.like) if args.like else None
    if like is not None:
        print(f"index type: {like.kind} {like.params}, trained like {args.like}")
    else:
        kind = args.index or default_index_kind(shards.count)
        how = "requested" if args.index else f"default for {shards.count} faces"
        print(f"index type: {kind} ({how})")
    index = FaceIndex.create_from_shards(
        args.out,
        shards,
        kind=args.index,
        params=_index_params(args),
        threshold=args.threshold,
        threshold_source="user (--threshold)",
        overwrite=args.overwrite,
        like=like,
    )
    print(f"built {index.describe()}")
    return 0


def add(args: argparse.Namespace) -> int:
    if args.embeddings:
        if args.gallery or args.csv or args.image:
            raise FaceIndexError(
                "give either --embeddings FOLDER or images (--gallery, --csv, --image), not both"
            )
        index = FaceIndex.open(args.index)
        ids = index.add_shards(ShardSet.open(args.embeddings), replace=args.replace)
        index.save()
        print(f"added {len(ids)} faces from {args.embeddings}; {index.describe()}")
        return 0
    index = FaceIndex.open(args.index, args.ckpt_path)
    samples = _gallery_samples(args)
    existing = index.ids_of_paths([s.path for s in samples])
    if existing and not args.replace:
        first = next(iter(existing))
        raise FaceIndexError(
            f"{first}: already in the index {args.index} (id {existing[first]}); "
            f"{len(existing)} such image(s); pass --replace to update them"
        )
    embeddings = index.embedder.embed_paths([s.path for s in samples], args.batch_size)
    ids = index.add(
        embeddings, [s.path for s in samples], [s.identity for s in samples], replace=args.replace
    )
    index.save()
    print(f"added {len(ids)} faces (ids {min(ids)}..{max(ids)}); {index.describe()}")
    return 0


def remove(args: argparse.Namespace) -> int:
    index = FaceIndex.open(args.index)
    removed = index.remove(ids=args.id or (), paths=args.path or (), identity=args.identity)
    index.save()
    print(f"removed {removed} faces; {index.describe()}")
    return 0


def merge(args: argparse.Namespace) -> int:
    merged = FaceIndex.merge(
        FaceIndex.open(args.first), FaceIndex.open(args.second), args.out, args.overwrite
    )
    print(f"merged {args.first} and {args.second} into {merged.describe()}")
    return 0


def info(args: argparse.Namespace) -> int:
    index = FaceIndex.open(args.index)
    print(index.describe())
    print(json.dumps({k: v for k, v in index.metadata.items() if k != "entries"}, indent=1))
    return 0


def format_hits(hits: list[SearchHit], threshold: float, answer: str) -> str:
    lines = [f"{'rank':<5}{'id':>7}  {'identity':<24}{'cosine':>8}  path"]
    for rank, hit in enumerate(hits, start=1):
        mark = "" if hit.above_threshold else "  (below threshold)"
        lines.append(f"{rank:<5}{hit.id:>7}  {hit.identity:<24}{hit.cosine:>8.4f}  {hit.path}{mark}")
    best = hits[0].cosine if hits else float("nan")
    relation = ">" if answer != "unknown" else "<="
    lines.append(f"answer: {answer} (best cosine {best:.4f} {relation} threshold {threshold:.4f})")
    return "\n".join(lines)


def search(args: argparse.Namespace) -> int:
    index = FaceIndex.open(args.index, args.ckpt_path)
    if args.threshold is not None:
        index.metadata["threshold"] = float(args.threshold)  # this query only; not saved
    hits = index.search(args.image, args.k)
    answer = index.identify(hits)
    if args.json:
        print(
            json.dumps(
                {
                    "probe": str(args.image),
                    "answer": answer,
                    "threshold": index.threshold,
                    "hits": [h.as_dict() for h in hits],
                }
            )
        )
    else:
        print(index.describe())
        print(f"probe: {args.image}")
        print(format_hits(hits, index.threshold, answer))
    return 0


def cosine(text: str) -> float:
    """A threshold on cosine similarity: a finite number (NaN would make every comparison false)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite cosine similarity, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilenets faces", description="face-embedding search indexes (faiss)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    index_parser = commands.add_parser("index", help="build, extend or shrink an index")
    index_commands = index_parser.add_subparsers(dest="action", required=True)

    def gallery_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gallery", type=Path, help="identity folders: GALLERY/<identity>/<image>")
        p.add_argument("--csv", type=Path, help="a path,identity CSV instead of folders")
        p.add_argument("--batch-size", type=int, default=64)

    b = index_commands.add_parser("build", help="embed a gallery (or read embedding shards) into a new index")
    gallery_options(b)
    b.add_argument(
        "--ckpt_path",
        "--ckpt-path",
        dest="ckpt_path",
        type=Path,
        help="FaceEmbedder checkpoint (required with --gallery / --csv)",
    )
    b.add_argument(
        "--embeddings",
        type=Path,
        help="a folder of embedding shards (written by `mobilenets predict` on a faces config): build from "
        "them without the model",
    )
    b.add_argument(
        "--like",
        type=Path,
        help="with --embeddings: reuse this index's type, parameters, threshold and training (IVF centroids, "
        "PQ codebooks), so that the two can be joined by `index merge`",
    )
    b.add_argument("--out", type=Path, required=True, help="index directory to write")
    b.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    b.add_argument("--index", choices=INDEX_KINDS, help="index type (default: chosen from the gallery size)")
    b.add_argument("--nlist", type=int, help="IVF lists (default ≈ 4·sqrt(n))")
    b.add_argument("--nprobe", type=int, help="IVF lists searched per query")
    b.add_argument("--k-factor", type=int, help="ivf-rerank: candidates re-ranked exactly per result (16)")
    b.add_argument("--hnsw-m", type=int, help="HNSW neighbours per node")
    b.add_argument("--ef-search", type=int, help="HNSW search breadth")
    b.add_argument("--threshold", type=cosine, help="cosine below which a probe is 'unknown'")
    b.add_argument("--pairs", type=Path, help="LFW pairs.txt to choose the threshold on")
    b.add_argument("--pairs-dir", type=Path, help="image folder of --pairs (default: its folder)")
    b.set_defaults(run=build)

    a = index_commands.add_parser("add", help="embed more faces into an index (stable ids)")
    a.add_argument("--index", type=Path, required=True)
    gallery_options(a)
    a.add_argument("--image", type=Path, nargs="+", help="image file(s) of one identity")
    a.add_argument("--identity", help="identity of --image")
    a.add_argument("--embeddings", type=Path, help="a folder of embedding shards of the index's model")
    a.add_argument("--replace", action="store_true", help="replace faces whose image path is already indexed")
    a.add_argument(
        "--ckpt_path", "--ckpt-path", dest="ckpt_path", type=Path, help="model (default: the index's)"
    )
    a.set_defaults(run=add)

    r = index_commands.add_parser("remove", help="remove faces (not supported by HNSW)")
    r.add_argument("--index", type=Path, required=True)
    r.add_argument("--id", type=int, nargs="+")
    r.add_argument("--path", type=Path, nargs="+")
    r.add_argument("--identity")
    r.set_defaults(run=remove)

    m = index_commands.add_parser(
        "merge", help="join two indexes of disjoint images built alike (build --like) into a new one"
    )
    m.add_argument("first", type=Path, help="an index; its face ids stay")
    m.add_argument("second", type=Path, help="an index trained like the first; its ids move past the first's")
    m.add_argument("--out", type=Path, required=True, help="index directory to write")
    m.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    m.set_defaults(run=merge)

    i = index_commands.add_parser("info", help="print an index's metadata")
    i.add_argument("--index", type=Path, required=True)
    i.set_defaults(run=info)

    s = commands.add_parser("search", help="the k most similar gallery faces to a probe photo")
    s.add_argument("--index", type=Path, required=True)
    s.add_argument("--image", type=Path, required=True, help="probe photo (an aligned face crop)")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--threshold", type=cosine, help="override the index's 'unknown' threshold")
    s.add_argument(
        "--ckpt_path", "--ckpt-path", dest="ckpt_path", type=Path, help="model (default: the index's)"
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(run=search)
    return parser


def main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    return int(args.run(args))
