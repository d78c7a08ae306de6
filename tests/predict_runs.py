"""``mobilenets predict`` through the CLI on a shipped config, as the predict tests run it."""

from __future__ import annotations

from pathlib import Path

from mobilenets.tasks.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_predict(config: str, model: Path, run: Path, options: dict[str, object]) -> None:
    """``mobilenets predict --config configs/<config>`` with ``options`` (``{"model.init_args.x": v}`` →
    ``--model.init_args.x v``), no loader workers, logger or progress bar, the run under ``run`` and ``model``
    (a .ckpt or an exported .onnx) as ``--ckpt_path``."""
    argv = ["predict", "--config", str(CONFIGS / config)]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    argv += [
        "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false",
        "--ckpt_path", str(model),
    ]  # fmt: skip
    assert main(argv) == 0
