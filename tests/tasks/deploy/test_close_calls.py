"""Close-call routing: an int8 classifier whose narrow calls the float model answers, in one ONNX graph, and
``export --int8``'s fallback that chooses the margin on the held-out images."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.datasets.images import images_in_folder
from mobilenets.datasets.synthetic.calibration import make_calibration_patterns
from mobilenets.tasks.classification import ImageClassifier
from mobilenets.tasks.cli import main as cli_main
from mobilenets.tasks.deploy import export as export_module
from mobilenets.tasks.deploy.close_calls import (
    close_call_margin,
    route_close_calls,
    routed_share,
    top_two_margins,
)
from mobilenets.tasks.deploy.export import (
    conv_layers,
    export_onnx,
    onnx_metadata,
    ort_session,
    preprocess_images,
    quantize_onnx,
    run_onnx,
    sample_inputs,
)
from mobilenets.tasks.deploy.speed import _ExportAdapter, delta_orthogonal_
from mobilenets.tasks.deploy.timing import SpeedRow

SIZE = 32


def test_the_margin_hands_every_flipped_image_to_float() -> None:
    reference = np.array([[2.0, 1.0, 0.0], [1.0, 1.2, 0.0], [0.0, 3.0, 2.7], [5.0, 0.0, 4.0]], np.float32)
    quantized = np.array([[2.0, 1.5, 0.0], [1.3, 1.0, 0.0], [0.0, 2.9, 2.95], [5.0, 0.0, 4.0]], np.float32)
    assert top_two_margins(quantized) == pytest.approx([0.5, 0.3, 0.05, 1.0])
    margin = close_call_margin(reference, quantized)
    # rows 1 and 2 flipped, with int8 margins 0.3 and 0.05: the margin lies just above 0.3
    assert margin is not None and 0.3 < margin < 0.3001
    assert routed_share(quantized, margin) == 0.5  # rows 1 and 2; row 0 (0.5) keeps int8
    assert close_call_margin(reference, reference) is None
    tie = np.array([[1.0, 1.0]], np.float32)
    assert close_call_margin(np.array([[0.0, 1.0]], np.float32), tie) > 0  # a tie is routed too


@pytest.fixture(scope="module")
def float_and_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    torch.manual_seed(0)
    network = MobileNetV1(num_classes=50, width_mult=0.25, activation="relu6").eval()
    delta_orthogonal_(network)
    folder = tmp_path_factory.mktemp("routing")
    float_path, int8_path = folder / "float.onnx", folder / "int8.onnx"
    export_onnx(_ExportAdapter(network, SIZE), float_path)
    images = sample_inputs(SIZE, 24).numpy()
    quantize_onnx(float_path, int8_path, images, images, min_agreement=0.0, weight_bits=8)
    return float_path, int8_path, images


def test_the_routed_graph_takes_float_exactly_on_the_close_calls(
    float_and_int8: tuple[Path, Path, np.ndarray], tmp_path: Path
) -> None:
    float_path, int8_path, images = float_and_int8
    reference = run_onnx(ort_session(float_path), images)[0]
    quantized = run_onnx(ort_session(int8_path), images)[0]
    margins = top_two_margins(quantized)
    middle = float(np.median(margins))
    for margin, expected_float_rows in ((0.0, np.zeros(len(images), bool)), (middle, margins < middle)):
        out = tmp_path / f"routed-{margin}.onnx"
        model = route_close_calls(onnx.load(str(int8_path)), onnx.load(str(float_path)), margin)
        onnx.checker.check_model(model)
        onnx.save(model, str(out))
        session = ort_session(out)
        routed = run_onnx(session, images)[0]
        assert 0 < expected_float_rows.sum() < len(images) or margin == 0.0
        # float runs on the close calls alone, a smaller batch: its sums may round differently
        np.testing.assert_allclose(routed[expected_float_rows], reference[expected_float_rows], atol=1e-5)
        np.testing.assert_array_equal(routed[~expected_float_rows], quantized[~expected_float_rows])
        # an image's answer does not depend on its batch
        one_by_one = np.concatenate([run_onnx(session, images[i : i + 1])[0] for i in range(len(images))])
        np.testing.assert_allclose(one_by_one, routed, atol=1e-5)
        assert [o.name for o in session.get_outputs()] == ["output"]
    assert onnx_metadata(out) == onnx_metadata(int8_path)


@pytest.fixture
def unsure_classifier(tmp_path: Path, save_checkpoint: Callable) -> tuple[Path, list[str]]:
    """An untrained 100-class checkpoint (its logits lie close together, so int8 flips many) and the
    ``export --int8`` arguments for it, with calibration and held-out pattern folders and a floor of 1."""
    torch.manual_seed(0)
    task = ImageClassifier(num_classes=100, width_mult=0.25, input_size=SIZE)
    ckpt = save_checkpoint(task, tmp_path / "tiny.ckpt")
    calibration, heldout = tmp_path / "calibration", tmp_path / "heldout"
    make_calibration_patterns(calibration, per_class=2, num_classes=5, size=SIZE + 8, seed=3)
    make_calibration_patterns(heldout, per_class=4, num_classes=5, size=SIZE + 8, seed=4)
    argv = ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "int8.onnx"), "--int8"]
    argv += ["--calibration", str(calibration), "--heldout", str(heldout), "--min-agreement", "1.0"]
    return ckpt, argv


def test_cli_routes_close_calls_of_a_classifier_to_float(
    tmp_path: Path, unsure_classifier: tuple[Path, list[str]], capsys: pytest.CaptureFixture
) -> None:
    ckpt, argv = unsure_classifier
    out = tmp_path / "int8.onnx"
    assert cli_main([*argv, "--float-fallback", "off"]) != 0
    assert "is below the floor 1.0; not written" in capsys.readouterr().err and not out.exists()
    assert cli_main([*argv, "--float-fallback", "close-calls"]) == 0
    assert "routing close calls" in capsys.readouterr().out
    metadata = onnx_metadata(out)
    assert metadata["int8_float_fallback"].startswith(
        "float on close calls: int8 top-two logit margin below "
    )
    assert float(metadata["int8_close_call_margin"]) > 0
    # the int8 file's own keys stay
    assert metadata["int8_weight_bits"] in ("7", "8") and "int8_bias_correction" in metadata
    images = preprocess_images(images_in_folder(tmp_path / "heldout", "held-out"), metadata)
    float_path = tmp_path / "float.onnx"
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(float_path)]) == 0
    reference = run_onnx(ort_session(float_path), images)[0]
    np.testing.assert_array_equal(run_onnx(ort_session(out), images)[0].argmax(1), reference.argmax(1))


def test_close_calls_need_a_classifier(
    tmp_path: Path, save_checkpoint: Callable, capsys: pytest.CaptureFixture
) -> None:
    from mobilenets.tasks.faces.embedding import FaceEmbedder

    ckpt = save_checkpoint(FaceEmbedder(width_mult=0.25, input_size=SIZE), tmp_path / "faces.ckpt")
    folder = tmp_path / "calibration"
    make_calibration_patterns(folder, per_class=2, num_classes=5, size=SIZE + 8, seed=3)
    argv = ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "int8.onnx"), "--int8"]
    argv += ["--calibration", str(folder), "--float-fallback", "close-calls"]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert (
        "close-calls needs a classifier's logits as the one output; this model has output_kind embedding"
        in error
    )
    assert "Traceback" not in error


@pytest.mark.parametrize("first_7_speed", [2000.0, 1050.0])
def test_auto_keeps_the_fastest_routed_model_and_breaks_ties_by_closeness_to_float(
    tmp_path: Path,
    unsure_classifier: tuple[Path, list[str]],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    first_7_speed: float,
) -> None:
    _, argv = unsure_classifier
    timed: list[list[str]] = []

    def first_7_at(model: str, runs: list, rounds: int = 5, per_pass: int | None = None) -> list[SpeedRow]:
        # the real runs are called once each (the routed models load and answer); the clock is made up
        for _, run in runs:
            run()
        timed.append([label for label, _ in runs])
        speeds = {label: first_7_speed if label.startswith("first 7 ") else 1000.0 for label, _ in runs}
        return [SpeedRow(model, label, speeds[label], None, None, None) for label, _ in runs]

    monkeypatch.setattr(export_module, "measure_alternating", first_7_at)
    assert cli_main(argv) == 0
    # none, a quarter (7 of 27) and half (14) of the convolutions in float, each routed where still short
    assert [label.split(" of ")[0] for label in timed[0]] == ["none", "first 7", "first 14"]
    printed = capsys.readouterr().out
    divergence = {
        line.split(": ")[1].split(" of ")[0]: float(line.rsplit("mean KL ", 1)[1])
        for line in printed.splitlines()
        if "images/s (batch 1, 1 thread), mean KL" in line
    }
    assert set(divergence) == {"none", "first 7", "first 14"}
    # 2000 beats the rest; 1050 ties with 1000 (within 10 %), and the closest to float wins
    closest = min(divergence.values())
    allowed = ["first 7"] if first_7_speed == 2000.0 else [k for k, v in divergence.items() if v == closest]
    out = tmp_path / "int8.onnx"
    fallback = onnx_metadata(out)["int8_float_fallback"]
    chosen = "none" if fallback.startswith("float on close calls") else fallback.split(" of ")[0]
    assert chosen in allowed
    if chosen != "none":
        count = int(chosen.split()[1])
        assert onnx_metadata(out)["int8_float_layers"].split(",")[:count] == conv_layers(out)[:count]
