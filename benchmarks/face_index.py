"""Face-search index build cost, memory, speed and recall against exact search, up to 10 M faces on one machine.

Data: ``--size`` unit vectors of ``--dim`` dimensions clustered as identities (``--per-identity`` faces each
around a random identity centre, ``--spread`` setting how loose a person's cluster is), written in chunks as
embedding shards (``mobilenets.tasks.faces.shards``, 1 M faces a shard) under ``--work-dir`` (kept, and
reused by a later run with the same data options), and ``--queries`` new photos of random gallery identities,
searched as one batch.

Each index type is built as ``mobilenets faces index build --embeddings`` builds it (``train_from_shards``:
the training sample read from the shards, then the shards streamed in) in a child process of its own, whose
peak resident memory (``VmHWM``) is its cost in memory; the build holds the training sample and the index,
never the whole gallery, and ends with the benchmark if that is killed. The table, headed by the
machine (CPU model, SIMD extensions, cores, memory, faiss build, threads), prints build time (train + add) and
the build's CPU seconds, peak memory, index bytes per face
(serialised size / n), recall@1 against exact search (same top-1 face), person@1 (the top-1 face shows the
query's identity), queries/s and the ratio to exact's queries/s. Exact search (IndexFlatIP) runs over the
shards one at a time (only its search calls are timed: the cost of exact search with the gallery in
memory); exact and the index are timed alternately (``--rounds``) and each row compares the two medians,
since a shared machine's speed drifts over minutes. IVF kinds get extra rows at other nprobe values and
``ivf-rerank`` at other k_factor values (``--no-sweep`` skips them).

Target (1 M vectors, 2 threads): the default index for that size reaches recall@1 >= 0.95 at >= 30x the
queries/s of exact search.

    .venv/bin/python benchmarks/face_index.py                        # 200 k faces, every index type
    .venv/bin/python benchmarks/face_index.py --size 1M              # the target's size (minutes)
    nice -n 10 .venv/bin/python benchmarks/face_index.py --size 10M --kinds ivf-rerank,ivfpq --no-sweep
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mobilenets.tasks.deploy.export import cpu_flags
from mobilenets.tasks.deploy.speed import cpu_model
from mobilenets.tasks.faces.index import (
    INDEX_KINDS,
    RERANK_KIND,
    RerankedIVFIndex,
    apply_search_params,
    default_index_kind,
    default_index_params,
    make_faiss_index,
    normalize_rows,
    train_from_shards,
)
from mobilenets.tasks.faces.shards import ShardSet, shard_stem, write_shard

TARGET_RECALL = 0.95
TARGET_SPEEDUP = 30.0
SHARD_ROWS = 1_000_000
#: what the synthetic shards record as the model that made them
BENCH_MODEL = {"fingerprint": "benchmark-synthetic-clusters", "path": None}


def parse_size(text: str) -> int:
    """``200k``, ``1M``, ``10M`` or a plain number."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    number = float(text[:-1] if scale > 1 else text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(number * scale)


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


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU model, its SIMD extensions, cores, memory, faiss' build and threads."""
    flags = cpu_flags()
    simd = [
        f
        for f in ("sse4_2", "avx2", "fma", "avx512f", "avx512_vpopcntdq", "avx512_bf16", "amx_tile")
        if f in flags
    ]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu_model(),
        "isa": " ".join(simd) or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "faiss": f"{faiss.__version__} ({faiss.get_compile_options().strip()})",
        "threads": threads,
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; ISA {info['isa']}; "
        f"faiss {info['faiss']}; {info['threads']} threads"
    )


# --------------------------------------------------------------------------- data, as embedding shards
def make_data(args: argparse.Namespace) -> tuple[Path, np.ndarray, np.ndarray, int]:
    """The gallery's shard folder, the queries, their identities and the number of identities; made once
    per data options and reused."""
    options = {k: getattr(args, k) for k in ("size", "dim", "per_identity", "spread", "queries", "seed")}
    folder = args.work_dir / "n{size}-d{dim}-p{per_identity}-s{spread}-q{queries}-r{seed}".format(**options)
    num_identities = max(1, args.size // args.per_identity)
    done = folder / "data.json"
    if done.is_file() and json.loads(done.read_text()) == options:
        print(f"reusing the data in {folder}", flush=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        centres = normalize_rows(rng.standard_normal((num_identities, args.dim), dtype=np.float32))
        shards = (args.size + SHARD_ROWS - 1) // SHARD_ROWS
        for number in range(shards):
            rows = np.arange(number * SHARD_ROWS, min(args.size, (number + 1) * SHARD_ROWS))
            people = rows % num_identities
            write_shard(
                folder / "gallery",
                shard_stem("gallery", number, shards),
                clustered_vectors(centres, people, args.spread, rng),
                [f"/bench/{row}.jpg" for row in rows],
                [f"id{person}" for person in people],
                BENCH_MODEL,
            )
        query_people = rng.integers(0, num_identities, args.queries)
        np.save(folder / "queries.npy", clustered_vectors(centres, query_people, args.spread, rng))
        np.save(folder / "query_people.npy", query_people)
        done.write_text(json.dumps(options))
        print(f"made the data in {time.perf_counter() - started:.0f} s ({folder})", flush=True)
    queries = np.load(folder / "queries.npy")
    return folder, queries, np.load(folder / "query_people.npy"), num_identities


# --------------------------------------------------------------------------- one build, in a child process
def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def die_with_parent(parent: int) -> None:
    """Have Linux end this process when ``parent`` ends: a spawned child outlives a killed parent otherwise,
    and a 10 M build left running alone would hold the cores for nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed benchmark leaves its build to end by itself
        return
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def build_child(
    folder: str, kind: str, params: dict[str, int], threads: int, out: str, queue: Any, parent: int = 0
) -> None:
    """Build ``kind`` from the shards as ``index build --embeddings`` does, write it to ``out``, and report
    times and memory. The baseline is the resident memory after imports and opening the shards."""
    if parent:
        die_with_parent(parent)
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    shards = ShardSet.open(folder)
    opened = time.perf_counter() - started
    baseline = memory_status()["VmRSS"]
    started, cpu_started = time.perf_counter(), time.process_time()
    index = make_faiss_index(kind, shards.dim, params)  # type: ignore[arg-type]
    train_from_shards(index, shards, kind, params)
    trained, trained_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    done = 0
    for chunk in shards.iter_rows():
        index.add_with_ids(normalize_rows(chunk), np.arange(done, done + len(chunk), dtype=np.int64))
        done += len(chunk)
    built, built_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = memory_status()["VmHWM"]
    parts = [index.codes, index.vectors] if isinstance(index, RerankedIVFIndex) else [index]
    for number, part in enumerate(parts):
        faiss.write_index(part, f"{out}.{number}")
    queue.put(
        {
            "open_s": opened,
            "train_s": trained,
            "build_s": built,
            "train_cpu_s": trained_cpu,
            "build_cpu_s": built_cpu,
            "baseline_bytes": baseline,
            "peak_bytes": peak,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "parts": len(parts),
        }
    )


def build_in_child(
    folder: Path, kind: str, params: dict[str, int], threads: int, out: Path
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak is this build's alone
    queue = context.Queue()
    child = context.Process(
        target=build_child, args=(str(folder), kind, params, threads, str(out), queue, os.getpid())
    )
    child.start()
    while child.is_alive() and queue.empty():
        child.join(timeout=1.0)
    if queue.empty():
        raise RuntimeError(f"the {kind} build process died (exit code {child.exitcode}; out of memory?)")
    result = queue.get()
    child.join()
    return result


def load_built(out: Path, kind: str, params: dict[str, int], parts: int) -> faiss.Index | RerankedIVFIndex:
    loaded = [faiss.read_index(f"{out}.{number}") for number in range(parts)]
    index = RerankedIVFIndex(loaded[0], loaded[1], params["k_factor"]) if kind == RERANK_KIND else loaded[0]
    apply_search_params(index, kind, params)
    return index


def index_bytes(out: Path, parts: int) -> int:
    return sum(os.path.getsize(f"{out}.{number}") for number in range(parts))


# --------------------------------------------------------------------------- search
class ExactSearch:
    """Exact top-1 over the shards, one shard in memory at a time; ``search`` returns the ids and the time
    spent in faiss' search calls alone."""

    def __init__(self, folder: Path, dim: int) -> None:
        self.shards = ShardSet.open(folder)
        self.dim = dim

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, float]:
        best_score = np.full(len(queries), -np.inf, dtype=np.float32)
        best_id = np.full(len(queries), -1, dtype=np.int64)
        seconds = 0.0
        for number, shard in enumerate(self.shards.shards):
            exact = faiss.IndexFlatIP(self.dim)
            exact.add(normalize_rows(shard.read_rows(0, shard.count)))
            started = time.perf_counter()
            scores, ids = exact.search(queries, 1)
            seconds += time.perf_counter() - started
            better = scores[:, 0] > best_score
            best_score[better] = scores[better, 0]
            best_id[better] = ids[better, 0] + int(self.shards.starts[number])
            del exact
        return best_id, seconds


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
    parser.add_argument(
        "--size", "--n", type=parse_size, default=200_000, help="gallery faces: 200k, 1M, 10M"
    )
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
        "--work-dir",
        type=Path,
        default=Path("/tmp/face_index_bench"),
        help="where the shards and built indexes go (10 M faces: 5.1 GB of shards, as much again per index)",
    )
    parser.add_argument("--json", type=Path, help="also write the table's rows to this JSON file")
    parser.add_argument(
        "--no-sweep",
        "--no-nprobe-sweep",
        dest="sweep",
        action="store_false",
        help="skip the extra nprobe / k_factor rows",
    )
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    machine = machine_info(args.threads)
    print(machine_line(machine), flush=True)
    folder, queries, query_people, num_identities = make_data(args)
    print(
        f"{args.size:,} gallery vectors ({num_identities:,} identities), {args.queries} queries, {args.dim}-d, "
        f"{args.threads} threads",
        flush=True,
    )
    exact = ExactSearch(folder / "gallery", args.dim)
    truth, _ = exact.search(queries)
    exact_person = float(np.mean(truth % num_identities == query_people))
    exact_speeds: list[float] = []

    def measure(index: faiss.Index | RerankedIVFIndex) -> tuple[float, float, float, float]:
        """queries/s, its ratio to exact's (medians of alternate timings), recall@1 against exact search,
        and the fraction whose top-1 face is the query's person"""
        exact_times, index_times, top = [], [], None
        for _ in range(args.rounds):
            exact_times.append(exact.search(queries)[1])
            started = time.perf_counter()
            _, top = index.search(queries, 1)
            index_times.append(time.perf_counter() - started)
        qps = len(queries) / statistics.median(index_times)
        exact_qps = len(queries) / statistics.median(exact_times)
        exact_speeds.append(exact_qps)
        assert top is not None
        found = top[:, 0]
        return (
            qps,
            qps / exact_qps,
            float(np.mean(found == truth)),
            float(np.mean(found % num_identities == query_people)),
        )

    rows: list[dict[str, Any]] = []
    default_kind = default_index_kind(args.size)
    for kind in [k for k in args.kinds.split(",") if k]:
        params = default_index_params(kind, args.size, args.dim)  # type: ignore[arg-type]
        out = args.work_dir / f"index-{kind}-{folder.name}"
        built = build_in_child(folder / "gallery", kind, params, args.threads, out)
        index = load_built(out, kind, params, built["parts"])
        per_vector = index_bytes(out, built["parts"]) / args.size
        qps, speedup, recall, person = measure(index)
        label = f"{kind} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'exact'})"
        if kind == default_kind:
            label += " [default]"
        row = {"index": label, "bytes_per_face": per_vector, "recall@1": recall, "person@1": person}
        row |= {"queries_per_s": qps, "vs_exact": speedup, **built}
        rows.append(row)
        print(
            f"{label}: built in {built['build_s']:.1f} s (train {built['train_s']:.1f} s; CPU "
            f"{built['build_cpu_s']:.0f} s, train {built['train_cpu_s']:.0f} s), peak memory "
            f"{built['peak_bytes'] / 2**30:.2f} GiB (baseline {built['baseline_bytes'] / 2**30:.2f}), "
            f"recall@1 {recall:.3f}, {qps:,.0f} queries/s ({speedup:.1f}x)",
            flush=True,
        )
        for setting in sweep(kind, params) if args.sweep else []:
            apply_search_params(index, kind, setting)
            qps, speedup, recall, person = measure(index)
            changed = ", ".join(f"{k}={v}" for k, v in setting.items() if v != params[k])
            rows.append(
                {
                    "index": f"  same {kind}, {changed}",
                    "bytes_per_face": per_vector,
                    "recall@1": recall,
                    "person@1": person,
                    "queries_per_s": qps,
                    "vs_exact": speedup,
                }
            )
            print(f"  {changed}: recall@1 {recall:.3f}, {qps:,.0f} queries/s ({speedup:.1f}x)", flush=True)
        del index
        for number in range(built["parts"]):
            Path(f"{out}.{number}").unlink(missing_ok=True)

    exact_qps = statistics.median(exact_speeds) if exact_speeds else float("nan")
    rows.insert(
        0,
        {
            "index": "exact (IndexFlatIP)",
            "bytes_per_face": 4 * args.dim,
            "recall@1": 1.0,
            "person@1": exact_person,
            "queries_per_s": exact_qps,
            "vs_exact": 1.0,
        },
    )
    print()
    print(machine_line(machine))
    header = (
        f"{'index':<58}{'build s':>9}{'CPU s':>8}{'peak GiB':>10}{'bytes/face':>11}{'recall@1':>10}{'person@1':>10}"
        f"{'queries/s':>11}{'vs exact':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        built_s = f"{row['build_s']:>9.1f}" if "build_s" in row else f"{'':>9}"
        built_s += f"{row['build_cpu_s']:>8.0f}" if "build_cpu_s" in row else f"{'':>8}"
        peak = f"{row['peak_bytes'] / 2**30:>10.2f}" if "peak_bytes" in row else f"{'':>10}"
        print(
            f"{row['index']:<58}{built_s}{peak}{row['bytes_per_face']:>11.0f}{row['recall@1']:>10.3f}"
            f"{row['person@1']:>10.3f}{row['queries_per_s']:>11,.0f}{row['vs_exact']:>9.1f}x"
        )
    print(
        "exact: median of its timings (search calls only, over the shards in turn), each taken in turn with an "
        "index's; vs exact: the index's median over the exact median of the same rounds"
    )
    print(
        "build s: wall time of train + add; CPU s: the build process's CPU seconds over all its threads (on a "
        "machine shared with other jobs both grow with their load: waiting OpenMP threads spin)"
    )
    print(
        "peak GiB: VmHWM of the build process (training sample + index + the shards' path tables); "
        "recall@1: same top-1 face as exact search; person@1: top-1 face shows the query's identity"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"options": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "rows": rows},
                indent=1,
            )
        )
    default_rows = [r for r in rows if r["index"].endswith("[default]")]
    if default_kind == "flat":
        print(f"\n(the default for {args.size:,} vectors is exact search; the target applies to 1 M vectors)")
        return 0
    if not default_rows:
        print(f"\n(default index for {args.size:,} vectors is {default_kind}; not built in this run)")
        return 0
    recall, speedup = default_rows[0]["recall@1"], default_rows[0]["vs_exact"]
    met = recall >= TARGET_RECALL and speedup >= TARGET_SPEEDUP
    print(
        f"\ntarget: default index ({default_kind}) recall@1 >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x exact "
        f"queries/s -> recall {recall:.3f}, {speedup:.1f}x: {'MET' if met else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
