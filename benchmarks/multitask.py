"""One backbone, many heads (issue 14): the shared multi-task model against the separate task models, side by
side in one run, in PyTorch (eager, eval) and ONNX Runtime (fp32 exports), at batch 1 and 32.

Four tasks on one α/ρ MobileNet: face attributes (40), face embedding (128-d), geolocation (``--cells`` S2
cells) and classification (120 classes). The separate models are the four task models, each with its own copy
of the body; the shared model is ``MultiTask.from_checkpoints`` of the same four (one body pass, four heads).
Goal: four tasks at ≤ 1.3x the latency of one model (the separate models cost about 4x).

    nice -n 10 .venv/bin/python benchmarks/multitask.py [--width-mult 0.25] [--input-size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mobilenets.tasks.attributes import AttributeModel
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.classification import ImageClassifier
from mobilenets.tasks.deploy.export import export_onnx, ort_session, run_onnx
from mobilenets.tasks.deploy.speed import cpu_isa
from mobilenets.tasks.deploy.timing import time_calls
from mobilenets.tasks.faces.embedding import FaceEmbedder
from mobilenets.tasks.geolocation import GeoClassifier
from mobilenets.tasks.multitask import MultiTask


def task_models(width_mult: float, input_size: int, cells: int) -> dict[str, BaseTask]:
    """The four task models on one body (the classifier's, copied: heads trained on a shared frozen body)."""
    options = {"width_mult": width_mult, "input_size": input_size}
    tasks: dict[str, BaseTask] = {
        "attributes": AttributeModel(num_attributes=40, **options),
        "embedding": FaceEmbedder(embedding_size=128, **options),
        "geolocation": GeoClassifier(num_cells=cells, **options),
        "classification": ImageClassifier(num_classes=120, **options),
    }
    body = {k: v for k, v in tasks["classification"].backbone.state_dict().items() if "classifier" not in k}
    for task in tasks.values():
        task.backbone.load_state_dict(body, strict=False)
        task.eval()
    return tasks


def save(task: BaseTask, path: Path) -> Path:
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * statistics.median(time_calls(fn, repeats, warmup=3, budget_s=20.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--cells", type=int, default=1000, help="geolocation classes (S2 cells)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tasks = task_models(args.width_mult, args.input_size, args.cells)
    with tempfile.TemporaryDirectory() as folder:
        shared = MultiTask.from_checkpoints(
            {n: save(t, Path(folder) / f"{n}.ckpt") for n, t in tasks.items()}
        )
        runtimes: dict[str, tuple[Callable[[np.ndarray], object], list[Callable[[np.ndarray], object]]]] = {}

        def torch_call(module: torch.nn.Module) -> Callable[[np.ndarray], object]:
            def call(x: np.ndarray) -> object:
                with torch.inference_mode():
                    return module(torch.from_numpy(x))

            return call

        runtimes["PyTorch eager"] = (
            torch_call(shared),
            [torch_call(t.export_module()) for t in tasks.values()],
        )
        if not args.no_onnx:
            sessions = {}
            for name, model in {"shared": shared, **tasks}.items():
                path = Path(folder) / f"{name}.onnx"
                export_onnx(model, path)
                sessions[name] = ort_session(path, args.threads)

            def onnx_call(session: object) -> Callable[[np.ndarray], object]:
                return lambda x: run_onnx(session, x)

            runtimes["ONNX Runtime fp32"] = (
                onnx_call(sessions["shared"]),
                [onnx_call(sessions[n]) for n in tasks],
            )
        profile, separate = shared.profile(), shared.separate_profiles()
        print(
            f"{args.width_mult:g} MobileNet-{args.input_size}, tasks {', '.join(tasks)}; "
            f"{platform.processor() or platform.machine()} ({cpu_isa()}), {os.cpu_count()} cores, "
            f"{args.threads} thread(s); torch {torch.__version__}"
        )
        print(
            f"mult-adds: shared {profile.million_mult_adds:.1f} M, separate "
            f"{sum(p.million_mult_adds for p in separate.values()):.1f} M; parameters: shared "
            f"{profile.million_parameters:.2f} M, separate {sum(p.million_parameters for p in separate.values()):.2f} M"
        )
        header = f"{'runtime':<20}{'batch':>6}{'one model ms':>14}{'4 separate ms':>15}{'shared ms':>11}"
        header += f"{'separate/one':>14}{'shared/one':>12}"
        print(header)
        for runtime, (shared_fn, separate_fns) in runtimes.items():
            for batch in (1, 32):
                x = np.random.default_rng(0).standard_normal((batch, 3, args.input_size, args.input_size))
                x = x.astype(np.float32)
                repeats = args.repeats if batch == 1 else max(args.repeats // 4, 5)
                # alternate the measurements: the machine's load drifts
                one, four, both = [], [], []
                single, whole = separate_fns[-1], shared_fn
                for _ in range(3):
                    one.append(median_ms(lambda x=x, fn=single: fn(x), repeats))
                    four.append(median_ms(lambda x=x, fns=separate_fns: [fn(x) for fn in fns], repeats))
                    both.append(median_ms(lambda x=x, fn=whole: fn(x), repeats))
                one_ms, four_ms, shared_ms = (statistics.median(v) for v in (one, four, both))
                print(
                    f"{runtime:<20}{batch:>6}{one_ms:>14.2f}{four_ms:>15.2f}{shared_ms:>11.2f}"
                    f"{four_ms / one_ms:>13.2f}x{shared_ms / one_ms:>11.2f}x"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
