"""``mobilenets detect-eval``: COCO bbox evaluation of a detector checkpoint on its config's split, or of an
existing results JSON against an instances JSON; prints the 12 COCO numbers and writes per-category AP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.tasks.base import read_checkpoint
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.detection.coco_eval import (
    PAPER_TABLE13,
    CocoEvalResult,
    evaluate_detections,
    format_result,
    per_category_csv,
    write_results_json,
)


def write_outputs(result: CocoEvalResult, out_dir: Path, text: str) -> None:
    write_text_atomic(out_dir / "per_category_ap.csv", per_category_csv(result))
    write_text_atomic(out_dir / "coco_eval.txt", text + "\n")
    write_text_atomic(out_dir / "coco_eval.json", json.dumps(result.as_dict(), indent=2))


def run_model(
    config: Path, ckpt_path: Path, stage: str, extra_args: list[str], device: str | None, limit: int | None
) -> tuple[Any, Any, list[dict[str, Any]], list[int]]:
    """Build the config's model and data, load the checkpoint, and detect on the split with a progress bar."""
    cli = lightning_cli(
        ["--config", str(config), "--model.init_args.weights", "null", *extra_args], run=False
    )
    model, datamodule = cli.model, cli.datamodule
    checkpoint = read_checkpoint(ckpt_path)
    model.load_state_dict(checkpoint["state_dict"])
    dataset = datamodule.make_dataset(stage)
    loader = datamodule._loader(dataset)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc=f"detect {dataset.annotation_file.name}", unit="batch"):
            detections = model.detect([image.to(device) for image in images])
            image_ids = [t["image_id"] for t in targets]
            results += model.to_coco_results(detections, image_ids, dataset.categories)
            seen += image_ids
            if limit and len(seen) >= limit:
                break
    return model, dataset, results, seen


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mobilenets detect-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="task config (model + data sections)")
    parser.add_argument("--ckpt_path", "--ckpt-path", type=Path, help="checkpoint of that config's model")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="data split of the config")
    parser.add_argument("--results", type=Path, help="an existing COCO results JSON (no model needed)")
    parser.add_argument("--annotations", type=Path, help="instances JSON to evaluate --results against")
    parser.add_argument("--out", type=Path, help="output folder (default: next to the results/checkpoint)")
    parser.add_argument("--engine", choices=["faster", "pycocotools"], default="faster")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    args, extra = parser.parse_known_args(argv)
    if args.results is not None:
        if args.annotations is None:
            parser.error("--results needs --annotations")
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        result = evaluate_detections(args.annotations, args.results, engine=args.engine)
        text = format_result(result)
        out_dir = args.out or args.results.parent / f"{args.results.stem}_eval"
    else:
        if args.config is None or args.ckpt_path is None:
            parser.error("give --config and --ckpt_path, or --results and --annotations")
        model, dataset, results, seen = run_model(
            args.config, args.ckpt_path, args.split, extra, args.device, args.limit
        )
        out_dir = args.out or args.ckpt_path.parent / f"detect_eval_{args.config.stem}"
        results_path = write_results_json(results, out_dir / "detections.json")
        print(f"wrote {len(results)} detections to {results_path}")
        result = evaluate_detections(dataset.coco.dataset, results, image_ids=seen, engine=args.engine)
        model = model.cpu()
        profile = model.profile()
        row = (model.table13_name(), profile.mult_adds / 1e9, profile.million_parameters)
        text = format_result(result, row, PAPER_TABLE13.get(model.table13_name()))
    print(text)
    write_outputs(result, out_dir, text)
    print(f"per-category AP: {out_dir / 'per_category_ap.csv'}")
    return 0
