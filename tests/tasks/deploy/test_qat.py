"""Preparing a network for int8: quantisation-aware fine-tuning and bias correction each bring the int8 export
closer to the ORIGINAL float model than plain post-training quantisation, leave the float model alone, and
are recorded in the metadata."""

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from mobilenets.backbone.inference import fold_batchnorm, recalibrate_batchnorm
from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.weights import load_pretrained
from mobilenets.datasets.synthetic.calibration import make_calibration_patterns
from mobilenets.tasks.classification import ImageClassifier
from mobilenets.tasks.cli import main as cli_main
from mobilenets.tasks.deploy.export import (
    export_for_int8,
    export_onnx,
    onnx_metadata,
    ort_session,
    quantize_onnx,
    run_onnx,
    sample_inputs,
    torch_modules_of,
)
from mobilenets.tasks.deploy.qat import correct_bias, fake_quantized, input_ranges, qat_finetune
from mobilenets.tasks.deploy.speed import _ExportAdapter, delta_orthogonal_, photo_variants, real_photos

SIZE = 32


@pytest.fixture(scope="module")
def network() -> nn.Module:
    torch.manual_seed(0)
    model = MobileNetV1(num_classes=5, width_mult=0.25, activation="relu6").eval()
    delta_orthogonal_(model, generator=torch.Generator().manual_seed(0))
    # batch norms normalise every layer (a random network's activations fade out with depth otherwise) and
    # the head gives logits of a trained one's scale, a few units: rounding that QAT can reduce
    recalibrate_batchnorm(model, [sample_inputs(SIZE, 16, seed=7)])
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_finetuning_leaves_the_float_model_and_no_fake_quantisation_behind(network: nn.Module) -> None:
    folded = fold_batchnorm(network)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    images = sample_inputs(SIZE, 8).numpy()
    tuned = qat_finetune(folded, images, epochs=1, weight_bits=8)
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())
    assert not any(parametrize.is_parametrized(m) for m in tuned.modules())
    assert not any(m._forward_pre_hooks for m in tuned.modules())
    assert set(tuned.state_dict()) == set(before)  # a plain network: exports like the original
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(before[k], v)]
    assert "stem.conv.weight" in changed
    with pytest.raises(ValueError, match="weight_bits must be 7 or 8"):
        qat_finetune(folded, images, epochs=1, weight_bits=6)


def test_input_ranges_are_the_minmax_of_each_layer_input(network: nn.Module) -> None:
    folded = fold_batchnorm(network)
    images = sample_inputs(SIZE, 4)
    stem = folded.stem.conv
    ((low, high),) = input_ranges(folded, [stem], images, batch_size=3)
    assert (low, high) == (float(images.min()), float(images.max()))


def test_finetuned_int8_is_closer_to_the_original_float_model(network: nn.Module, tmp_path: Path) -> None:
    images = sample_inputs(SIZE, 32).numpy()
    float_path, tuned_path = tmp_path / "float.onnx", tmp_path / "tuned.onnx"
    export_onnx(_ExportAdapter(network, SIZE), float_path)
    export_for_int8(
        _ExportAdapter(network, SIZE), float_path, tuned_path, images, 8, 6, 1e-4, bias_correction=False
    )
    reference = run_onnx(ort_session(float_path), images)[0]
    errors = []
    for source in (float_path, tuned_path):
        out = tmp_path / f"{source.stem}.int8.onnx"
        quantize_onnx(source, out, images, images, 0.0, 8, reference_path=float_path)
        errors.append(float(np.abs(run_onnx(ort_session(out), images)[0] - reference).mean()))
    assert errors[1] < 0.9 * errors[0], errors  # 0.49 -> 0.41 when written


def test_output_layers_map_to_their_modules(network: nn.Module, tmp_path: Path) -> None:
    folded = fold_batchnorm(network)
    assert torch_modules_of(folded, ["/classifier/Gemm", "/blocks/block3/pw/conv/Conv", "/nowhere/Op"]) == [
        folded.classifier,
        folded.blocks.block3.pw.conv,
    ]


def test_cli_records_qat_in_the_metadata_and_refuses_it_without_int8(
    tmp_path: Path, save_checkpoint: Callable, capsys: pytest.CaptureFixture
) -> None:
    task = ImageClassifier(num_classes=3, width_mult=0.25, input_size=SIZE)
    ckpt = save_checkpoint(task, tmp_path / "tiny.ckpt")
    out = tmp_path / "int8.onnx"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--qat-epochs", "1"])
    assert exit_info.value.code == 2
    assert "--qat-epochs needs --int8" in capsys.readouterr().err
    folder = tmp_path / "calibration"
    make_calibration_patterns(folder, per_class=2, num_classes=5, size=SIZE + 8, seed=3)
    argv = ["export", "--ckpt_path", str(ckpt), "--out", str(out), "--int8", "--calibration", str(folder)]
    assert cli_main([*argv, "--qat-epochs", "1", "--min-agreement", "0"]) == 0
    metadata = onnx_metadata(out)
    assert metadata["int8_qat_epochs"] == "1"
    assert metadata["int8_qat_lr"] == "0.0001"
    assert metadata["int8_bias_correction"] in ("on (auto)", "off (auto)")
    kept = "kept" if metadata["int8_bias_correction"] == "on (auto)" else "left out"
    printed = capsys.readouterr().out
    assert f"int8 bias correction {kept}: " in printed  # quantised both ways, the better kept
    assert printed.count("quantisation-aware fine-tuning: epoch 1/1") == 1  # one fine-tuning for both
    for choice in ("on", "off"):
        assert cli_main([*argv, "--bias-correction", choice, "--min-agreement", "0"]) == 0
        assert onnx_metadata(out)["int8_bias_correction"] == choice
        assert "int8_qat_epochs" not in onnx_metadata(out)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--bias-correction", "off"])
    assert exit_info.value.code == 2
    assert "--bias-correction needs --int8" in capsys.readouterr().err


def _conv_means(network: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    means: list[torch.Tensor] = []
    handles = [c.register_forward_hook(lambda _, __, out: means.append(out.mean((0, 2, 3)))) for c in convs]
    with torch.no_grad():
        network(images)
    for handle in handles:
        handle.remove()
    return means


def test_bias_correction_cancels_the_mean_shift_of_int8_rounding_layer_by_layer(network: nn.Module) -> None:
    folded = fold_batchnorm(network)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    images = sample_inputs(SIZE, 16)
    corrected = correct_bias(folded, images.numpy(), weight_bits=8)
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())
    assert not any(parametrize.is_parametrized(m) for m in corrected.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in corrected.modules())
    changed = {k for k, v in corrected.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith(".bias") for k in changed), changed
    reference = _conv_means(folded, images)
    shifts = []
    for candidate in (folded, corrected):
        simulated = copy.deepcopy(candidate)
        with fake_quantized(folded, simulated, images, 8):
            means = _conv_means(simulated, images)
        shifts.append(max(float((m - r).abs().max()) for m, r in zip(means, reference)))
    assert shifts[1] < 0.05 * shifts[0], shifts


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_real_int8_comes_closer_to_float_on_real_photos(tmp_path: Path, fine_tuned: bool) -> None:
    # Google's 0.25-128 weights on crops of the test photos: the real statistics bias correction is for. As
    # read, the weights lie on the int8 file's grid; "fine-tuned" ones (nudged off it) cannot use that.
    model = MobileNetV1(1000, 0.25, activation="relu6", padding="tf").eval()
    load_pretrained(model, "official:0.25_128")
    if fine_tuned:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    photos = real_photos(tmp_path)  # no official files there: the test data's photos
    calibration, heldout = photo_variants(photos, 128, 48, seed=1), photo_variants(photos, 128, 64, seed=2)
    adapter = _ExportAdapter(model, 128)
    float_path, corrected_path = tmp_path / "float.onnx", tmp_path / "corrected.onnx"
    export_onnx(adapter, float_path)
    export_for_int8(adapter, float_path, corrected_path, calibration, 8)
    reference = torch.from_numpy(run_onnx(ort_session(float_path), heldout)[0]).log_softmax(1)
    divergences = []
    for source, grid in ((float_path, False), (float_path, True), (corrected_path, True)):
        out = tmp_path / "int8.onnx"
        quantize_onnx(source, out, calibration, heldout, 0.0, 8, float_path, grid_weights=grid)
        quantized = torch.from_numpy(run_onnx(ort_session(out), heldout)[0]).log_softmax(1)
        divergences.append(float((reference.exp() * (reference - quantized)).sum(1).mean()))
    plain, grid, default = divergences
    if fine_tuned:
        assert grid == pytest.approx(plain, rel=1e-6), divergences  # off the grid: max-based scales
        assert default < 0.5 * plain, divergences
    else:
        assert grid < 0.25 * plain and default < grid, divergences


def test_finetuning_weights_that_lie_on_a_grid_says_it_moves_them_off(
    network: nn.Module, tmp_path: Path
) -> None:
    official = MobileNetV1(1000, 0.25, activation="relu6", padding="tf").eval()
    load_pretrained(official, "official:0.25_128")
    notes: dict[str, list[str]] = {}
    for name, model, size in (("official", official, 128), ("random", network, SIZE)):
        adapter = _ExportAdapter(model, size)
        float_path = tmp_path / f"{name}.onnx"
        export_onnx(adapter, float_path)
        images = sample_inputs(size, 4).numpy()
        lines: list[str] = []
        export_for_int8(adapter, float_path, tmp_path / f"{name}.qat.onnx", images, 8, 1, log=lines.append)
        notes[name] = [line for line in lines if "lie on an int8 grid" in line]
    assert len(notes["official"]) == 1 and notes["official"][0].startswith("note: 25 layers' weights")
    assert notes["random"] == []
