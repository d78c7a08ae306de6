"""The suite runs offline: importing it and running a command opens no network connection.

albumentations asks its package index for a newer release on every import unless NO_ALBUMENTATIONS_UPDATE is
set; ``mobilenets.datasets`` sets it before anything imports albumentations. The check runs in a fresh
interpreter (the variable unset, nothing imported yet) with an audit hook that records every name lookup
and connection attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobilenets.datasets.synthetic.folder import make_image_folder

NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto")

RUNNER = """
import json, sys
attempts = []
def hook(event, args):
    if event in {events!r}:
        attempts.append([event, repr(args)[:200]])
sys.addaudithook(hook)
{body}
print("NETWORK-ATTEMPTS " + json.dumps(attempts))
"""


def network_attempts(body: str, tmp_path: Path) -> tuple[list[list[str]], subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    code = RUNNER.format(events=NETWORK_EVENTS, body=body)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("NETWORK-ATTEMPTS "))
    return json.loads(line.removeprefix("NETWORK-ATTEMPTS ")), done


def test_the_hook_sees_albumentations_update_check(tmp_path: Path) -> None:
    """Without the suite, importing albumentations looks its index up: the hook would catch a regression."""
    attempts, _ = network_attempts("import albumentations", tmp_path)
    assert any(event == "socket.getaddrinfo" for event, _ in attempts)


@pytest.mark.slow
def test_a_fit_through_the_command_opens_no_socket(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "folder", ["a", "b"], per_class=4, size=(40, 32))
    # short class names also resolve in a fresh process (the CLI imports the task and data modules first)
    argv = ["fit", "--model", "ImageClassifier", "--model.width_mult", "0.25", "--model.input_size", "32",
            "--model.weights", "null", "--data", "FolderDataModule", "--data.root", str(folder),
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.fast_dev_run", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    body = f"from mobilenets.tasks.cli import main\nassert main({argv!r}) == 0\nimport albumentations"
    attempts, done = network_attempts(body, tmp_path)
    assert attempts == [], attempts
    assert "Tip" not in done.stderr and "args parameter" not in done.stderr
