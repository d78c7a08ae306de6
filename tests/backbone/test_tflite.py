"""Google's TFLite MobileNet v1 files as backbone weights: they reproduce LiteRT's own outputs within the
quantization noise, bad files fail clearly, and folded batch norm can be re-estimated without changing
eval outputs."""

from __future__ import annotations

import copy
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import tflite
import torch
from ai_edge_litert.interpreter import Interpreter
from PIL import Image
from torch import nn

from mobilenets.backbone.inference import (
    FOLDED_BATCHNORM_ATTR,
    folded_batchnorm_names,
    reestimate_folded_batchnorm,
)
from mobilenets.backbone.mobilenet import ConvBNAct, MobileNetV1
from mobilenets.backbone.tflite import OFFICIAL_DIR, TFLiteFormatError, dequantize, read_tflite
from mobilenets.backbone.weights import PretrainedWeightsError, filter_tflite, load_pretrained

# small models: one thread is as fast, and two collapse when another process shares the two CI cores
pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
#: CI keeps the shared weights beside the clone (../shared); the 3 MB extractor is not copied into tests.
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "weights" / "tflite"
OFFICIAL_025 = OFFICIAL_DIR / "mobilenet_v1_0.25_128_quant.tflite"
FILE_050 = DATA / "mobilenet_v1_0.5_160_quant.tflite"
EXTRACTOR = SHARED / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
TFLITE_OPTIONS = dict(activation="relu6", padding="tf")
LOGGER = "mobilenets.backbone.weights"
EGYPTIAN_CAT = 285  # 286 in the 1001-line label file, whose line 0 is "background"

# Measured on 6 images (cat, bird, flips, crops) with the 0.25-128 file: our float model vs LiteRT's uint8
# run differs by at most 0.60 in the logits (mean 0.11; one uint8 step of the logits is 0.13). With the
# activations rounded to the file's uint8 grids as LiteRT does, the difference falls to 0.23 (1.8 steps).
FLOAT_LOGIT_TOLERANCE = 1.0
FLOAT_MEAN_TOLERANCE = 0.2
EMULATED_LOGIT_TOLERANCE = 0.4


# ------------------------------------------------------------------------------------------ helpers
def _image(name: str, size: int) -> np.ndarray:
    """A test image as uint8 (H, W, 3), resized with nearest neighbour like pycoral's test."""
    with Image.open(DATA / f"{name}_160.png") as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.NEAREST)
        return np.asarray(image)


def _few_images(size: int) -> np.ndarray:
    """Cat and bird, mirrored, and a bilinear zoom into each: 6 uint8 images (N, H, W, 3)."""
    images = [_image("cat", size), _image("bird", size)]
    images += [image[:, ::-1] for image in images[:2]]
    for name in ("cat", "bird"):
        with Image.open(DATA / f"{name}_160.png") as image:
            zoom = image.convert("RGB").crop((20, 20, 140, 140)).resize((size, size), Image.BILINEAR)
            images.append(np.asarray(zoom))
    return np.stack([np.ascontiguousarray(image) for image in images])


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the float (N, 3, H, W) in [-1, 1) that the file's input quantization means."""
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float().sub(128.0).div(128.0)


def _model(path: Path | str, **options) -> MobileNetV1:
    model = MobileNetV1(**{**TFLITE_OPTIONS, **options})
    load_pretrained(model, path)
    return model.eval()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _operators(data: bytes) -> tuple[tflite.Model, tflite.SubGraph, list[tuple[str, tflite.Operator]]]:
    model = tflite.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    ops = []
    for index in range(graph.OperatorsLength()):
        op = graph.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        ops.append((names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())], op))
    return model, graph, ops


def _quantization(graph: tflite.SubGraph, tensor: int) -> tuple[float, int]:
    q = graph.Tensors(tensor).Quantization()
    return float(q.Scale(0)), int(q.ZeroPoint(0))


def _output_tensor(path: Path, tensor: str) -> tuple[int, float, int]:
    """(index, scale, zero point) of the graph's output or of its logits (the softmax input)."""
    _, graph, ops = _operators(path.read_bytes())
    if tensor == "logits":
        index = next(int(op.Inputs(0)) for name, op in ops if name == "SOFTMAX")
    else:
        index = int(graph.Outputs(0))
    return (index, *_quantization(graph, index))


def _litert(path: Path, images: np.ndarray, tensor: str = "output") -> np.ndarray:
    """LiteRT's uint8 run of ``path``, dequantized: the graph output, or the logits (the softmax input)."""
    index, scale, zero = _output_tensor(path, tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # preserving intermediate tensors is "for debugging"
        interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True, num_threads=1)
    interpreter.allocate_tensors()
    outputs = []
    for image in images:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        outputs.append(scale * (interpreter.get_tensor(index).astype(np.float64).reshape(-1) - zero))
    return np.stack(outputs)


def _emulate_uint8_activations(model: MobileNetV1, path: Path) -> None:
    """Round every layer's output to the file's uint8 grid, as LiteRT does, with forward hooks."""
    _, graph, ops = _operators(path.read_bytes())
    grids = [
        _quantization(graph, int(op.Outputs(0)))
        for name, op in ops
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D")
    ]
    layers = [m for m in model.modules() if isinstance(m, ConvBNAct)] + [model.global_pool]

    def rounding(scale: float, zero: int):
        return lambda _m, _i, out: (torch.clamp(torch.round(out / scale) + zero, 0, 255) - zero) * scale

    for layer, grid in zip(layers, grids):
        layer.register_forward_hook(rounding(*grid))


def _table_field(table: object, vtable_offset: int) -> int:
    """Absolute position of a stored scalar field of a flatbuffer table (``_tab`` of generated code)."""
    tab = table._tab  # type: ignore[attr-defined]
    relative = tab.Offset(vtable_offset)
    assert relative, "the field is not stored in this file"
    return tab.Pos + relative


def _patched(data: bytes, edits: list[tuple[int, str, int]]) -> bytes:
    out = bytearray(data)
    for position, fmt, value in edits:
        struct.pack_into(fmt, out, position, value)
    return bytes(out)


def _body_only(data: bytes) -> bytes:
    """The classifier file with the pool as the graph output: what an embedding extractor holds."""
    _, graph, ops = _operators(data)
    pooled = next(int(op.Outputs(0)) for name, op in ops if name == "AVERAGE_POOL_2D")
    outputs = graph._tab.Vector(graph._tab.Offset(8))  # SubGraph.outputs, field 2
    return _patched(data, [(outputs, "<i", pooled)])


def _with_operator(data: bytes, old: str, new: str) -> bytes:
    """Every ``old`` operator turned into ``new`` (the operator-code table's entry rewritten)."""
    model, _, _ = _operators(data)
    codes = vars(tflite.BuiltinOperator)
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == codes[old]:
            edits = [(_table_field(code, 4), "<b", codes[new])]  # deprecated_builtin_code
            if code._tab.Offset(10):  # builtin_code, when the writer stored it
                edits.append((_table_field(code, 10), "<i", codes[new]))
            return _patched(data, edits)
    raise AssertionError(f"no {old} operator")


def _with_tensor_type(data: bytes, operator: int, type_name: str) -> tuple[bytes, str]:
    """The weight tensor of ``operator`` retyped (Tensor.type, field 1); returns the file and its name."""
    _, graph, ops = _operators(data)
    tensor = graph.Tensors(int(ops[operator][1].Inputs(1)))
    patched = _patched(data, [(_table_field(tensor, 6), "<b", vars(tflite.TensorType)[type_name])])
    return patched, tensor.Name().decode().split(";")[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


# ------------------------------------------------------------------------------- against LiteRT
def test_official_weights_reproduce_litert_logits() -> None:
    images = _few_images(128)
    expected = _litert(OFFICIAL_025, images, "logits")[:, 1:]  # LiteRT's class 0 is background
    model = _model("official:0.25_128", num_classes=1000, width_mult=0.25)
    logits = _run(model, _to_input(images)).double().numpy()
    difference = np.abs(logits - expected)
    assert difference.max() < FLOAT_LOGIT_TOLERANCE and difference.mean() < FLOAT_MEAN_TOLERANCE
    # LiteRT's uint8 logits tie now and then (cat: tiger cat = tabby): our top-1 is one of its best
    step = _output_tensor(OFFICIAL_025, "logits")[1]
    ours = logits.argmax(1)
    assert (expected[np.arange(len(ours)), ours] >= expected.max(1) - 2 * step).all()
    # the whole difference is the uint8 rounding of the activations: emulate it and it nearly vanishes
    _emulate_uint8_activations(model, OFFICIAL_025)
    emulated = _run(model, _to_input(images)).double().numpy()
    assert np.abs(emulated - expected).max() < EMULATED_LOGIT_TOLERANCE
    assert (emulated.argmax(1) == expected.argmax(1)).sum() >= 5


def test_pycoral_expectation_egyptian_cat_through_our_model() -> None:
    labels = (DATA / "imagenet_labels.txt").read_text().splitlines()
    model = _model(FILE_050, num_classes=1000, width_mult=0.5)
    scores = torch.softmax(_run(model, _to_input(_image("cat", 160)[None])), dim=1)[0]
    assert int(scores.argmax()) == EGYPTIAN_CAT and labels[EGYPTIAN_CAT + 1] == "Egyptian cat"
    assert float(scores[EGYPTIAN_CAT]) > 0.67


def test_body_only_file_loads_headless_and_reproduces_litert_features(tmp_path: Path) -> None:
    body_only = tmp_path / "mobilenet_v1_0.25_128_body.tflite"
    body_only.write_bytes(_body_only(OFFICIAL_025.read_bytes()))
    assert read_tflite(body_only).classifier is None
    images = _few_images(128)[:3]
    model = _model(body_only, num_classes=0, width_mult=0.25)
    features = _run(model, _to_input(images)).double().numpy()
    expected = _litert(body_only, images)
    assert features.shape == expected.shape == (3, 256)
    # measured: max 0.25, mean 0.04, cosine > 0.999 (uint8 step of the pool 0.0235, features up to 6)
    assert np.abs(features - expected).max() < 0.4 and np.abs(features - expected).mean() < 0.08
    cosine = _cosine(features, expected)
    assert cosine.min() > 0.998
    assert len(getattr(model, FOLDED_BATCHNORM_ATTR)) == 27


@pytest.mark.skipif(not EXTRACTOR.is_file(), reason=f"needs {EXTRACTOR} (../shared beside the clone)")
def test_official_embedding_extractor_reproduces_litert_features() -> None:
    images = np.stack([_image("cat", 224), _image("bird", 224)])
    model = _model(EXTRACTOR, num_classes=0, width_mult=1.0)
    features = _run(model, _to_input(images)).double().numpy()
    expected = _litert(EXTRACTOR, images)
    assert features.shape == expected.shape == (2, 1024)
    assert np.abs(features - expected).max() < 0.3  # measured 0.17 (uint8 step 0.0235, values up to 4.7)
    cosine = _cosine(features, expected)
    assert cosine.min() > 0.999


# --------------------------------------------------------------------------------------- mapping
def test_filter_maps_the_folded_layers_onto_the_backbone() -> None:
    model = MobileNetV1(num_classes=1000, width_mult=0.25, bn_eps=1e-3, **TFLITE_OPTIONS)
    network = read_tflite(OFFICIAL_025)
    state = filter_tflite(network, model)
    own = model.state_dict()
    assert set(state) == {key for key in own if not key.endswith("num_batches_tracked")}
    assert all(state[key].shape == own[key].shape for key in state)
    assert torch.equal(state["classifier.weight"], network.classifier.weight[1:])  # background dropped
    block = "blocks.block13.pw"
    assert torch.equal(state[f"{block}.conv.weight"], network.body[-1].weight)
    assert torch.equal(state[f"{block}.bn.bias"], network.body[-1].bias)
    assert torch.allclose(state[f"{block}.bn.weight"], torch.full((256,), (1 + 1e-3) ** 0.5))
    assert not state[f"{block}.bn.running_mean"].any() and (state[f"{block}.bn.running_var"] == 1).all()
    # the dequantized stem is the file's uint8 kernel, OHWI -> OIHW
    _, graph, ops = _operators(OFFICIAL_025.read_bytes())
    kernel = graph.Tensors(int(ops[0][1].Inputs(1)))
    scale, zero = _quantization(graph, int(ops[0][1].Inputs(1)))
    raw = network.body[0].weight.permute(0, 2, 3, 1) / scale + zero
    assert tuple(kernel.ShapeAsNumpy()) == tuple(raw.shape)
    assert torch.allclose(raw, raw.round(), atol=1e-3)
    assert filter_tflite(OFFICIAL_025.read_bytes(), model).keys() == state.keys()


def test_loading_logs_the_dropped_classifier_and_the_mismatched_options(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = MobileNetV1(num_classes=10, width_mult=0.25, activation="relu", padding="torch")
    head = model.classifier.weight.clone()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_pretrained(model, "official:0.25_128")
    messages = [record.getMessage() for record in caplog.records]
    warning = next(m for m in messages if "will not reproduce" in m)
    assert "padding='torch'" in warning and "activation='relu'" in warning and "'relu6'" in warning
    assert "bn_eps" not in warning  # folded batch norm is reproduced exactly for any ε
    assert any("dropping the file's 1000-class classifier" in m and "10 classes" in m for m in messages)
    assert not any("background" in m for m in messages)
    assert torch.equal(model.classifier.weight, head)
    headless = _model("official:0.25_128", num_classes=0, width_mult=0.25)
    assert _run(headless, torch.zeros(1, 3, 128, 128)).shape == (1, 256)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        shallow = _model("official:0.25_128", num_classes=1000, width_mult=0.25, shallow=True)
    assert any("background class 0" in record.getMessage() for record in caplog.records)
    assert len(folded_batchnorm_names(shallow)) == 27 - 10  # blocks 7-11 skipped


def test_unknown_builtin_weights_list_the_known_ones() -> None:
    with pytest.raises(PretrainedWeightsError, match=r"official:0\.3_100.*official:0\.25_128"):
        load_pretrained(MobileNetV1(width_mult=0.25), "official:0.3_100")


def test_per_channel_and_per_tensor_dequantization() -> None:
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    per_channel = dequantize(values, np.array([0.5, 1.0, 2.0]), np.array([1, 2, 3]), 1, "t")
    expected = (values.astype(np.float64) - np.array([1, 2, 3])[:, None]) * np.array([0.5, 1, 2])[:, None]
    assert per_channel.dtype == np.float32 and np.array_equal(per_channel, expected)
    assert np.array_equal(dequantize(values, np.array([0.5]), np.array([4]), 0, "t"), (values - 4.0) * 0.5)
    int8 = dequantize(np.array([[-128, 127]], dtype=np.int8), np.array([0.1, 0.2]), np.zeros(2), 1, "t")
    assert np.allclose(int8, [[-12.8, 25.4]])
    with pytest.raises(TFLiteFormatError, match=r"w\.tflite: tensor 'k'.*2 scales.*3 channels"):
        dequantize(values, np.array([1.0, 2.0]), np.zeros(2), 1, "w.tflite: tensor 'k'")


# ----------------------------------------------------------------------------------- bad files
def _bad_file(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """A file that must not load into an α 0.25 backbone, and what its error message must name."""
    data = OFFICIAL_025.read_bytes()
    path = tmp_path / f"{kind}.tflite"
    if kind == "other_width":
        return FILE_050, [
            str(FILE_050),
            "'stem.conv.weight'",
            "MobilenetV1/MobilenetV1/Conv2d_0/Conv2D_Fold",
            "(16, 3, 3, 3)",
            "(8, 3, 3, 3)",
        ]
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return path, [str(path), "truncated"]
    if kind == "operator":
        path.write_bytes(_with_operator(data, "AVERAGE_POOL_2D", "MAX_POOL_2D"))
        return path, [str(path), "operator 27 (MAX_POOL_2D)", "not part of MobileNet v1"]
    if kind == "quantization":
        patched, name = _with_tensor_type(data, 1, "INT4")
        path.write_bytes(patched)
        return path, [str(path), f"tensor {name!r}", "INT4", "cannot dequantize"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["other_width", "truncated", "operator", "quantization"])
def test_bad_files_fail_naming_file_and_tensor_and_change_nothing(kind: str, tmp_path: Path) -> None:
    path, named = _bad_file(kind, tmp_path)
    model = MobileNetV1(num_classes=1000, width_mult=0.25, **TFLITE_OPTIONS)
    load_pretrained(model, "official:0.25_128")
    before = _state(model)
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(model, path)
    message = str(error.value)
    assert "\n" not in message
    for part in named:
        assert part in message, f"{part!r} not in {message!r}"
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert len(getattr(model, FOLDED_BATCHNORM_ATTR)) == 27  # still the loaded file's


# ----------------------------------------------------------------------------------- batch norm
def test_reestimated_batchnorm_keeps_eval_outputs_and_normalises_in_training() -> None:
    model = _model("official:0.25_128", num_classes=1000, width_mult=0.25, dropout=0.0)
    images = _to_input(_few_images(96))  # any size works for this; smaller is faster
    upside_down = images.flip(2)[:2]  # not among the images the statistics are measured on
    everything = torch.cat([images, upside_down])

    def train_mode_features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # on a copy: training mode updates the running statistics
            return copy.deepcopy(model).train().forward_features(x)

    with torch.no_grad():
        features_before = model.forward_features(everything)
        logits_before = model.forward_head(features_before)
    # folded batch norm in training mode normalises away everything the folded weights computed
    assert (train_mode_features(images) - features_before[:6]).abs().max() > 1.0

    report = reestimate_folded_batchnorm(model, [images[:3], (images[3:], torch.zeros(3))])
    assert len(report) == 27 and not folded_batchnorm_names(model) and not model.training
    assert report["stem.bn"].samples == 6 * 48 * 48

    norms = {name: model.get_submodule(name) for name in report}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        norm.register_forward_pre_hook(lambda _m, i, name=name: inputs.__setitem__(name, i[0][:6]))
        for name, norm in norms.items()
    ]
    logits_after = _run(model, everything)
    for hook in hooks:
        hook.remove()
    assert (logits_after - logits_before).abs().max() < 1e-4
    # the running statistics are those of each convolution's output over the images: they normalise it
    for name, norm in norms.items():
        x = inputs[name].transpose(0, 1).flatten(1).double()
        mean, var = norm.running_mean.double()[:, None], norm.running_var.double()[:, None]
        normalised = (x - mean) / (var + norm.eps).sqrt()
        assert normalised.mean(1).abs().max() < 1e-3, name
        live = x.var(1) > 100 * norm.eps  # channels that never fire cannot be scaled to unit variance
        assert (normalised[live].var(1, unbiased=False) - 1).abs().max() < 1e-3, name
    # so training mode (batch statistics) now computes what eval mode does on these images
    assert (train_mode_features(images) - features_before[:6]).abs().max() < 1e-3


def test_reestimation_needs_folded_batchnorm() -> None:
    with pytest.raises(ValueError, match="no batch norm carries folded statistics"):
        reestimate_folded_batchnorm(MobileNetV1(width_mult=0.25), [torch.zeros(1, 3, 64, 64)])
