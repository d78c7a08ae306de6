"""Face-search index speed and recall against exact search, in the same run and threads.

Data: ``--n`` unit vectors of 128 dimensions clustered as identities (``--per-identity`` faces each around
a random identity centre, ``--spread`` setting how loose a person's cluster is), and ``--queries`` new
photos of random gallery identities, searched as one batch. For exact search (IndexFlatIP) and each index
type built by ``mobilenets.tasks.faces.index`` with its default parameters for this gallery size, the table
prints build time (train + add), memory per vector (serialised index size / n), recall@1 against exact
search (same top-1 face), queries/s and the ratio to exact's queries/s. Exact search and the index are timed
alternately (exact, index, exact, index, ... for ``--rounds``) and each row compares the two medians, since a
shared machine's speed drifts over minutes. IVF kinds get extra rows at other nprobe values, and
``ivf-rerank`` at other k_factor values (``--no-sweep`` skips them).

Target (1 M vectors, 2 threads): the default index for that size reaches recall@1 ≥ 0.95 at ≥ 30× the
queries/s of exact search.

    .venv/bin/python benchmarks/face_index.py              # 1 M vectors (a few minutes)
    .venv/bin/python benchmarks/face_index.py --n 100000   # quick run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import faiss
import numpy as np

from mobilenets.tasks.faces.index import (
    INDEX_KINDS,
    RERANK_KIND,
    RerankedIVFIndex,
    apply_search_params,
    default_index_kind,
    default_index_params,
    make_faiss_index,
    normalize_rows,
    train_index,
)

TARGET_RECALL = 0.95
TARGET_SPEEDUP = 30.0


def clustered_vectors(
    centres: np.ndarray, identities: np.ndarray, spread: float, rng: np.random.Generator, chunk: int = 200_000
) -> np.ndarray:
    """Unit vectors around their identity's centre (cosine ≈ 1/sqrt(1 + spread²)), made in chunks."""
    dim = centres.shape[1]
    out = np.empty((len(identities), dim), dtype=np.float32)
    for start in range(0, len(identities), chunk):
        ids = identities[start : start + chunk]
        noise = rng.standard_normal((len(ids), dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start : start + len(ids)] = normalize_rows(centres[ids] + noise)
    return out


def alternate_timed_search(
    exact: faiss.Index, index: faiss.Index | RerankedIVFIndex, queries: np.ndarray, rounds: int
) -> tuple[float, float, np.ndarray]:
    """queries/s of ``index`` and of ``exact`` (medians, timed in turns), and the index's top-1 ids."""
    exact_times, index_times, ids = [], [], None
    for _ in range(rounds):
        started = time.perf_counter()
        exact.search(queries, 1)
        exact_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        _, ids = index.search(queries, 1)
        index_times.append(time.perf_counter() - started)
    return len(queries) / statistics.median(index_times), len(queries) / statistics.median(exact_times), ids


def index_bytes(index: faiss.Index | RerankedIVFIndex) -> int:
    parts = [index.codes, index.vectors] if isinstance(index, RerankedIVFIndex) else [index]
    return sum(int(faiss.serialize_index(part).nbytes) for part in parts)


def sweep(kind: str, params: dict[str, int]) -> list[dict[str, int]]:
    """Other query-time settings of the same built index: nprobe around the default, and k_factor."""
    if "nprobe" not in params:
        return []
    nprobe = params["nprobe"]
    settings = [
        {**params, "nprobe": value}
        for value in (nprobe // 2, nprobe * 3 // 4, nprobe * 2)
        if 1 <= value <= params["nlist"] and value != nprobe
    ]
    if kind == RERANK_KIND:
        settings += [
            {**params, "k_factor": value} for value in (params["k_factor"] // 2, params["k_factor"] * 2)
        ]
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-identity", type=int, default=10, help="faces per identity (cluster size)")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.5,
        help="noise around the identity centre: 0.5 puts one person's faces at cosine ≈ 0.89 to their "
        "centre and ≈ 0.8 to each other (different people ≈ 0); 0.75 (≈ 0.64 to each other) is harder for IVF",
    )
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(INDEX_KINDS), help="index types to build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-sweep",
        "--no-nprobe-sweep",
        dest="sweep",
        action="store_false",
        help="skip the extra nprobe / k_factor rows",
    )
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    num_identities = max(1, args.n // args.per_identity)
    centres = normalize_rows(rng.standard_normal((num_identities, args.dim), dtype=np.float32))
    started = time.perf_counter()
    gallery = clustered_vectors(centres, np.arange(args.n) % num_identities, args.spread, rng)
    query_people = rng.integers(0, num_identities, args.queries)
    queries = clustered_vectors(centres, query_people, args.spread, rng)
    print(
        f"{args.n:,} gallery vectors ({num_identities:,} identities), {args.queries} queries, {args.dim}-d, "
        f"{args.threads} threads; data made in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    started = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(gallery)
    exact_build = time.perf_counter() - started
    _, truth = exact.search(queries, 1)
    exact_person = float(np.mean(truth[:, 0] % num_identities == query_people))
    exact_speeds: list[float] = []

    def measure(index: faiss.Index | RerankedIVFIndex) -> tuple[float, float, float, float]:
        """queries/s, its ratio to exact's, recall@1 against exact search, and the fraction whose top-1 face
        is the query's person"""
        qps, exact_qps, found = alternate_timed_search(exact, index, queries, args.rounds)
        exact_speeds.append(exact_qps)
        top = found[:, 0]
        recall = float(np.mean(top == truth[:, 0]))
        return qps, qps / exact_qps, recall, float(np.mean(top % num_identities == query_people))

    rows = []
    default_kind = default_index_kind(args.n)
    for kind in [k for k in args.kinds.split(",") if k]:
        params = default_index_params(kind, args.n, args.dim)  # type: ignore[arg-type]
        started = time.perf_counter()
        index = make_faiss_index(kind, args.dim, params)  # type: ignore[arg-type]
        train_index(index, gallery, kind, params)
        index.add_with_ids(gallery, np.arange(args.n, dtype=np.int64))
        build = time.perf_counter() - started
        apply_search_params(index, kind, params)
        per_vector = index_bytes(index) / args.n
        qps, speedup, recall, person = measure(index)
        label = f"{kind} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'exact'})"
        if kind == default_kind:
            label += " [default]"
        rows.append((label, build, per_vector, recall, person, qps, speedup))
        print(
            f"{label}: built in {build:.1f} s, recall@1 {recall:.3f}, {qps:,.0f} queries/s ({speedup:.1f}x)",
            flush=True,
        )
        for setting in sweep(kind, params) if args.sweep else []:
            apply_search_params(index, kind, setting)
            qps, speedup, recall, person = measure(index)
            changed = ", ".join(f"{k}={v}" for k, v in setting.items() if v != params[k])
            rows.append((f"  same {kind}, {changed}", 0.0, per_vector, recall, person, qps, speedup))
            print(f"  {changed}: recall@1 {recall:.3f}, {qps:,.0f} queries/s ({speedup:.1f}x)", flush=True)
        del index

    exact_qps = statistics.median(exact_speeds) if exact_speeds else float("nan")
    rows.insert(
        0,
        ("exact (IndexFlatIP)", exact_build, index_bytes(exact) / args.n, 1.0, exact_person, exact_qps, 1.0),
    )
    print()
    header = (
        f"{'index':<66}{'build s':>9}{'bytes/vec':>11}{'recall@1':>10}{'person@1':>10}"
        f"{'queries/s':>12}{'vs exact':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, build, per_vector, recall, person, qps, speedup in rows:
        built = f"{build:>9.1f}" if build > 0 else f"{'':>9}"
        print(
            f"{label:<66}{built}{per_vector:>11.0f}{recall:>10.3f}{person:>10.3f}{qps:>12,.0f}{speedup:>9.1f}x"
        )
    print(
        "exact: median of its timings, each taken in turn with an index's; vs exact: the index's median over "
        "the exact median of the same rounds"
    )
    print("recall@1: same top-1 face as exact search; person@1: top-1 face shows the query's identity")
    default_rows = [r for r in rows if r[0].endswith("[default]")]
    if default_kind == "flat":
        print(f"\n(the default for {args.n:,} vectors is exact search; the target applies to 1 M vectors)")
        return 0
    if not default_rows:
        print(f"\n(default index for {args.n:,} vectors is {default_kind}; not built in this run)")
        return 0
    _, _, _, recall, _, _, speedup = default_rows[0]
    met = recall >= TARGET_RECALL and speedup >= TARGET_SPEEDUP
    print(
        f"\ntarget: default index ({default_kind}) recall@1 >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x exact "
        f"queries/s -> recall {recall:.3f}, {speedup:.1f}x: {'MET' if met else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
