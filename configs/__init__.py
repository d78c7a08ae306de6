"""The shipped task configs (one YAML per paper row and per user recipe), installed as package data so that
the demo and the tests build from the same files a user runs."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_path(name: str) -> Path:
    """The shipped config ``name`` (``"dogs_1.0_224"`` or ``"dogs_1.0_224.yaml"``)."""
    path = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"{path}: no shipped config of that name; shipped: {', '.join(shipped)}")
    return path
