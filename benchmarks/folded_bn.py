"""Fine-tuning from folded batch norm (TFLite) against the same weights with real batch-norm statistics.

Google's TFLite MobileNets fold batch norm into the convolutions, so a fit from them starts without the
statistics that training mode needs. The suite re-estimates them on ``folded_bn_batches`` training batches
before the first step (``tasks/batchnorm.py``). This benchmark checks that this recovers what the original
statistics would give, on real images installed offline (scikit-learn's handwritten digits):

1. a source network with real batch norm: ``official:0.25_128`` fine-tuned on the digits 0-4 (training mode
   moves its statistics, γ and β away from the folded file's);
2. the same network folded as a TFLite file stores it (each convolution scaled by γ/√(v+ε), batch norm an
   identity that adds the folded bias, marked folded as ``load_pretrained`` marks a TFLite file's);
3. the shipped ``folder_finetune`` recipe fine-tunes both, and the folded one once more without the
   re-estimation (``folded_bn_batches: 0``: batch norm normalises with meaningless statistics), on the
   digits 5-9, with the same seeds and steps; test top-1 of each.

    pip install scikit-learn
    python benchmarks/folded_bn.py [--seeds 0,1,2] [--epochs 3] [--out folded_bn_out]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mobilenets.backbone.inference import FOLDED_BATCHNORM_ATTR
from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.tasks.cli.demo.recipe import OFFICIAL_WEIGHTS, quiet_trainer, shipped_config
from mobilenets.tasks.cli.lightning import lightning_cli

SIZE = 64


def write_digits(root: Path, digits: range, per_split: dict[str, int], seed: int = 0) -> Path:
    """scikit-learn's 8x8 digits ``digits`` as ``root/{train,val,test}/<digit>/*.png`` (upscaled to SIZE px)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    for digit in digits:
        rows = rng.permutation(np.flatnonzero(data.target == digit))
        start = 0
        for split, count in per_split.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in rows[start : start + count]:
                pixels = (data.images[row] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{row:04d}.png")
            start += count
    return root


def recipe(data_root: Path, run_dir: Path, epochs: int, seed: int, **model: Any) -> dict[str, Any]:
    """The shipped ``folder_finetune`` recipe on a digits folder at SIZE px."""
    return shipped_config(
        "folder_finetune",
        {
            "seed_everything": seed,
            "trainer": quiet_trainer(
                str(run_dir), epochs, callbacks=[], logger=False, enable_checkpointing=False
            ),
            "model": {"init_args": {**OFFICIAL_WEIGHTS, "input_size": SIZE, **model}},
            "data": {"init_args": {"root": str(data_root), "num_workers": 0, "skip_corrupt": False}},
        },
    )


def fold_like_tflite(backbone: MobileNetV1) -> MobileNetV1:
    """A copy of ``backbone`` stored as a TFLite file stores it: every batch norm folded into its convolution
    and replaced by the identity-with-bias that ``load_pretrained`` writes for a TFLite file (weight √(1+ε),
    bias the folded bias, running mean 0 and variance 1), marked folded. Eval outputs are unchanged."""
    folded = copy.deepcopy(backbone).eval()
    names = []
    with torch.no_grad():
        for name, module in folded.named_modules():
            conv, norm = getattr(module, "conv", None), getattr(module, "bn", None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)):
                continue
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            norm.bias.copy_(norm.bias - norm.running_mean * scale)
            norm.weight.fill_(float(np.sqrt(1 + norm.eps)))
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0)
            names.append(f"{name}.bn")
    setattr(folded, FOLDED_BATCHNORM_ATTR, tuple(names))
    return folded


def fine_tune(
    data_root: Path, run_dir: Path, body: MobileNetV1, epochs: int, seed: int, **model: Any
) -> float:
    """Test top-1 after the recipe fine-tunes a classifier whose body starts as ``body``."""
    cli = lightning_cli(recipe(data_root, run_dir, epochs, seed, weights=None, **model), run=False)
    task = cli.model
    own = task.backbone
    own.stem.load_state_dict(body.stem.state_dict())
    own.blocks.load_state_dict(body.blocks.state_dict())
    marked = getattr(body, FOLDED_BATCHNORM_ATTR, ())
    setattr(own, FOLDED_BATCHNORM_ATTR, tuple(marked))
    cli.trainer.fit(task, datamodule=cli.datamodule)
    results = cli.trainer.test(task, datamodule=cli.datamodule, verbose=False)
    return float(results[0]["test/top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (comma-separated)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each fine-tune")
    parser.add_argument("--out", type=Path, default=Path("folded_bn_out"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = {"train": 60, "val": 10, "test": 50}
    source_data = write_digits(args.out / "digits_0-4", range(0, 5), splits, seed=0)
    target_data = write_digits(args.out / "digits_5-9", range(5, 10), splits, seed=1)

    print("source: official:0.25_128 fine-tuned on digits 0-4 (real batch-norm statistics) ...", flush=True)
    source = lightning_cli({"fit": recipe(source_data, args.out / "source", 3, 0)})
    real = source.model.backbone.eval()
    folded = fold_like_tflite(real)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        difference = float((real(x) - folded(x)).abs().max())
    print(f"folded copy: eval outputs differ by {difference:.2e} (max |Δ|)", flush=True)

    variants = {
        "real batch-norm statistics": (real, {}),
        "folded, statistics re-estimated (default)": (folded, {}),
        "folded, not re-estimated (folded_bn_batches 0)": (folded, {"folded_bn_batches": 0}),
    }
    scores: dict[str, list[float]] = {name: [] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for seed in seeds:
        for number, (name, (body, options)) in enumerate(variants.items()):
            print(f"seed {seed}: fine-tuning on digits 5-9 from {name} ...", flush=True)
            start = time.perf_counter()
            run_dir = args.out / f"target-{number}-seed{seed}"
            scores[name].append(fine_tune(target_data, run_dir, body, args.epochs, seed, **options))
            times[name].append(time.perf_counter() - start)
    reference = statistics.mean(scores["real batch-norm statistics"])
    print(
        f"\nFine-tuning on real digits 5-9 (60 train / 50 test images per class, {SIZE} px), shipped "
        f"folder_finetune recipe, {args.epochs} epochs, seeds {seeds}; {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s)"
    )
    print("| start | test top-1 per seed | mean | vs real BN | s per fit |")
    print("|---|---|---:|---:|---:|")
    for name in variants:
        mean = statistics.mean(scores[name])
        per_seed = ", ".join(f"{s:.3f}" for s in scores[name])
        print(
            f"| {name} | {per_seed} | {mean:.3f} | {100 * (mean - reference):+.1f} pts | "
            f"{statistics.median(times[name]):.0f} |"
        )


if __name__ == "__main__":
    main()
