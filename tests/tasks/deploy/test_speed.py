"""The deployment speed report: static TF padding in ONNX exports, the ISA line, real-photo variants,
alternating timing against a peer, and LiteRT running Google's official file beside our export."""

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.weights import load_pretrained
from mobilenets.tasks.cli import main as cli_main
from mobilenets.tasks.deploy import speed, timing
from mobilenets.tasks.deploy.export import export_onnx, sample_inputs
from mobilenets.tasks.deploy.speed import (
    LiteRTModel,
    _ExportAdapter,
    cpu_isa,
    litert_report,
    photo_variants,
)
from mobilenets.tasks.deploy.timing import SpeedRow, measure_alternating

DATA = Path(__file__).resolve().parents[2] / "data"


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("size", [32, 48])
def test_tf_padding_exports_as_plain_convolutions_and_the_model_keeps_its_dynamic_padding(
    tmp_path: Path, size: int
) -> None:
    model = MobileNetV1(num_classes=4, width_mult=0.25, activation="relu6", padding="tf").eval()
    bigger = sample_inputs(size + 16, 1)
    with torch.no_grad():
        before = model(bigger)
    out = tmp_path / "tf.onnx"
    result = export_onnx(_ExportAdapter(model, size), out)  # verified against PyTorch at batch 1 and 3
    assert result.max_rel_diff < 1e-4
    # no shape arithmetic, no Pad: the asymmetric TF pads live in the convolutions' own pads
    assert _ops(out) == {"Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm"}
    pads = {
        tuple(a.ints)
        for n in onnx.load(str(out)).graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "pads"
    }
    assert (0, 0, 1, 1) in pads and (1, 1, 1, 1) in pads
    graph = onnx.load(str(out)).graph
    read = {name for node in graph.node for name in node.input}
    assert [i.name for i in graph.initializer if i.name not in read] == []  # the Pads' constants went too
    with torch.no_grad():  # the exporter's fixed pads were undone: another input size still works
        assert torch.equal(model(bigger), before)


def test_isa_line_names_vector_and_int8_instructions() -> None:
    assert cpu_isa({"avx2", "fma"}) == "AVX2, no AVX-512, no VNNI; int8 weights 7-bit"
    assert cpu_isa({"avx2", "avx512f", "avx512_vnni"}) == "AVX2, AVX-512, AVX512-VNNI; int8 weights 8-bit"
    assert (
        cpu_isa({"avx2", "avx_vnni", "amx_int8"})
        == "AVX2, no AVX-512, AVX-VNNI, AMX-INT8; int8 weights 8-bit"
    )


def test_photo_variants_are_reproducible_scaled_crops() -> None:
    photo = np.asarray(Image.open(DATA / "cat_160.png").convert("RGB"))
    first = photo_variants([photo], 40, 6, seed=1)
    assert first.shape == (6, 3, 40, 40) and first.dtype == np.float32
    assert first.min() >= -1.0 and first.max() <= 1.0 and first.std() > 0.1
    assert np.array_equal(first, photo_variants([photo], 40, 6, seed=1))
    assert not np.allclose(first, photo_variants([photo], 40, 6, seed=2))
    assert len({round(float(v.mean()), 4) for v in first}) == 6  # six different crops


def test_alternating_rounds_time_every_runtime_in_turn_and_give_the_ratio_to_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def fake_time_calls(fn, repeats, warmup=2, budget_s=30.0):  # the seconds each fake call "takes"
        return [fn() for _ in range(repeats)]

    def runner(name: str, seconds: float):
        return lambda: calls.append(name) or seconds

    monkeypatch.setattr(timing, "time_calls", fake_time_calls)
    rows = measure_alternating("m", [("peer", runner("peer", 0.004)), ("ours", runner("ours", 0.002))], 6, 3)
    assert calls == ["peer", "peer", "ours", "ours"] * 3
    assert [r.runtime for r in rows] == ["peer", "ours"]
    assert rows[0].vs_peer is None and rows[1].vs_peer == pytest.approx(2.0)
    assert rows[1].images_per_s_b1 == pytest.approx(500.0)


def test_passes_count_the_slow_calls_a_median_call_would_hide(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]

    def costing(seconds: list[float]):
        turn = itertools.cycle(seconds)

        def call() -> None:
            clock[0] += next(turn)

        return call

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    # one call in four also runs float: 1 ms, 1 ms, 1 ms, 5 ms
    routed, plain = costing([0.001, 0.001, 0.001, 0.005]), costing([0.002])
    rows = measure_alternating("m", [("peer", plain), ("routed", routed)], rounds=3, per_pass=4)
    assert rows[0].images_per_s_b1 == pytest.approx(500.0)
    # one warm-up call, then a whole pass of four: 8 ms (the median call, 1 ms, would say 1,000 img/s)
    assert rows[1].images_per_s_b1 == pytest.approx(500.0) and rows[1].vs_peer == pytest.approx(1.0)


@pytest.mark.slow
def test_litert_and_our_export_of_googles_file_both_see_the_egyptian_cat(tmp_path: Path) -> None:
    official = DATA / "mobilenet_v1_0.5_160_quant.tflite"
    cat = np.asarray(Image.open(DATA / "cat_160.png").convert("RGB"), np.float32)
    image = (cat.transpose(2, 0, 1) / 127.5 - 1.0)[None].astype(np.float32)
    peer = LiteRTModel(official, threads=1).outputs(image)
    model = MobileNetV1(num_classes=1000, width_mult=0.5, activation="relu6", padding="tf").eval()
    load_pretrained(model, official)
    out = tmp_path / "ours.onnx"
    export_onnx(_ExportAdapter(model, 160), out)
    ours = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": image})[0]
    assert peer.shape == ours.shape == (1, 1000)  # LiteRT's background class 0 dropped
    egyptian_cat = 285  # 286 in the file's 1001 classes
    assert int(peer.argmax()) == int(ours.argmax()) == egyptian_cat


@pytest.mark.slow
def test_litert_report_times_the_peer_beside_our_fp32_and_int8(tmp_path: Path) -> None:
    rows, lines = litert_report(threads=(1,), tflite_dir=tmp_path, widths=(0.25, 0.5), quick=True, log=print)
    # 0.25-128 is built in; 0.5-160 is looked for in tflite_dir only, so it is reported missing
    expected = [
        "LiteRT XNNPACK, Google's uint8 file (peer), 1T",
        "ONNX Runtime fp32, 1T",
        f"ONNX Runtime int8 ({speed.int8_weight_bits()}-bit weights), 1T",
    ]
    if speed.needs_high_precision_int8():  # no VNNI: the exact 8-bit alternative is timed too
        expected.append("ONNX Runtime int8 (8-bit weights, x64quantprecision), 1T")
    assert [r.runtime for r in rows] == expected
    assert all(isinstance(r, SpeedRow) and r.images_per_s_b1 for r in rows)
    assert rows[0].vs_peer is None and all(r.vs_peer for r in rows[1:])
    assert any(line.startswith("0.25 MobileNet-128: top-1 agreement: ours int8 (") for line in lines)
    assert (
        f"0.5 MobileNet-160: skipped, {tmp_path / 'mobilenet_v1_0.5_160_quant.tflite'} not found" in lines[-1]
    )


def test_bench_refuses_malformed_thread_counts(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--litert-threads", "1,two"])
    assert exit_info.value.code == 2
    assert "--litert-threads: expected comma-separated thread counts, got '1,two'" in capsys.readouterr().err
