"""int8 quantisation: weight bits chosen from the CPU's VNNI, recorded in the metadata; weights that lie on a
grid quantised exactly; layers the quantiser cannot reach and calibration folders without images are errors
that name them."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.datasets.synthetic.calibration import make_calibration_patterns
from mobilenets.tasks.classification import ImageClassifier
from mobilenets.tasks.cli import main as cli_main
from mobilenets.tasks.deploy import export as export_module
from mobilenets.tasks.deploy.export import (
    AgreementReport,
    ExportError,
    conv_layers,
    cpu_flags,
    export_onnx,
    int8_weight_bits,
    onnx_metadata,
    quantize_onnx,
    run_onnx,
    sample_inputs,
    shortest_float_prefix,
    unquantized_layers,
)
from mobilenets.tasks.deploy.qat import grid_weight_scales
from mobilenets.tasks.deploy.speed import _ExportAdapter, delta_orthogonal_

SIZE = 32


@pytest.mark.parametrize(
    ("flags", "bits"),
    [
        ({"sse4_2", "avx2", "fma"}, 7),
        ({"avx2", "avx512f", "avx512bw"}, 7),  # AVX-512 without VNNI still adds pairs in int16
        ({"avx2", "avx512f", "avx512_vnni"}, 8),
        ({"avx2", "avx_vnni"}, 8),
        ({"avx2", "amx_int8"}, 8),
        (set(), 7),
    ],
)
def test_weight_bits_are_8_only_with_vnni(flags: set[str], bits: int) -> None:
    assert int8_weight_bits(flags) == bits


def test_cpu_flags_read_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_vnni\n\nflags : x\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    network = MobileNetV1(num_classes=5, width_mult=0.25, activation="relu6").eval()
    delta_orthogonal_(network)
    path = tmp_path_factory.mktemp("float") / "float.onnx"
    export_onnx(_ExportAdapter(network, SIZE), path)
    return path


def _weight_ranges(path: Path) -> list[int]:
    """max |int8 weight| of every quantised Conv/Gemm weight."""
    graph = onnx.load(str(path)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return [
        int(np.abs(initializers[node.input[0]].astype(np.int32)).max())
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and initializers[node.input[0]].dtype == np.int8
    ]


@pytest.mark.parametrize("bits", [7, 8])
def test_weight_bits_set_the_range_and_the_metadata(float_model: Path, tmp_path: Path, bits: int) -> None:
    images = sample_inputs(SIZE, 8).numpy()
    out = tmp_path / "int8.onnx"
    report = quantize_onnx(float_model, out, images, images, min_agreement=0.0, weight_bits=bits)
    metadata = onnx_metadata(out)
    assert metadata["int8_weight_bits"] == str(bits)
    assert metadata["quantization"] == f"int8 static QDQ per-channel ({bits}-bit weights)"
    assert report.measure == "top-1 agreement"
    # the stem and the first depthwise layer stay float for speed, the classifier (the output) for accuracy
    kept = ["/stem/conv/Conv", "/blocks/block1/dw/conv/Conv", "/classifier/Gemm"]
    assert unquantized_layers(out) == [f"{name} ({name.rsplit('/', 1)[1]})" for name in kept]
    assert unquantized_layers(out, kept) == []
    ranges = _weight_ranges(out)
    assert len(ranges) == 25  # every other convolution
    assert metadata["int8_float_layers"] == ",".join(kept)
    # per channel, the largest weight takes the top code: 64 with 7 bits (ORT: [-64, 64]), 127 with 8
    assert max(ranges) == (64 if bits == 7 else 127)


class EinsumLayer(nn.Module):
    """A 1x1 convolution written as an einsum: an operator onnxruntime's int8 quantiser leaves in float."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,oc->bohw", self.stem(x), self.mix).mean((2, 3))


def test_a_layer_the_quantiser_cannot_reach_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    float_path = tmp_path / "float.onnx"
    export_onnx(_ExportAdapter(EinsumLayer().eval(), SIZE), float_path)
    images = sample_inputs(SIZE, 4).numpy()
    out = tmp_path / "int8.onnx"
    with pytest.raises(ExportError, match=r"cannot reach 1 layer\(s\), first /Einsum \(Einsum\)"):
        quantize_onnx(float_path, out, images, images, min_agreement=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx"]


def test_cli_calibration_folder_without_images_names_the_folder(
    tmp_path: Path, save_checkpoint: Callable, capsys: pytest.CaptureFixture
) -> None:
    task = ImageClassifier(num_classes=3, width_mult=0.25, input_size=SIZE)
    ckpt = save_checkpoint(task, tmp_path / "tiny.ckpt")
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "int8.onnx"
    argv = ["export", "--ckpt_path", str(ckpt), "--out", str(out), "--int8", "--calibration", str(empty)]
    assert cli_main(argv) != 0
    assert f"{empty}: --calibration holds no images" in capsys.readouterr().err
    assert not out.exists()


def _precision_entry(session) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry("session.x64quantprecision")
    except RuntimeError:  # onnxruntime's answer for an entry that was never set
        return None


@pytest.mark.parametrize(
    ("flags", "bits", "entry"),
    [
        ({"sse2", "avx2"}, 8, "1"),  # 8-bit weights without VNNI: the non-saturating kernels
        ({"sse2", "avx2"}, 7, None),  # 7-bit weights cannot saturate
        ({"sse2", "avx2", "avx512_vnni"}, 8, None),  # VNNI adds in int32
        (set(), 8, None),  # not x86
    ],
)
def test_sessions_of_8_bit_exports_avoid_int16_saturation_only_where_it_happens(
    float_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: set[str],
    bits: int,
    entry: str | None,
) -> None:
    images = sample_inputs(SIZE, 4).numpy()
    out = tmp_path / "int8.onnx"
    quantize_onnx(float_model, out, images, images, min_agreement=0.0, weight_bits=bits)
    monkeypatch.setattr(export_module, "cpu_flags", lambda: flags)
    assert export_module.needs_high_precision_int8() is ("sse2" in flags and "avx512_vnni" not in flags)
    assert _precision_entry(export_module.ort_session(out)) == entry
    assert _precision_entry(export_module.ort_session(float_model)) is None  # float models: never


def test_grid_weight_scales_take_the_grid_step_where_the_integers_fit() -> None:
    step = 0.0173
    integers = torch.randint(-100, 101, (6, 4, 3, 3), generator=torch.Generator().manual_seed(0)).double()
    integers[0].view(-1)[0], integers[1].view(-1)[0] = 127, -200  # channel 1 needs more than 8 bits
    scales = grid_weight_scales((integers * step).float(), 127)
    assert scales is not None
    expected = [step] * 6
    expected[1] = 200 * step / 127  # max-based: its integers do not fit
    assert torch.allclose(scales.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    assert grid_weight_scales((integers * step).float(), 64) is None  # no channel fits 7 bits: max-based
    # a grid of its own per channel, as batch norm re-estimated on int8 weights and folded in gives
    channel_steps = torch.linspace(0.01, 0.05, 6, dtype=torch.float64)
    per_channel = grid_weight_scales(
        (integers.clamp(-100, 100) * channel_steps[:, None, None, None]).float(), 127
    )
    assert per_channel is not None and torch.allclose(per_channel.double(), channel_steps, rtol=1e-5)
    off_grid = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    assert grid_weight_scales(off_grid, 127) is None


def test_weights_that_lie_on_a_grid_are_quantised_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = MobileNetV1(num_classes=5, width_mult=0.25, activation="relu6").eval()
    delta_orthogonal_(network)
    with torch.no_grad():  # as Google's int8 files give them: integer multiples of one step per tensor
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                step = float(module.weight.abs().max()) / 90
                module.weight.copy_((module.weight / step).round() * step)
    float_path, out = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    export_onnx(_ExportAdapter(network, SIZE), float_path)
    images = sample_inputs(SIZE, 4).numpy()
    quantize_onnx(float_path, out, images, images, min_agreement=0.0, weight_bits=8)
    assert onnx_metadata(out)["int8_grid_weight_layers"] == "25"
    float_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(float_path)).graph.initializer}
    graph = onnx.load(str(out)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    compared = 0
    for node in graph.node:
        name = node.input[0].removesuffix("_quantized")
        is_weight = name in float_weights and float_weights[name].ndim == 4 and node.input[0] != name
        if node.op_type == "DequantizeLinear" and is_weight:
            scale = initializers[node.input[1]].reshape(-1, *[1] * (float_weights[name].ndim - 1))
            restored = initializers[node.input[0]].astype(np.float32) * scale
            # float32 rounding only: a second rounding onto max-based scales errs by up to max |w| / 254
            largest = float(np.abs(float_weights[name]).max())
            np.testing.assert_allclose(restored, float_weights[name], rtol=0, atol=1e-4 * largest)
            compared += 1
    assert compared == 25
    quantize_onnx(float_path, out, images, images, min_agreement=0.0, weight_bits=8, grid_weights=False)
    assert onnx_metadata(out)["int8_grid_weight_layers"] == "0"


def test_the_shortest_float_prefix_is_found_by_bisection() -> None:
    tried: list[int] = []

    def meets(count: int) -> bool:
        tried.append(count)
        return count >= 9

    assert shortest_float_prefix(meets, 2, 26) == 9
    assert tried[0] == 26 and len(tried) <= 6  # the longest first, then halving 24 counts
    tried.clear()
    assert shortest_float_prefix(lambda c: meets(c - 20), 2, 26) is None
    assert tried == [6]  # the longest fell short: nothing more to search


def test_a_float_prefix_keeps_the_first_convolutions_in_float_and_comes_closer(
    float_model: Path, tmp_path: Path
) -> None:
    images = sample_inputs(SIZE, 8).numpy()
    reference = run_onnx(export_module.ort_session(float_model), images)[0]
    convs = conv_layers(float_model)
    errors = []
    for count in (2, 14, 26):
        out = tmp_path / f"int8-{count}.onnx"
        quantize_onnx(float_model, out, images, images, min_agreement=0.0, weight_bits=8, float_prefix=count)
        kept = onnx_metadata(out)["int8_float_layers"].split(",")
        assert kept[:count] == convs[:count] and len(kept) == count + 1  # and the classifier
        assert len(unquantized_layers(out, kept)) == 0
        errors.append(float(np.abs(run_onnx(export_module.ort_session(out), images)[0] - reference).mean()))
    assert errors[2] < errors[1] < errors[0]


def test_cli_keeps_first_layers_in_float_until_the_floor_is_met(
    tmp_path: Path, save_checkpoint: Callable, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = ImageClassifier(num_classes=3, width_mult=0.25, input_size=SIZE)
    ckpt = save_checkpoint(task, tmp_path / "tiny.ckpt")
    folder = tmp_path / "calibration"
    make_calibration_patterns(folder, per_class=2, num_classes=5, size=SIZE + 8, seed=3)
    real_quantize = export_module.quantize_onnx

    def agreeing_from_nine(
        *args: object, float_prefix: int | None = None, **kwargs: object
    ) -> AgreementReport:
        # the real quantisation, its agreement told: the floor is met from 9 float layers on
        report = real_quantize(*args, float_prefix=float_prefix, **kwargs)  # type: ignore[arg-type]
        met = float_prefix is not None and float_prefix >= 9
        return AgreementReport(report.kind, report.measure, 1.0 if met else 0.5, report.images)

    monkeypatch.setattr(export_module, "quantize_onnx", agreeing_from_nine)
    out = tmp_path / "int8.onnx"
    argv = ["export", "--ckpt_path", str(ckpt), "--out", str(out), "--int8", "--calibration", str(folder)]
    argv += ["--float-fallback", "first-layers"]
    assert cli_main([*argv, "--min-agreement", "0.99"]) == 0
    printed = capsys.readouterr().out
    assert "is below the floor 0.99; searching" in printed
    # every 5th of 10 patterns held out: 2 images, far from what can show 0.99
    assert (
        "note: 2 held-out images can show an agreement of at most 0.000 (95 % confidence, none flipping); "
        "0.99 takes 300 or more (--heldout)" in printed
    )
    metadata = onnx_metadata(out)
    convs = metadata["int8_float_layers"].split(",")[:-1]
    assert (
        len(convs) == 9
        and metadata["int8_float_fallback"] == "first 9 of 27 convolutions in float (floor 0.99)"
    )
    assert convs == conv_layers(out)[:9]  # the written model is the one the search stopped at
    out.unlink()
    assert cli_main([*argv, "--min-agreement", "1.01"]) != 0  # met by no float prefix
    error = capsys.readouterr().err
    assert "with all but the last of the 27 convolutions in float" in error  # MobileNet v1: 27
    assert "not written (export it without --int8)" in error and not out.exists()
    assert cli_main([*argv, "--min-agreement", "0.99", "--float-fallback", "off"]) != 0
    assert "is below the floor 0.99; not written" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--float-fallback", "off"])
    assert exit_info.value.code == 2
    assert "--float-fallback needs --int8" in capsys.readouterr().err


def test_top1_agreement_tells_how_close_float_was_on_the_flipped_images() -> None:
    reference = np.array([[2.0, 1.0, 0.0], [1.0, 1.02, 0.0], [0.0, 3.0, 2.7], [5.0, 0.0, 0.0]], np.float32)
    quantized = np.array([[2.0, 1.0, 0.0], [1.03, 1.0, 0.0], [0.0, 2.9, 2.95], [5.0, 0.0, 0.0]], np.float32)
    report = export_module.agreement("logits", [reference], [quantized])
    assert report.value == 0.5
    assert report.detail == "2 flipped; float's top-two logit margin there: median 0.160, largest 0.300"
    assert export_module.agreement("logits", [reference], [reference]).detail == ""
