"""The application: the ``mobilenets`` command, LightningCLI's fit/validate/test/predict plus the project's
subcommands, one module each. The library (``mobilenets.tasks`` and below) never imports this package.

Every command shares one error path: an error the project raises for bad input (``MobilenetsError``) or a
file that cannot be opened is printed as one line, ``mobilenets <command>: error: <message>``, and the
command exits 2 — the status argparse and LightningCLI use for bad options. ``--debug`` (anywhere on the
command line) or ``MOBILENETS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

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

#: Exit status of every command for bad input, as argparse and LightningCLI use for bad options.
ERROR_EXIT = 2

#: Anything else unexpected is a bug and keeps its traceback; an OSError (a missing file, a full disk, a
#: read-only folder) is the machine's answer to what the user asked, and names the file.

#: Modules of the package's extras (pyproject): missing one is an install step, not a bug.
OPTIONAL_MODULES: dict[str, str] = {
    "onnxruntime": "ONNX Runtime is not installed: pip install 'mobilenets[cpu]' (or 'mobilenets[gpu]' for "
    "onnxruntime-gpu)",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("mobilenets")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "unknown (not installed)"


def print_help() -> None:
    print("usage: mobilenets [--version] [--debug] <command> [options]\n")
    print("MobileNet v1 transfer-learning suite (Howard et al. 2017).\n\ncommands:")
    width = max(len(name) for name in [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]) + 2
    for name, text in LIGHTNING_COMMANDS.items():
        print(f"  {name:<{width}}{text}")
    for name, (_, text) in PROJECT_COMMANDS.items():
        print(f"  {name:<{width}}{text}")
    print("\n'mobilenets <command> --help' shows a command's options.")
    print("--debug (or MOBILENETS_DEBUG=1) shows the traceback of an error instead of its one-line message.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest and the demo swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _DropLightningTips(logging.Filter):
    """Lightning's advertising ("💡 Tip: ... try installing litlogger/litmodels") on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def configure_output() -> None:
    """What a user sees, set once at the command's entry: the project's own INFO lines (e.g. the dropped
    classifier of a pretrained file) on stderr, without Lightning's tips and LightningCLI's warning about
    ``args`` (the suite always passes its command line as ``args``). Safe to call more than once."""
    project = logging.getLogger("mobilenets")
    if not any(isinstance(h, _StderrHandler) for h in project.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        project.addHandler(handler)
        project.setLevel(logging.INFO)
    # rank_zero_info logs through this logger; a filter on it sees the records it creates
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in tips.filters):
        tips.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports bad input (one line, exit 2) rather than a bug (a traceback)."""
    from mobilenets.backbone.errors import MobilenetsError

    if isinstance(error, ModuleNotFoundError):
        return error.name in OPTIONAL_MODULES
    if isinstance(error, BrokenPipeError):  # output piped into `head`: console_main ends quietly
        return False
    return isinstance(error, MobilenetsError | OSError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message's own line breaks become '; ')."""
    if isinstance(error, ModuleNotFoundError) and error.name in OPTIONAL_MODULES:
        return OPTIONAL_MODULES[error.name]
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text or type(error).__name__


def _run(command: str, argv: list[str]) -> int:
    if command in PROJECT_COMMANDS:
        module = importlib.import_module(PROJECT_COMMANDS[command][0])
        return int(module.main(argv) or 0)
    from mobilenets.tasks.cli.lightning import lightning_cli
    from mobilenets.tasks.distributed import leave_together_at_exit

    lightning_cli([command, *argv])
    leave_together_at_exit()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MOBILENETS_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return 0
    if argv[0] == "--version":
        print(f"mobilenets {version()}")
        return 0
    command = argv[0]
    if command not in PROJECT_COMMANDS and command not in LIGHTNING_COMMANDS:
        print(f"mobilenets: unknown command {command!r}\n", file=sys.stderr)
        print_help()
        return ERROR_EXIT
    configure_output()
    try:
        return _run(command, argv[1:])
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(f"mobilenets {command}: error: {one_line(error)}", file=sys.stderr)
        return ERROR_EXIT


def console_main() -> int:
    """Entry point of the console script: like ``main`` but quiet when piped into ``head``."""
    try:
        return main()
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(console_main())
