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
    args = parser.parse_args(argv)
    if args.readme is not None and not args.readme.is_file():
        parser.error(f"{args.readme}: README not found")
    rows, lines = speed.speed_report(args.threads, not args.no_compile, args.quick)
    body = speed.report_markdown(rows, lines, args.threads)
    print("\n" + body)
    if args.readme is not None:
        try:
            speed.update_readme(args.readme, body)
        except speed.BenchError as error:
            print(f"mobilenets bench: error: {error}")
            return 1
        print(f"wrote the table into {args.readme}")
    return 0
