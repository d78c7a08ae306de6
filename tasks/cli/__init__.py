"""The application: the ``mobilenets`` command, LightningCLI's fit/validate/test/predict plus the project's
subcommands, one module each. The library (``mobilenets.tasks`` and below) never imports this package."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: Project subcommands: name → (module whose ``main(argv)`` runs it, one-line help).
#: Modules are imported only when their command runs, so ``mobilenets --help`` stays fast.
PROJECT_COMMANDS: dict[str, tuple[str, str]] = {
    "profile": (
        "mobilenets.tasks.cli.profile",
        "million mult-adds and parameters of a backbone or task config; --paper reprints Tables 3-9",
    ),
    "geo": ("mobilenets.tasks.cli.geo", "PlaNet: 'geo partition' builds the S2 cell classes, 'geo cells'"),
    "detect-eval": (
        "mobilenets.tasks.cli.detect_eval",
        "COCO bbox evaluation of a detector checkpoint or a results JSON",
    ),
    "demo": (
        "mobilenets.tasks.cli.demo",
        "generate small datasets in the real formats and run every task end to end",
    ),
    "faces": (
        "mobilenets.tasks.cli.faces",
        "face-embedding search indexes: index build|add|remove|info, search",
    ),
    "export": (
        "mobilenets.tasks.cli.export",
        "checkpoint to ONNX/TorchScript (BN folded, verified); --int8 quantizes",
    ),
    "onnx-predict": (
        "mobilenets.tasks.cli.onnx_predict",
        "run an exported .onnx model on images, write a CSV",
    ),
    "bench": (
        "mobilenets.tasks.cli.bench",
        "speed report: eager, inference mode, compile, ONNX fp32/int8, timm",
    ),
}

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a task from a YAML config (--config configs/<file>.yaml)",
    "validate": "run the validation loop of a config on a checkpoint (--ckpt_path)",
    "test": "run the test loop, print the task's paper-style table and write its plots",
    "predict": "run a trained task (.ckpt, or an exported .onnx) on new images and write its predictions",
}


def print_help() -> None:
    print("usage: mobilenets <command> [options]\n")
    print("MobileNet v1 transfer-learning suite (Howard et al. 2017).\n\ncommands:")
    width = max(len(name) for name in [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]) + 2
    for name, text in LIGHTNING_COMMANDS.items():
        print(f"  {name:<{width}}{text}")
    for name, (_, text) in PROJECT_COMMANDS.items():
        print(f"  {name:<{width}}{text}")
    print("\n'mobilenets <command> --help' shows a command's options.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return 0
    command = argv[0]
    if command in PROJECT_COMMANDS:
        module = importlib.import_module(PROJECT_COMMANDS[command][0])
        return int(module.main(argv[1:]) or 0)
    if command in LIGHTNING_COMMANDS:
        from mobilenets.tasks.cli.lightning import lightning_cli

        lightning_cli(argv)
        return 0
    print(f"mobilenets: unknown command {command!r}\n", file=sys.stderr)
    print_help()
    return 2


def console_main() -> int:
    """Entry point of the console script: like ``main`` but quiet when piped into ``head``."""
    try:
        return main()
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(console_main())
