"""Backbone speed against timm's ``mobilenetv1_100`` (the same architecture), in the same run and threads.

Rows: inference images/s at batch 1 and 32 and one training step (forward, backward, SGD update) at
batch 32, for 1.0 MobileNet-224 in NCHW and channels_last; plus our inference mode (batch norm folded,
channels_last, ``torch.inference_mode``). Both models get identical weights (timm's random init copied into
ours, with batch-norm statistics measured on synthetic images so that activations have realistic scales
rather than denormal floats). Ours and timm's runs alternate within each round, so that load on a shared
machine hits both alike; the table prints medians over rounds.

Targets (2-core CPU): ours ≥ 1.0× timm in every row; inference mode ≥ 2× timm's eager NCHW at batch 32.

    .venv/bin/python benchmarks/backbone.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from mobilenets.backbone.inference import inference_model, recalibrate_batchnorm
from mobilenets.tasks.deploy.speed import copy_timm_into_ours, our_model, timm_peer


def inference_runner(model: nn.Module, batch: int, channels_last: bool) -> Callable[[], float]:
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(x)
            return time.perf_counter() - started

    return run


def train_runner(model: nn.Module, channels_last: bool) -> Callable[[], float]:
    x = torch.randn(32, 3, 224, 224)
    target = torch.randint(0, 1000, (32,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> float:
        model.train()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        model.eval()
        return elapsed

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row (medians are printed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peer = timm_peer()
    if peer is None:
        print("timm is not installed (pip install timm): no peer to compare with", file=sys.stderr)
        return 2
    recalibrate_batchnorm(peer, [torch.rand(16, 3, 224, 224) * 2 - 1 for _ in range(2)])
    peer.eval()
    ours = our_model(1.0)
    copy_timm_into_ours(peer, ours)
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224)
        difference = (ours(x) - peer(x)).abs().max().item()
    print(
        f"same weights: max |ours − timm| = {difference:.2e}; {args.threads} threads; medians of {args.rounds}"
    )

    ours_cl = our_model(1.0)
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl = ours_cl.to(memory_format=torch.channels_last)
    peer_cl = timm_peer()
    assert peer_cl is not None
    peer_cl.load_state_dict(peer.state_dict())
    peer_cl = peer_cl.eval().to(memory_format=torch.channels_last)
    fast = inference_model(ours)

    rows: list[tuple[str, Callable[[], float], Callable[[], float], int]] = []
    for batch in (1, 32):
        rows.append(
            (
                f"inference b{batch} NCHW",
                inference_runner(ours, batch, False),
                inference_runner(peer, batch, False),
                batch,
            )
        )
        rows.append(
            (
                f"inference b{batch} channels_last",
                inference_runner(ours_cl, batch, True),
                inference_runner(peer_cl, batch, True),
                batch,
            )
        )
    rows.append(("train step b32 NCHW", train_runner(ours, False), train_runner(peer, False), 32))
    rows.append(
        ("train step b32 channels_last", train_runner(ours_cl, True), train_runner(peer_cl, True), 32)
    )

    results: list[tuple[str, float, float]] = []
    for name, run_ours, run_peer, batch in rows:
        warm = 5 if batch == 1 else 1
        for _ in range(warm):
            run_ours(), run_peer()
        repeats = 20 if batch == 1 else 1
        ours_times, peer_times = [], []
        for _ in range(args.rounds):  # alternate so that background load hits both alike
            ours_times.append(statistics.median(run_ours() for _ in range(repeats)))
            peer_times.append(statistics.median(run_peer() for _ in range(repeats)))
        results.append((name, batch / statistics.median(ours_times), batch / statistics.median(peer_times)))
        print(f"  measured {name}", file=sys.stderr)

    fast_runs = {batch: inference_runner(fast, batch, True) for batch in (1, 32)}
    fast_speed = {}
    for batch, run in fast_runs.items():
        run()
        repeats = 20 if batch == 1 else 1
        fast_speed[batch] = batch / statistics.median(
            statistics.median(run() for _ in range(repeats)) for _ in range(args.rounds)
        )

    print("\n| 1.0 MobileNet-224 | ours img/s | timm img/s | ours / timm |\n|---|---:|---:|---:|")
    for name, ours_speed, peer_speed in results:
        print(f"| {name} | {ours_speed:.1f} | {peer_speed:.1f} | {ours_speed / peer_speed:.2f}× |")
    timm_nchw = {
        batch: speed for name, _, speed in results for batch in (1, 32) if name == f"inference b{batch} NCHW"
    }
    for batch in (1, 32):
        print(
            f"| our inference mode b{batch} (BN folded, channels_last) | {fast_speed[batch]:.1f} | "
            f"{timm_nchw[batch]:.1f} (eager NCHW) | {fast_speed[batch] / timm_nchw[batch]:.2f}× |"
        )
    worst = min(o / p for _, o, p in results)
    print(
        f"\ntargets: ours ≥ 1.0× timm in every row (worst {worst:.2f}×); inference mode ≥ 2× timm eager NCHW "
        f"at batch 32 ({fast_speed[32] / timm_nchw[32]:.2f}×)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
