"""``mobilenets profile``: million mult-adds and parameters of a backbone or any task config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from mobilenets.backbone.errors import ConfigError
from mobilenets.backbone.profile import (
    PAPER_IMAGENET_ROWS,
    Profile,
    format_paper_tables,
    format_profile_table,
    profile_backbone,
)
from mobilenets.tasks.base import BaseTask
from mobilenets.tasks.multitask import MultiTask

__all__ = ["ConfigError", "instantiate_model_from_config", "main"]


def instantiate_model_from_config(path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Build only the ``model`` section of a LightningCLI config (no data, no weights download)."""
    from jsonargparse import ArgumentParser

    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: config file not found") from error
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {problem or error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(f"{path}: expected a 'model:' section with class_path and init_args")
    model = dict(config["model"])
    init_args = dict(model.get("init_args") or {})
    init_args.update(overrides or {})
    model["init_args"] = init_args
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(BaseTask, "model")
    try:
        namespace = parser.parse_object({"model": model})
    except Exception as error:  # jsonargparse reports the offending key in its message
        raise ConfigError(f"{path}: invalid model section: {error}") from error
    return parser.instantiate_classes(namespace).model


def paper_row_for(args: argparse.Namespace) -> tuple[float, float] | None:
    """The paper's ImageNet figures for this backbone, when the paper has such a row."""
    for row in PAPER_IMAGENET_ROWS:
        same = (row.width_mult, row.input_size, row.full_conv, row.shallow) == (
            args.width_mult,
            args.input_size,
            args.full_conv,
            args.shallow,
        )
        if same:
            return row.mult_adds, row.parameters
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mobilenets profile", description=__doc__)
    parser.add_argument("--config", type=Path, action="append", default=[], help="task config(s) to profile")
    parser.add_argument("--paper", action="store_true", help="reprint Tables 3-9: paper, ours, difference")
    parser.add_argument("--width-mult", type=float, default=1.0, help="α of a plain backbone")
    parser.add_argument("--input-size", type=int, default=224, help="input resolution of a plain backbone")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--full-conv", action="store_true", help="Table 4's Conv MobileNet")
    parser.add_argument("--shallow", action="store_true", help="Table 5's Shallow MobileNet")
    args = parser.parse_args(argv)
    if args.paper:
        print(format_paper_tables())
        return 0
    rows: list[tuple[str, Profile, tuple[float, float] | None]] = []
    notes: list[str] = []
    if args.config:
        for path in args.config:
            # weights are irrelevant to counting and may not exist on this machine
            model = instantiate_model_from_config(path, {"weights": None})
            rows.append((path.stem, model.profile(), model.paper_figures()))
            if isinstance(model, MultiTask):
                rows[-1] = (f"{path.stem} (shared)", rows[-1][1], None)
                separate = model.separate_profiles()
                rows += [(f"  {name} alone", profile, None) for name, profile in separate.items()]
                total = Profile(
                    sum(p.mult_adds for p in separate.values()), sum(p.parameters for p in separate.values())
                )
                rows.append((f"  sum of {len(separate)} separate models", total, None))
                shared = rows[-len(separate) - 2][1]
                notes.append(
                    f"{path.stem}: the shared model costs {shared.mult_adds / total.mult_adds:.2f}x the mult-adds "
                    f"and {shared.parameters / total.parameters:.2f}x the parameters of {len(separate)} separate models"
                )
    else:
        if args.width_mult <= 0:
            parser.error(f"--width-mult must be > 0, got {args.width_mult}")
        if args.input_size < 32:
            parser.error(f"--input-size must be at least 32, got {args.input_size}")
        name = f"{args.width_mult:g} MobileNet-{args.input_size}"
        name += " (conv)" if args.full_conv else " (shallow)" if args.shallow else ""
        prof = profile_backbone(
            args.width_mult, args.input_size, args.num_classes, args.full_conv, args.shallow
        )
        rows.append((name, prof, paper_row_for(args) if args.num_classes == 1000 else None))
    print(format_profile_table(rows))
    for note in notes:
        print(note)
    return 0
