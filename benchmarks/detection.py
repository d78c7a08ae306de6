"""Detection benchmarks: COCO evaluation time (ours vs pycocotools) and detector inference speed on CPU.

    python benchmarks/detection.py                 # everything (the evaluation part takes a few minutes)
    python benchmarks/detection.py --skip-eval     # inference only
    python benchmarks/detection.py --eval-images 1000 --skip-inference

Evaluation: a synthetic COCO-val-sized set (5,000 images x 100 detections, 80 categories), evaluated by
``evaluate_detections`` (faster-coco-eval engine, what ``detect-eval`` runs) and by plain pycocotools on
the same files; the 12 numbers must agree exactly. Inference: images/s at batch 1 on 640x480 images,
our SSD300 and Faster R-CNN 300 (α 1, 91 classes) beside torchvision's ssdlite320_mobilenet_v3_large and
fasterrcnn_mobilenet_v3_large_320_fpn (random weights, nothing downloaded). Untrained detectors' NMS load
differs from trained ones'; score thresholds are set so every model keeps its top 100 boxes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def time_eval(num_images: int, dets: int, repeats: int) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from mobilenets.datasets.synthetic.coco import make_coco_eval_set
    from mobilenets.tasks.detection.coco_eval import evaluate_detections

    print(f"generating {num_images} images x {dets} detections ...", flush=True)
    ground_truth, results = make_coco_eval_set(num_images, dets)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, res_path = Path(tmp) / "instances_val.json", Path(tmp) / "detections.json"
        gt_path.write_text(json.dumps(ground_truth))
        res_path.write_text(json.dumps(results))
        del ground_truth, results

        def ours() -> tuple[float, ...]:
            return evaluate_detections(gt_path, res_path).stats

        def reference() -> tuple[float, ...]:
            with contextlib.redirect_stdout(io.StringIO()):
                gt = COCO(str(gt_path))
                evaluator = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            return tuple(float(v) for v in evaluator.stats)

        timings: dict[str, list[float]] = {"ours (faster-coco-eval engine)": [], "pycocotools": []}
        outputs = {}
        for _ in range(repeats):
            for name, fn in (("ours (faster-coco-eval engine)", ours), ("pycocotools", reference)):
                start = time.perf_counter()
                outputs[name] = fn()
                timings[name].append(time.perf_counter() - start)
    ours_s = statistics.median(timings["ours (faster-coco-eval engine)"])
    ref_s = statistics.median(timings["pycocotools"])
    print(f"\nCOCO bbox evaluation, {num_images} images x {dets} detections (median of {repeats}, whole")
    print("evaluation: reading both JSON files, matching, accumulating, summarising)")
    print(f"{'evaluator':<34}{'seconds':>10}{'vs pycocotools':>16}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<34}{median:>10.1f}{ref_s / median:>15.1f}x")
    equal = outputs["ours (faster-coco-eval engine)"] == outputs["pycocotools"]
    print(f"12 numbers identical to pycocotools: {equal}; AP = {outputs['pycocotools'][0]:.6f}")
    print(f"target <= 15 s: {'met' if ours_s <= 15 else 'MISSED'} ({ours_s:.1f} s)")


def images_per_second(model: torch.nn.Module, images: list[torch.Tensor], warmup: int, runs: int) -> float:
    model.eval()
    times = []
    with torch.inference_mode():
        for index in range(warmup + runs):
            start = time.perf_counter()
            model([images[index % len(images)]])
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def time_inference(runs: int) -> None:
    from torchvision.models.detection import (
        fasterrcnn_mobilenet_v3_large_320_fpn,
        ssdlite320_mobilenet_v3_large,
    )

    from mobilenets.tasks.detection import FasterRCNNDetection, SSDDetection

    torch.manual_seed(0)
    images = [torch.rand(3, 480, 640) for _ in range(4)]
    ssd = SSDDetection(num_classes=91, score_thresh=0.0).model
    frcnn = FasterRCNNDetection(num_classes=91, input_size=300, score_thresh=0.0).model
    peer_ssd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, score_thresh=0.0)
    peer_frcnn = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0
    )
    pairs = [
        ("SSD300 MobileNet v1 (ours)", ssd, "ssdlite320_mobilenet_v3_large", peer_ssd),
        ("Faster R-CNN 300 MobileNet v1 (ours)", frcnn, "fasterrcnn_mobilenet_v3_large_320_fpn", peer_frcnn),
    ]
    print(
        f"\nCPU inference, batch 1, 640x480 images, {torch.get_num_threads()} threads, median of {runs} runs"
    )
    print(f"{'model':<40}{'img/s':>8}   {'torchvision peer':<40}{'img/s':>8}{'ours/peer':>11}")
    for name, model, peer_name, peer in pairs:
        ours = images_per_second(model, images, 2, runs)
        theirs = images_per_second(peer, images, 2, runs)
        print(f"{name:<40}{ours:>8.2f}   {peer_name:<40}{theirs:>8.2f}{ours / theirs:>10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--eval-repeats", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10, help="timed inference runs per model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_inference:
        time_inference(args.runs)
    if not args.skip_eval:
        time_eval(args.eval_images, args.dets, args.eval_repeats)


if __name__ == "__main__":
    main()
