from pathlib import Path

import pytest
import yaml

from mobilenets.configs import config_path
from mobilenets.tasks.cli import demo, main
from mobilenets.tasks.cli.demo.rows import DemoRow


def test_every_task_has_a_demo_step() -> None:
    assert list(demo.DEMO_STEPS) == [
        "profile",
        "classification",
        "detection",
        "attributes",
        "geolocation",
        "faces",
        "multitask",
    ]
    for module in demo.DEMO_STEPS.values():
        assert callable(__import__(module, fromlist=["run_demo"]).run_demo)


def test_demo_prints_a_summary_table(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--only", "profile", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "mobilenets demo summary" in out
    row = next(line for line in out.splitlines() if "0.25 MobileNet-224" in line)
    assert row.split()[-6:] == ["41M", "/", "0.47M", "41M", "/", "0.5M"]


def test_a_failing_step_fails_the_demo(tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(root, quick):
        raise RuntimeError("boom")

    from mobilenets.tasks.cli.demo import profile

    monkeypatch.setattr(profile, "run_demo", broken)
    assert main(["demo", "--out", str(tmp_path), "--only", "profile"]) == 1
    out = capsys.readouterr().out
    assert "profile  FAILED" in out and "failed steps: profile" in out


def test_unknown_step_is_an_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--only", "dogs"])
    assert "unknown demo steps ['dogs']" in capsys.readouterr().err


def test_the_summary_prints_each_value_beside_its_baseline() -> None:
    table = demo.format_summary(
        [
            DemoRow("classification", "test top-1", "97.9%", "83.3%", baseline="12.5% (chance)"),
            DemoRow("profile", "MAdds", "41M"),
        ]
    )
    header, _, first, second = table.splitlines()
    assert header.split() == ["task", "metric", "ours", "chance", "/", "no", "skill", "paper"]
    assert first.split() == ["classification", "test", "top-1", "97.9%", "12.5%", "(chance)", "83.3%"]
    # the baseline sits in its own column, under its header
    assert first.index("12.5%") == header.index("chance") and second.split() == ["profile", "MAdds", "41M"]


@pytest.mark.slow
def test_demo_steps_build_from_the_shipped_recipes_and_the_builtin_weights(tmp_path: Path) -> None:
    """Each training config of the classification and detection steps is a shipped YAML plus overrides, and
    it parses and instantiates (a broken recipe fails here, as it would fail the demo)."""
    from mobilenets.tasks.cli.demo import classification, detection
    from mobilenets.tasks.cli.lightning import lightning_cli

    configs = {
        "dogs_1.0_224": classification.demo_config(tmp_path, tmp_path / "dogs", quick=True),
        **dict(
            zip(
                ("ssd300_coco", "frcnn300_coco"),
                detection.detector_configs(tmp_path, tmp_path, True).values(),
            )
        ),
    }
    for name, config in configs.items():
        shipped = yaml.safe_load(config_path(name).read_text())
        assert config["model"]["class_path"] == shipped["model"]["class_path"]
        assert config["model"]["init_args"]["optimizer"] == shipped["model"]["init_args"]["optimizer"]
        cli = lightning_cli(config, run=False)
        hparams = cli.model.hparams
        assert (hparams.weights, hparams.activation, hparams.padding, hparams.width_mult) == (
            "official:0.25_128",
            "relu6",
            "tf",
            0.25,
        ), name
        assert cli.trainer.default_root_dir.startswith(str(tmp_path)), name
