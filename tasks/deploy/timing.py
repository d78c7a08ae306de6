"""Timing runtimes against each other: wall times of repeated calls, batch-1 and batch-32 rows, and rounds
that alternate between runtimes, so that a noisy machine slows all alike. The speed report and the
benchmarks time with these, and so does ``export --int8``'s float fallback when it picks the fastest model."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np


def cycling(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One of ``calls`` per call, round and round (one per image of a set)."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def time_calls(
    fn: Callable[[], object], repeats: int, warmup: int = 2, budget_s: float = 30.0
) -> list[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` calls, stopping early past ``budget_s``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s and len(times) >= 3:
            break
    return times


@dataclass(frozen=True)
class SpeedRow:
    """One runtime's numbers for one model."""

    model: str
    runtime: str
    images_per_s_b1: float | None
    p50_ms: float | None
    p90_ms: float | None
    images_per_s_b32: float | None
    note: str = ""
    #: images/s at batch 1 over the peer's (timm's model on the same runtime), measured in the same run
    vs_peer: float | None = None


def speed_row(
    model: str,
    runtime: str,
    b1_times: Sequence[float] | None,
    b32_times: Sequence[float] | None,
    note: str = "",
) -> SpeedRow:
    """Median throughput at batch 1 and 32 and p50/p90 latency at batch 1 from call times (s)."""
    b1 = p50 = p90 = b32 = None
    if b1_times:
        p50, p90 = (float(np.percentile(b1_times, q)) * 1e3 for q in (50, 90))
        b1 = 1e3 / p50
    if b32_times:
        b32 = 32 / statistics.median(b32_times)
    return SpeedRow(model, runtime, b1, p50, p90, b32, note)


def measure(
    model: str,
    runtime: str,
    run_b1: Callable[[], object] | None,
    run_b32: Callable[[], object] | None,
    repeats_b1: int = 50,
    repeats_b32: int = 5,
    note: str = "",
) -> SpeedRow:
    """Median throughput at batch 1 and 32 and p50/p90 latency at batch 1."""
    b1_times = time_calls(run_b1, repeats_b1, warmup=5) if run_b1 is not None else None
    b32_times = time_calls(run_b32, repeats_b32, warmup=1, budget_s=60.0) if run_b32 is not None else None
    return speed_row(model, runtime, b1_times, b32_times, note)


def measure_against_peer(
    model: str,
    ours: tuple[str, Callable[[], object], Callable[[], object]],
    peer: tuple[str, Callable[[], object], Callable[[], object]],
    repeats_b1: int = 50,
    repeats_b32: int = 5,
    rounds: int = 10,
) -> tuple[SpeedRow, SpeedRow]:
    """Our runtime and the peer's, timed in alternating rounds so that a noisy machine slows both alike;
    our row carries the batch-1 ratio to the peer. The batch-1 rounds all come before the batch-32 ones: a
    batch-32 call just before a batch-1 round slowed that round (at 1.0-224 on 2 threads the same graph
    measured 0.74-0.84x of itself)."""
    runs = (ours, peer)
    b1_times: list[list[float]] = [[], []]
    b32_times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, (_, run_b1, _) in enumerate(runs):
            b1_times[i] += time_calls(run_b1, max(repeats_b1 // rounds, 1), warmup=2)
    for _ in range(max(repeats_b32, 1)):
        for i, (_, _, run_b32) in enumerate(runs):
            b32_times[i] += time_calls(run_b32, 1, warmup=0, budget_s=60.0)
    ours_row, peer_row = (speed_row(model, run[0], b1_times[i], b32_times[i]) for i, run in enumerate(runs))
    return replace(ours_row, vs_peer=ratio(ours_row.images_per_s_b1, peer_row.images_per_s_b1)), peer_row


def ratio(ours: float | None, peer: float | None) -> float | None:
    """``ours`` over ``peer`` (None when either is missing)."""
    return ours / peer if ours is not None and peer else None


def measure_alternating(
    model: str,
    runs: Sequence[tuple[str, Callable[[], object]]],
    repeats: int = 100,
    rounds: int = 5,
    per_pass: int | None = None,
) -> list[SpeedRow]:
    """Batch-1 rows for several runtimes timed in alternating rounds (a noisy machine slows all alike);
    every row after the first carries its ratio to the first (the peer).

    With ``per_pass``, each run goes round that many images whose calls may differ in cost (a routed
    model answers some in int8, some in float too), so a median call would hide the slow ones: each round
    times ``per_pass`` calls whole, and the row's images/s is the median over rounds."""
    if per_pass is not None:
        rates: list[list[float]] = [[] for _ in runs]
        for _ in range(rounds):
            for i, (_, run) in enumerate(runs):
                run()
                started = time.perf_counter()
                for _ in range(per_pass):
                    run()
                rates[i].append(per_pass / (time.perf_counter() - started))
        rows = [
            SpeedRow(model, name, statistics.median(rates[i]), None, None, None)
            for i, (name, _) in enumerate(runs)
        ]
    else:
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(rounds):
            for i, (_, run) in enumerate(runs):
                times[i] += time_calls(run, max(repeats // rounds, 1), warmup=3)
        rows = [speed_row(model, name, times[i], None) for i, (name, _) in enumerate(runs)]
    return [rows[0]] + [
        replace(r, vs_peer=ratio(r.images_per_s_b1, rows[0].images_per_s_b1)) for r in rows[1:]
    ]
