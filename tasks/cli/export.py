"""``mobilenets export``: a task checkpoint to ONNX or TorchScript (batch norm folded, verified against
PyTorch); ``--int8`` adds static int8 quantisation with an agreement check."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mobilenets.datasets.atomic import remove_stale_temporaries
from mobilenets.datasets.images import images_in_folder
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.deploy.export import (
    DEFAULT_TOLERANCE,
    ExportError,
    export_int8,
    export_onnx,
    export_torchscript,
    split_calibration,
)
from mobilenets.tasks.deploy.qat import DEFAULT_QAT_LR

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilenets export",
        description="Export a task checkpoint (batch norm folded, dynamic batch, verified against PyTorch) "
        "to ONNX or TorchScript; --int8 adds onnxruntime static quantisation with an agreement check.",
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", type=Path, required=True)
    parser.add_argument(
        "--format",
        choices=("onnx", "torchscript", "tflite"),
        default="onnx",
        help="tflite: LiteRT for phones, batch 1, through litert-torch (extra 'tflite-export')",
    )
    parser.add_argument("--out", type=Path, required=True, help="output file (.onnx or .pt)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="max |exported − PyTorch| relative to max(1, max |output|) (default %(default)g)",
    )
    parser.add_argument("--int8", action="store_true", help="static int8 quantisation (ONNX only)")
    parser.add_argument("--calibration", type=Path, help="folder of calibration images (--int8)")
    parser.add_argument(
        "--heldout",
        type=Path,
        help="folder of held-out images for the agreement check (default: every "
        "5th calibration image, then not used for calibration)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="int8's floor of agreement with float on the held-out images; below it the float fallback, or "
        "with --float-fallback off nothing is written (default %(default)s)",
    )
    parser.add_argument(
        "--int8-weight-bits",
        type=int,
        choices=(7, 8),
        help="int8 weight precision (default: 8 on CPUs with VNNI, 7 without; 8 there runs exact but slower)",
    )
    parser.add_argument("--max-calibration", type=int, default=256, help="use at most this many images")
    parser.add_argument(
        "--qat-epochs",
        type=int,
        default=0,
        help="quantisation-aware fine-tuning: epochs over the calibration images (and their flips) through "
        "int8 fake quantisation, towards the float model's outputs, before quantising (default 0: none)",
    )
    parser.add_argument(
        "--qat-lr",
        type=float,
        default=DEFAULT_QAT_LR,
        help="Adam learning rate of --qat-epochs (%(default)g)",
    )
    parser.add_argument(
        "--bias-correction",
        choices=("auto", "on", "off"),
        default="auto",
        help="int8 bias correction: each layer's bias cancels the mean shift int8 rounding adds to its output, "
        "measured on the calibration images; auto quantises with and without it and keeps the one that agrees "
        "more on the held-out images (default %(default)s)",
    )
    parser.add_argument(
        "--float-fallback",
        choices=("auto", "close-calls", "first-layers", "off"),
        default="auto",
        help="below --min-agreement, let float answer part of the work instead of refusing: close-calls "
        "hands float the images whose int8 top-two logit margin is narrow (classifiers); first-layers keeps "
        "the shortest run of first convolutions in float that meets the floor (found by bisection); both "
        "are chosen on the held-out images and recorded as int8_float_fallback; auto: for classifiers the "
        "fastest of close-calls on the int8 model and on those with a quarter or half of the first "
        "convolutions in float (timed here, batch 1), first-layers otherwise (default %(default)s)",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.int8 and args.format != "onnx":
        parser.error("--int8 needs --format onnx")
    if args.int8 and args.calibration is None:
        parser.error("--int8 needs --calibration DIR")
    if args.qat_epochs and not args.int8:
        parser.error("--qat-epochs needs --int8")
    if args.bias_correction != "auto" and not args.int8:
        parser.error("--bias-correction needs --int8")
    if args.float_fallback != "auto" and not args.int8:
        parser.error("--float-fallback needs --int8")
    if args.qat_epochs < 0 or not args.qat_lr > 0:
        parser.error("--qat-epochs must be 0 or more and --qat-lr above 0")
    # a killed export (no ``finally`` ran) leaves its hidden temporary beside the output: this export owns
    # the folder's files of its format, so it removes them
    for stale in remove_stale_temporaries(args.out.parent, f"*{args.out.suffix}"):
        log.info("removed %s, left by an interrupted export", stale)
    task = BaseTask.load_task(args.ckpt_path)
    if args.int8:
        calibration = images_in_folder(args.calibration, "--calibration", ExportError)[: args.max_calibration]
        if args.heldout is not None:
            heldout = images_in_folder(args.heldout, "--heldout", ExportError)[: args.max_calibration]
        else:
            calibration, heldout = split_calibration(calibration)
        result = export_int8(
            task,
            args.out,
            calibration,
            heldout,
            args.min_agreement,
            args.tolerance,
            args.int8_weight_bits,
            args.qat_epochs,
            args.qat_lr,
            args.bias_correction,
            args.float_fallback,
        )
    elif args.format == "onnx":
        result = export_onnx(task, args.out, args.tolerance)
    elif args.format == "tflite":
        from mobilenets.tasks.deploy.tflite_export import export_tflite

        result = export_tflite(task, args.out, args.tolerance)
    else:
        result = export_torchscript(task, args.out, args.tolerance)
    print(result.summary())
    return 0
