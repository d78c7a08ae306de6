"""One error path for every command: bad input gives one line ``mobilenets <command>: error: ...`` on stderr
and exit status 2; ``--debug`` or ``MOBILENETS_DEBUG=1`` gives the traceback; what a user sees otherwise."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from mobilenets.backbone.errors import ConfigError, MobilenetsError
from mobilenets.configs import CONFIG_DIR
from mobilenets.tasks.cli import configure_output, main


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"mobilenets {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--ckpt_path", "{tmp}/none.ckpt", "--out", "{tmp}/m.onnx"], "{tmp}/none.ckpt"),
        (["onnx-predict", "--model", "{tmp}/none.onnx", "--images", "{tmp}"], "{tmp}: --images holds no images"),
        (["geo", "partition", "{tmp}/none.csv", "--out", "{tmp}/p.csv"], "{tmp}/none.csv: geotag file not found"),
        (["geo", "frobnicate"], "unknown subcommand 'frobnicate'; choose from ['partition', 'cells']"),
        (["geo", "cells", "1,2", "--partition", "{tmp}/none.csv"], "{tmp}/none.csv: partition file not found"),
        (["faces", "index", "info", "--index", "{tmp}"], "{tmp}/meta.json: no face index here"),
        (["detect-eval", "--results", "{tmp}/r.json", "--annotations", "{tmp}/a.json"], "{tmp}/a.json: annotation file not found"),
        (["bench", "--readme", "{tmp}/README.md", "--quick"], None),  # argparse's own error: exit 2 too
    ],
)  # fmt: skip
def test_every_project_command_exits_2_with_one_line(
    argv: list[str], message: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "README not found" in capsys.readouterr().err
        return
    assert main(argv) == 2
    assert one_error_line(capsys, argv[0]).startswith(message.format(tmp=tmp_path))


def test_lightning_commands_share_the_error_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_folder"
    argv = ["--config", str(CONFIG_DIR / "folder_finetune.yaml"), "--data.init_args.root", str(missing),
            "--model.init_args.weights", "null", "--model.init_args.width_mult", "0.25",
            "--model.init_args.input_size", "32", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(["fit", *argv]) == 2
    assert str(missing) in one_error_line(capsys, "fit")
    with pytest.raises(MobilenetsError, match=str(missing)):
        main(["--debug", "validate", *argv])


def test_debug_shows_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        main(["profile", "--config", str(bad), "--debug"])
    monkeypatch.setenv("MOBILENETS_DEBUG", "1")
    with pytest.raises(ConfigError, match="not valid YAML"):
        main(["profile", "--config", str(bad)])
    monkeypatch.setenv("MOBILENETS_DEBUG", "0")
    assert main(["profile", "--config", str(bad)]) == 2
    capsys.readouterr()


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only bad input becomes one line: an unexpected exception is a bug to report, with its traceback."""
    from mobilenets.tasks.cli import profile

    def broken(argv: list[str]) -> int:
        raise KeyError("internal")

    monkeypatch.setattr(profile, "main", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["profile"])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mobilenets {version('mobilenets')}\n"


def test_project_info_lines_reach_the_terminal_and_lightning_tips_do_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

    configure_output()
    configure_output()  # once is enough: a second call adds no second handler
    logging.getLogger("mobilenets.backbone.weights").info("dropped the classifier of weights.pt")
    rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        configure_output()  # its filter goes first again
        rank_zero_warn("LightningCLI's args parameter is intended to run from within Python like ...")
    err = capsys.readouterr().err
    assert err.count("INFO mobilenets.backbone.weights: dropped the classifier of weights.pt") == 1
    assert "Tip" not in err and not [w for w in caught if "args parameter" in str(w.message)]


def test_short_class_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "ImageClassifier"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--model.label_smoothing" in out


def test_a_missing_extra_is_an_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mobilenets.tasks.cli import onnx_predict

    def without_onnxruntime(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

    monkeypatch.setattr(onnx_predict, "onnx_predict", without_onnxruntime)
    (tmp_path / "a.jpg").write_bytes(b"")  # a file with an image name: the folder is not empty
    assert main(["onnx-predict", "--model", str(tmp_path / "m.onnx"), "--images", str(tmp_path)]) == 2
    assert one_error_line(capsys, "onnx-predict").startswith("ONNX Runtime is not installed: pip install")


@pytest.mark.slow
def test_fit_without_a_logger(tmp_path: Path) -> None:
    """The shipped configs monitor the learning rate; without a logger the monitor is dropped, not a crash."""
    from mobilenets.datasets.synthetic.folder import make_image_folder

    folder = make_image_folder(tmp_path / "folder", ["a", "b"], per_class=2, size=(40, 32))
    argv = ["--config", str(CONFIG_DIR / "folder_finetune.yaml"), "--data.init_args.root", str(folder),
            "--model.init_args.weights", "null", "--model.init_args.width_mult", "0.25",
            "--model.init_args.input_size", "32", "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(["fit", *argv]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------- nothing left behind
def test_export_removes_what_a_killed_export_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exports"
    out.mkdir()
    stale = [out / ".model.onnx.k1ll3d.tmp", out / ".older.onnx.x9y8z7.tmp"]
    kept = [out / ".notes.txt.a1b2c3.tmp", out / "older.onnx"]  # another writer's temporary; a finished file
    for path in stale + kept:
        path.write_bytes(b"partial")
    assert main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(out / "model.onnx")]) == 2
    assert sorted(out.iterdir()) == sorted(kept)
    assert f"removed {stale[0]}, left by an interrupted export" in capsys.readouterr().err


def test_geo_partition_writes_its_csv_and_geojson_as_a_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mobilenets.datasets.s2cells import Partition

    geotags = tmp_path / "geo.csv"
    geotags.write_text(
        "IMG_ID,LAT,LON\n" + "".join(f"{i}.jpg,{48 + i / 100},{2 + i / 100}\n" for i in range(20))
    )
    out = tmp_path / "cells.csv"
    argv = ["geo", "partition", str(geotags), "--out", str(out), "--min-photos", "1"]
    assert main(argv) == 0
    before = out.read_text(), out.with_suffix(".geojson").read_text()

    def crash(self: Partition, path: str | Path) -> None:
        Path(path).write_text('{"type": "Feat')  # half written, then the process dies
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Partition, "write_geojson", crash)
    assert main([*argv, "--max-photos", "5"]) == 2  # a different partition: both files would change
    assert "No space left on device" in one_error_line(capsys, "geo")
    assert (out.read_text(), out.with_suffix(".geojson").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "cells.geojson", "geo.csv"]
