import pytest

from mobilenets.tasks.cli import LIGHTNING_COMMANDS, PROJECT_COMMANDS, main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]:
        assert f"  {name} " in out


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_profile_backbone(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--width-mult", "0.5", "--input-size", "160"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split() == ["0.5", "MobileNet-160", "76.5", "1.33", "76", "1.3"]
    assert main(["profile", "--width-mult", "0.3"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-2:] == ["-", "-"]


def test_profile_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "Shallow MobileNet" in out and "0.50 MobileNet-160" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--width-mult", "0"], "--width-mult must be > 0, got 0.0"),
        (["--input-size", "16"], "--input-size must be at least 32, got 16"),
    ],
)
def test_profile_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["profile", *argv])
    assert message in capsys.readouterr().err


def test_profile_config_errors_name_the_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer: {}\n")
    for path, message in (
        (bad, f"{bad}: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        (empty, f"{empty}: expected a 'model:' section"),
        (tmp_path / "missing.yaml", f"{tmp_path / 'missing.yaml'}: config file not found"),
    ):
        assert main(["profile", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mobilenets profile: error: {message}") and len(err.splitlines()) == 1
