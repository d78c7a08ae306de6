import pytest

from mobilenets.tasks.cli import demo, main


def test_every_task_has_a_demo_step() -> None:
    assert list(demo.DEMO_STEPS) == [
        "profile",
        "classification",
        "detection",
        "attributes",
        "geolocation",
        "faces",
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
