"""``mobilenets demo``: generate small datasets in the real formats and run each task end to end.

Each task contributes one step: a function ``run_demo(root: Path, quick: bool) -> list[DemoRow]`` in its
module, registered in ``DEMO_STEPS``. Steps run in order; the summary table lists every row they return.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from pathlib import Path

from mobilenets.tasks.cli import configure_output
from mobilenets.tasks.cli.demo.rows import DemoRow

#: step name → module with ``run_demo``; the order is the order they run in.
DEMO_STEPS: dict[str, str] = {
    "profile": "mobilenets.tasks.cli.demo.profile",
    "classification": "mobilenets.tasks.cli.demo.classification",
    "detection": "mobilenets.tasks.cli.demo.detection",
    "attributes": "mobilenets.tasks.cli.demo.attributes",
    "geolocation": "mobilenets.tasks.cli.demo.geolocation",
    "faces": "mobilenets.tasks.cli.demo.faces",
    "multitask": "mobilenets.tasks.cli.demo.multitask",
}


#: the summary's columns: DemoRow field → header
SUMMARY_COLUMNS: dict[str, str] = {
    "task": "task",
    "metric": "metric",
    "value": "ours",
    "baseline": "chance / no skill",
    "paper": "paper",
}


def format_summary(rows: list[DemoRow]) -> str:
    """The summary table: one line per row, our value beside its baseline (chance or a no-skill predictor)
    and the paper's figure."""
    fields = list(SUMMARY_COLUMNS)
    widths = [
        max([len(header)] + [len(getattr(r, f)) for r in rows]) for f, header in SUMMARY_COLUMNS.items()
    ]
    header = "  ".join(f"{h:<{w}}" for h, w in zip(SUMMARY_COLUMNS.values(), widths)).rstrip()
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [f"{getattr(row, f):<{w}}" for f, w in zip(fields, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mobilenets demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for data, runs and plots")
    parser.add_argument(
        "--only", default="", help=f"comma-separated steps to run (default all: {','.join(DEMO_STEPS)})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (what the tests use)")
    args = parser.parse_args(argv)
    wanted = [s for s in args.only.split(",") if s] or list(DEMO_STEPS)
    unknown = [s for s in wanted if s not in DEMO_STEPS]
    if unknown:
        parser.error(f"unknown demo steps {unknown}; choose from {list(DEMO_STEPS)}")
    configure_output()  # the project's INFO lines on stderr (the command's entry has already done it)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[DemoRow] = []
    failed: list[str] = []
    for step in wanted:
        print(f"\n=== demo step: {step} ===", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(DEMO_STEPS[step])
            rows += module.run_demo(args.out / step, args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(step)
            rows.append(DemoRow(step, "FAILED", "see the traceback above"))
        rows.append(DemoRow(step, "time", f"{time.perf_counter() - start:.0f} s"))
    print("\n=== mobilenets demo summary ===")
    print(format_summary(rows))
    print(f"\noutputs under {args.out.resolve()}")
    if failed:
        print(f"failed steps: {', '.join(failed)}")
        return 1
    return 0
