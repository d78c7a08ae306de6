"""``mobilenets bench``: the deployment speed report (``tasks/deploy/speed.py``), printed and optionally
written into the README between its bench markers."""

from __future__ import annotations

import argparse
from pathlib import Path

from mobilenets.tasks.deploy import speed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mobilenets bench", description=speed.__doc__.split("\n\n")[1])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats (smoke test)")
    parser.add_argument("--readme", type=Path, help="write the table between the README's bench markers")
    parser.add_argument(
        "--peer",
        choices=("all", "timm", "litert"),
        default="all",
        help="timm: the synthetic-weight report beside timm's model; litert: Google's official TFLite files "
        "in LiteRT beside our ONNX Runtime exports of the same weights (extra 'litert'); all: both",
    )
    parser.add_argument(
        "--tflite-dir",
        type=Path,
        default=speed.DEFAULT_TFLITE_DIR,
        help="folder of Google's official MobileNet v1 .tflite files (default: %(default)s)",
    )
    parser.add_argument(
        "--litert-threads", default="1,2", help="thread counts of the LiteRT comparison (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.readme is not None and not args.readme.is_file():
        parser.error(f"{args.readme}: README not found")
    try:
        litert_threads = [int(t) for t in args.litert_threads.split(",")]
    except ValueError:
        parser.error(f"--litert-threads: expected comma-separated thread counts, got {args.litert_threads!r}")
    rows: list[speed.SpeedRow] = []
    lines: list[str] = []
    if args.peer in ("all", "timm"):
        rows, lines = speed.speed_report(args.threads, not args.no_compile, args.quick)
    if args.peer in ("all", "litert"):
        widths = (0.25,) if args.quick else tuple(speed.OFFICIAL_TFLITE)
        litert_rows, litert_lines = speed.litert_report(litert_threads, args.tflite_dir, widths, args.quick)
        rows, lines = rows + litert_rows, lines + litert_lines
    body = speed.report_markdown(rows, lines, args.threads)
    print("\n" + body)
    if args.readme is not None:
        speed.update_readme(args.readme, body)  # a BenchError is the command's one-line error (exit 2)
        print(f"wrote the table into {args.readme}")
    return 0
