"""Input pipeline throughput: decoded + augmented images/s per worker, ours vs PIL + torchvision.

Stanford Dogs' typical image is a 500x375 JPEG; at ρ = 224 each worker (one thread) decodes, random-
resized-crops, flips, colour-jitters and normalises. Ours is ``ImageListDataset`` with the fast
``ClassificationTransform`` (the crop is chosen before decoding so large JPEGs decode at a reduced DCT
scale; resize, jitter and normalisation are fused OpenCV/LUT/torch operations). The peer is the usual
PIL decode + torchvision transforms. Beside them: the training step rate of a 1.0 MobileNet-224
(batch 32), so the table shows whether loading or compute bounds an epoch.

    .venv/bin/python benchmarks/input_pipeline.py [--images 200] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """Photo-like JPEGs (smooth structure plus texture noise; quality 90, like web photos)."""
    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(count):
        phase = rng.uniform(0, 6, 3)
        freq = rng.uniform(0.005, 0.03, 3)
        base = 127 + 80 * np.sin(xx[..., None] * freq + yy[..., None] * freq[::-1] + phase)
        pixels = np.clip(base + rng.normal(0, 18, (height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def rate(function: Callable[[int], object], count: int, repeats: int) -> float:
    """Median images/s of ``function(i)`` over ``count`` images, ``repeats`` times (after a warm-up)."""
    for index in range(min(count, 20)):
        function(index)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            function(index)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def torchvision_pipeline(train: bool) -> Callable[[Path], torch.Tensor]:
    from torchvision import transforms as T

    normalize = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if train:
        steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2, 0.02)]
    else:
        steps = [T.Resize(256), T.CenterCrop(224)]
    pipeline = T.Compose([*steps, T.ToTensor(), normalize])

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return pipeline(image.convert("RGB"))

    return load


def training_step_rate(device: str, steps: int, batch_size: int = 32, amp: bool = False) -> float:
    from mobilenets.tasks.classification import ImageClassifier

    model = ImageClassifier(num_classes=120, width_mult=1.0, input_size=224).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    targets = torch.randint(0, 120, (batch_size,), device=device)
    if amp:  # what --trainer.precision bf16-mixed does, plus channels_last (faster convolutions)
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step-threads", type=int, default=0, help="torch threads of the step (0: all)")
    parser.add_argument("--amp", action="store_true", help="time the step in bf16 autocast, channels_last")
    args = parser.parse_args()

    from mobilenets.datasets.image_list import ImageListDataset
    from mobilenets.datasets.transforms import ClassificationTransform

    cv2.setNumThreads(0)  # one thread per worker, as in a DataLoader worker
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder), args.images)
        rows = []
        seeds = np.random.default_rng(0).integers(0, 2**31, len(paths)).tolist()
        for train in (True, False):
            ours = ImageListDataset(paths, [0] * len(paths), ClassificationTransform(224, train=train))
            reference = ImageListDataset(
                paths, [0] * len(paths), ClassificationTransform(224, train=train, backend="albumentations")
            )
            peer = torchvision_pipeline(train)
            ours_rate = rate(lambda i, d=ours: d[(i, seeds[i])], len(paths), args.repeats)
            reference_rate = rate(lambda i, d=reference: d[(i, seeds[i])], len(paths), args.repeats)
            peer_rate = rate(lambda i, p=peer: p(paths[i]), len(paths), args.repeats)
            rows.append(("train" if train else "eval", ours_rate, reference_rate, peer_rate))
        decode_only = rate(
            lambda i: np.asarray(Image.open(paths[i]).convert("RGB")), len(paths), args.repeats
        )

    torch.set_num_threads(args.step_threads or torch.get_num_threads() or 1)
    if args.step_threads == 0:
        torch.set_num_threads(max(torch.multiprocessing.cpu_count(), 1))
    step_rate = training_step_rate(args.device, args.steps, amp=args.amp)

    print(f"\ninput pipeline, 500x375 JPEG -> 224, one thread per worker, median of {args.repeats} runs")
    print(
        f"{'pipeline':<8}{'ours img/s':>12}{'ours (albumentations)':>23}{'PIL+torchvision':>17}{'ours/peer':>11}"
    )
    for name, ours_rate, reference_rate, peer_rate in rows:
        print(
            f"{name:<8}{ours_rate:>12.0f}{reference_rate:>23.0f}{peer_rate:>17.0f}{ours_rate / peer_rate:>10.2f}x"
        )
    print(
        f"(PIL full decode alone: {decode_only:.0f} img/s; target for ours, train: >= 500 img/s per worker)"
    )
    print(
        f"\ntraining step, 1.0 MobileNet-224, batch 32, {args.device}{' bf16 autocast' if args.amp else ''} "
        f"({torch.get_num_threads()} threads): {step_rate:.0f} img/s"
    )
    workers = step_rate / rows[0][1]
    print(f"-> {workers:.2f} loader workers of ours keep this step fed: ", end="")
    print("compute bounds an epoch" if workers <= 1 else "with fewer workers, loading bounds an epoch")


if __name__ == "__main__":
    main()
