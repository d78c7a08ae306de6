"""Google's MobileNet v1 TFLite files (``mobilenet_v1_*_quant.tflite``) read as float backbone weights.

The released TFLite MobileNets are the TF-slim models with batch norm folded into each convolution (a
weight and an int32 bias per layer), quantized to uint8 (scale and zero point per tensor, or per channel in
newer files), ReLU6 fused into the convolutions, TensorFlow "SAME" padding and inputs in [-1, 1].

``read_tflite`` parses the flatbuffer with the ``tflite`` package (the generated binding of TFLite's
schema), walks the operators that produce the graph's output in order and returns a
:class:`TFLiteMobileNet`: the 27 convolutions of the body (stem, then depthwise/pointwise of the 13
separable blocks) and the classifier, dequantized to float32 and transposed to PyTorch's layout. Anything
that is not MobileNet v1 (another operator, a branch, another stride pattern, a quantization scheme it
cannot dequantize) fails with a :class:`TFLiteFormatError` that names the file and the operator or tensor.

``mobilenets.backbone.weights.load_pretrained`` recognises these files by their content and maps the
layers onto the backbone's keys (``filter_tflite``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.backbone.mobilenet import BLOCK_SPECS

#: The flatbuffer file identifier of TFLite models, at bytes 4-8 of the file.
TFLITE_IDENTIFIER = b"TFL3"
#: ImageNet classifiers of the TF-slim release have a "background" class 0 before the 1000 classes.
CLASSES_WITH_BACKGROUND = 1001
#: The convolutions of the MobileNet v1 body: the stem, then depthwise and pointwise of each block.
BODY_CONVOLUTIONS = 1 + 2 * len(BLOCK_SPECS)

#: ``weights: official:<name>``: the TFLite files shipped inside the package (see official/README.md).
OFFICIAL_PREFIX = "official:"
OFFICIAL_DIR = Path(__file__).resolve().parent / "official"
OFFICIAL_WEIGHTS: dict[str, str] = {"0.25_128": "mobilenet_v1_0.25_128_quant.tflite"}


class TFLiteFormatError(MobilenetsError, ValueError):
    """A TFLite file that is not a MobileNet v1 this reader understands; the message names the file."""


@dataclass(frozen=True)
class FoldedConv:
    """One convolution of the file with its batch norm folded in, dequantized, in PyTorch's layout.

    ``weight`` is (out, in, kH, kW), or (channels, 1, kH, kW) for a depthwise convolution; ``bias`` is the
    folded batch norm's shift. ``activation`` is the fused one (``relu6`` or ``relu``).
    """

    operator: int
    depthwise: bool
    weight: torch.Tensor
    bias: torch.Tensor
    weight_name: str
    bias_name: str
    stride: int
    padding: str
    activation: str


@dataclass(frozen=True)
class TFLiteClassifier:
    """The classifier of the file as a (classes, features) weight and a bias, class 0 included."""

    operator: int
    weight: torch.Tensor
    bias: torch.Tensor
    weight_name: str
    bias_name: str


@dataclass(frozen=True)
class TFLiteMobileNet:
    """The float weights of a MobileNet v1 TFLite file (see ``read_tflite``).

    ``input_range`` is the float value the file gives to uint8 inputs 0 and 255 (``(-1.0, 0.9921875)`` for
    the released files), or None for float inputs.
    """

    source: str
    body: tuple[FoldedConv, ...]
    classifier: TFLiteClassifier | None
    input_size: tuple[int, int]
    input_range: tuple[float, float] | None

    @property
    def activation(self) -> str:
        """The activation of the body (every body convolution has the same one)."""
        return self.body[0].activation

    @property
    def num_classes(self) -> int:
        """Outputs of the file's classifier (1001 with the background class), 0 for a body-only file."""
        return 0 if self.classifier is None else int(self.classifier.weight.shape[0])


def is_tflite(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a TFLite flatbuffer (identifier ``TFL3`` at bytes 4-8)."""
    return len(head) >= 8 and head[4:8] == TFLITE_IDENTIFIER


# ------------------------------------------------------------------------------------ dequantizing
def dequantize(
    values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, what: str
) -> np.ndarray:
    """``scale · (values − zero_point)`` as float32, per tensor (one scale) or per channel along ``axis``.

    ``what`` names the tensor in the error raised for scales that fit neither scheme.
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    zero_point = np.asarray(zero_point, dtype=np.float64).reshape(-1)
    if zero_point.size == 0:
        zero_point = np.zeros(1)
    if scale.size == 0:
        raise TFLiteFormatError(f"{what}: an integer tensor without a quantization scale")
    if scale.size > 1 or zero_point.size > 1:
        if not 0 <= axis < values.ndim:
            raise TFLiteFormatError(f"{what}: quantized_dimension {axis} of a {values.ndim}-D tensor")
        channels = values.shape[axis]
        if scale.size != channels or zero_point.size not in (1, channels):
            raise TFLiteFormatError(
                f"{what}: {scale.size} scales and {zero_point.size} zero points for {channels} channels "
                f"along dimension {axis} (expected one per channel, or one for the tensor)"
            )
        shape = [1] * values.ndim
        shape[axis] = channels
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape if zero_point.size > 1 else [1] * values.ndim)
    return (scale * (values.astype(np.float64) - zero_point)).astype(np.float32)


def _enum_names(enum: type) -> dict[int, str]:
    return {value: name for name, value in vars(enum).items() if not name.startswith("_")}


# TFLite tensor types as little-endian numpy types; other types (INT4, STRING, ...) are not weights we read
_NUMPY_TYPES = {
    "FLOAT32": "<f4",
    "FLOAT16": "<f2",
    "FLOAT64": "<f8",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "u1",
    "INT8": "i1",
    "INT16": "<i2",
}
_PASS_THROUGH = ("RESHAPE", "SQUEEZE", "SOFTMAX", "QUANTIZE", "DEQUANTIZE")
_SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "MEAN", "FULLY_CONNECTED", *_PASS_THROUGH)
#: Fused activations of the body as the backbone's ``activation`` option.
_ACTIVATIONS = {"RELU6": "relu6", "RELU": "relu"}


# ---------------------------------------------------------------------------------------- reading
class _Graph:
    """The first subgraph of a TFLite model with the constant tensors dequantized on demand."""

    def __init__(self, data: bytes, source: str) -> None:
        import tflite  # the schema binding: ~0.2 s to import, so only when a TFLite file is read

        self.tflite = tflite
        self.data = data
        self.source = source
        self.model = tflite.Model.GetRootAs(data, 0)
        if self.model.SubgraphsLength() < 1:
            raise TFLiteFormatError(f"{source}: the TFLite model has no subgraph")
        self.graph = self.model.Subgraphs(0)
        self.operator_names = _enum_names(tflite.BuiltinOperator)
        self.type_names = _enum_names(tflite.TensorType)
        self.activation_names = _enum_names(tflite.ActivationFunctionType)
        self.padding_names = _enum_names(tflite.Padding)
        self.constants: dict[int, np.ndarray] = {}

    # tensors
    def name(self, index: int) -> str:
        """The tensor's name as the converter wrote it, up to the first ';' (fused ops append theirs)."""
        raw = self.graph.Tensors(index).Name()
        name = raw.decode("utf8", "replace").split(";")[0] if raw else ""
        return name or f"tensor {index}"

    def shape(self, index: int) -> tuple[int, ...]:
        tensor = self.graph.Tensors(index)
        return tuple(int(n) for n in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()

    def _raw(self, index: int) -> np.ndarray | None:
        """The tensor's stored values in its own type, or None for a tensor without data (an activation)."""
        tensor = self.graph.Tensors(index)
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer is None:
            return None
        if buffer.Offset() > 1:  # files over 2 GB keep the data after the flatbuffer
            raw: Any = self.data[buffer.Offset() : buffer.Offset() + buffer.Size()]
        elif buffer.DataLength():
            raw = buffer.DataAsNumpy()
        else:
            return None
        type_name = self.type_names.get(tensor.Type(), str(tensor.Type()))
        what = f"{self.source}: tensor {self.name(index)!r}"
        if type_name not in _NUMPY_TYPES:
            raise TFLiteFormatError(
                f"{what} has type {type_name}, which this reader cannot dequantize "
                f"(expected one of {', '.join(_NUMPY_TYPES)})"
            )
        if tensor.Sparsity() is not None:
            raise TFLiteFormatError(f"{what} is stored sparse, which this reader does not support")
        dtype = np.dtype(_NUMPY_TYPES[type_name])
        shape = self.shape(index)
        expected = math.prod(shape) * dtype.itemsize
        if len(raw) != expected:
            raise TFLiteFormatError(
                f"{what} holds {len(raw)} bytes, expected {expected} for shape {shape} of {type_name} "
                f"(truncated or corrupt file?)"
            )
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape)

    def has_data(self, index: int) -> bool:
        """Whether the tensor is a constant stored in the file (weights, biases, shapes)."""
        if index in self.constants:
            return True
        buffer = self.model.Buffers(self.graph.Tensors(index).Buffer())
        return buffer is not None and (buffer.Offset() > 1 or buffer.DataLength() > 0)

    def constant(self, index: int) -> np.ndarray | None:
        """The float32 value of a constant tensor (dequantized), or None for an activation."""
        if index in self.constants:
            return self.constants[index]
        raw = self._raw(index)
        if raw is None:
            return None
        what = f"{self.source}: tensor {self.name(index)!r}"
        if raw.dtype.kind == "f":
            value = raw.astype(np.float32)
        else:
            quantization = self.graph.Tensors(index).Quantization()
            if quantization is None or quantization.ScaleLength() == 0:
                raise TFLiteFormatError(
                    f"{what} is {raw.dtype} without a quantization scale: cannot tell its float values"
                )
            if quantization.DetailsType() != 0:
                raise TFLiteFormatError(
                    f"{what} uses a custom quantization scheme (details type {quantization.DetailsType()}); "
                    "only scale and zero point, per tensor or per channel, are supported"
                )
            value = dequantize(
                raw,
                quantization.ScaleAsNumpy(),
                quantization.ZeroPointAsNumpy() if quantization.ZeroPointLength() else np.zeros(1),
                quantization.QuantizedDimension(),
                what,
            )
        self.constants[index] = value
        return value

    def input_range(self, index: int) -> tuple[float, float] | None:
        tensor = self.graph.Tensors(index)
        quantization = tensor.Quantization()
        if self.type_names.get(tensor.Type()) != "UINT8" or quantization is None:
            return None
        if quantization.ScaleLength() != 1:
            return None
        scale = float(quantization.ScaleAsNumpy()[0])
        zero = float(quantization.ZeroPointAsNumpy()[0]) if quantization.ZeroPointLength() else 0.0
        return (scale * (0 - zero), scale * (255 - zero))

    # operators
    def operator_name(self, operator: Any) -> str:
        code = self.model.OperatorCodes(operator.OpcodeIndex())
        number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = self.operator_names.get(number, f"operator code {number}")
        if name == "CUSTOM" and code.CustomCode():
            name = f"CUSTOM {code.CustomCode().decode('utf8', 'replace')!r}"
        return name

    def options(self, operator: Any, cls: Any) -> Any:
        table = operator.BuiltinOptions()
        if table is None:
            raise TFLiteFormatError(f"{self.source}: operator {self.operator_name(operator)} has no options")
        options = cls()
        options.Init(table.Bytes, table.Pos)
        return options

    def needed_operators(self) -> list[int]:
        """Indices of the operators the graph's outputs depend on, in the file's (execution) order."""
        producer: dict[int, int] = {}
        for index in range(self.graph.OperatorsLength()):
            for tensor in self.graph.Operators(index).OutputsAsNumpy():
                producer[int(tensor)] = index
        needed: set[int] = set()
        pending = [int(t) for t in self.graph.OutputsAsNumpy()]
        while pending:
            operator = producer.get(pending.pop())
            if operator is None or operator in needed:
                continue
            needed.add(operator)
            pending += [int(t) for t in self.graph.Operators(operator).InputsAsNumpy() if t >= 0]
        return sorted(needed)


def read_tflite(source: str | Path | bytes, name: str | None = None) -> TFLiteMobileNet:
    """Read a MobileNet v1 TFLite file (a path, or its bytes) into float32 weights in PyTorch's layout.

    ``name`` is what error messages call the file (its path by default). Fails with a
    :class:`TFLiteFormatError` naming the file and the operator or tensor for anything that is not the
    MobileNet v1 graph (stem, 13 depthwise-separable blocks, global average pool, optional classifier).
    """
    if isinstance(source, bytes | bytearray):
        data, name = bytes(source), name or "<bytes>"
    else:
        data, name = Path(source).read_bytes(), name or str(source)
    if not is_tflite(data[:8]):
        raise TFLiteFormatError(
            f"{name}: not a TFLite file (no {TFLITE_IDENTIFIER.decode()!r} identifier at bytes 4-8)"
        )
    (root,) = struct.unpack_from("<I", data, 0)
    if root + 4 > len(data):
        raise TFLiteFormatError(
            f"{name}: truncated TFLite file: its root table starts at byte {root} but the file has "
            f"{len(data)} bytes"
        )
    try:
        return _read_graph(_Graph(data, name))
    except TFLiteFormatError:
        raise
    except Exception as error:  # the flatbuffer accessors fail with whatever a bad offset leads to
        kind = type(error).__qualname__
        if type(error).__module__ not in ("builtins", None):
            kind = f"{type(error).__module__}.{kind}"
        raise TFLiteFormatError(
            f"{name}: cannot parse the TFLite flatbuffer (truncated or corrupt file?): {kind}: {error}"
        ) from error


def _read_graph(graph: _Graph) -> TFLiteMobileNet:
    source = graph.source
    tfl = graph.tflite
    inputs = [int(t) for t in graph.graph.InputsAsNumpy()]
    outputs = [int(t) for t in graph.graph.OutputsAsNumpy()]
    if len(inputs) != 1 or len(outputs) != 1:
        raise TFLiteFormatError(
            f"{source}: the graph has {len(inputs)} inputs and {len(outputs)} outputs; MobileNet v1 has one each"
        )
    input_shape = graph.shape(inputs[0])
    if len(input_shape) != 4:
        raise TFLiteFormatError(f"{source}: input of shape {input_shape}, expected (1, height, width, 3)")

    body: list[FoldedConv] = []
    classifier: TFLiteClassifier | None = None
    pooled = False
    current = inputs[0]  # MobileNet v1 is a chain: every operator takes the previous one's output
    for index in graph.needed_operators():
        operator = graph.graph.Operators(index)
        op_name = graph.operator_name(operator)
        where = f"{source}: operator {index} ({op_name})"
        ins = [int(t) for t in operator.InputsAsNumpy()]
        outs = [int(t) for t in operator.OutputsAsNumpy()]
        if op_name not in _SUPPORTED:
            raise TFLiteFormatError(
                f"{where} is not part of MobileNet v1 (supported: {', '.join(_SUPPORTED)})"
            )
        if op_name == "DEQUANTIZE" and ins and graph.has_data(ins[0]):
            graph.constants[outs[0]] = graph.constant(ins[0])  # float16/int8 weights of a float model
            continue
        data_inputs = [t for t in ins if t >= 0 and not graph.has_data(t)]
        if data_inputs != [current] or len(outs) != 1:
            raise TFLiteFormatError(
                f"{where} takes {[graph.name(t) for t in data_inputs]} rather than the previous layer's "
                f"output {graph.name(current)!r}: not the plain chain of MobileNet v1"
            )
        if op_name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            depthwise = op_name == "DEPTHWISE_CONV_2D"
            options = graph.options(operator, tfl.DepthwiseConv2DOptions if depthwise else tfl.Conv2DOptions)
            weight, bias = _conv_weights(graph, ins, where, depthwise)
            activation = graph.activation_names.get(options.FusedActivationFunction(), "?")
            if options.StrideH() != options.StrideW():
                raise TFLiteFormatError(f"{where}: strides {options.StrideH()}x{options.StrideW()}")
            if options.DilationHFactor() != 1 or options.DilationWFactor() != 1:
                raise TFLiteFormatError(f"{where}: dilated convolution, which MobileNet v1 does not use")
            if pooled and not depthwise and classifier is None:
                if weight.shape[2:] != (1, 1) or activation != "NONE":
                    raise TFLiteFormatError(
                        f"{where}: the classifier after the pool must be a 1x1 convolution without "
                        f"activation, got kernel {tuple(weight.shape[2:])} and {activation}"
                    )
                classifier = TFLiteClassifier(
                    index, weight[:, :, 0, 0].contiguous(), bias, graph.name(ins[1]), _bias_name(graph, ins)
                )
            elif pooled:
                raise TFLiteFormatError(f"{where} after the classifier or the pool: not MobileNet v1")
            else:
                if depthwise:
                    channels = graph.shape(current)[-1]
                    if weight.shape[0] != channels:
                        raise TFLiteFormatError(
                            f"{where}: tensor {graph.name(ins[1])!r} has {weight.shape[0]} channels for "
                            f"{channels} inputs (depth multiplier {weight.shape[0] / channels:g}; "
                            "MobileNet v1 uses 1)"
                        )
                if activation not in _ACTIVATIONS:
                    raise TFLiteFormatError(
                        f"{where}: fused activation {activation}, expected RELU6 (or RELU)"
                    )
                body.append(
                    FoldedConv(
                        operator=index,
                        depthwise=depthwise,
                        weight=weight,
                        bias=bias,
                        weight_name=graph.name(ins[1]),
                        bias_name=_bias_name(graph, ins),
                        stride=options.StrideH(),
                        padding=graph.padding_names.get(options.Padding(), "?"),
                        activation=_ACTIVATIONS[activation],
                    )
                )
        elif op_name in ("AVERAGE_POOL_2D", "MEAN"):
            if pooled:
                raise TFLiteFormatError(f"{where}: a second pool, not MobileNet v1")
            if op_name == "AVERAGE_POOL_2D":
                options = graph.options(operator, tfl.Pool2DOptions)
                size = graph.shape(current)[1:3]
                window = (options.FilterHeight(), options.FilterWidth())
                if window != size:
                    raise TFLiteFormatError(
                        f"{where}: a {window[0]}x{window[1]} pool over a {size[0]}x{size[1]} map is not "
                        "the global average pool of MobileNet v1"
                    )
            pooled = True
        elif op_name == "FULLY_CONNECTED":
            if not pooled or classifier is not None:
                raise TFLiteFormatError(f"{where}: a fully connected layer where MobileNet v1 has none")
            options = graph.options(operator, tfl.FullyConnectedOptions)
            if options.WeightsFormat() != 0:
                raise TFLiteFormatError(f"{where}: shuffled weights format {options.WeightsFormat()}")
            weight = _constant(graph, ins[1], where, dims=2)
            bias = _bias(graph, ins, weight.shape[0], where)
            classifier = TFLiteClassifier(
                index, torch.from_numpy(weight.copy()), bias, graph.name(ins[1]), _bias_name(graph, ins)
            )
        current = outs[0]  # the pass-through operators (reshape, squeeze, softmax, ...) just continue
    _check_body(body, source)
    return TFLiteMobileNet(
        source=source,
        body=tuple(body),
        classifier=classifier,
        input_size=(input_shape[1], input_shape[2]),
        input_range=graph.input_range(inputs[0]),
    )


def _constant(graph: _Graph, index: int, where: str, dims: int) -> np.ndarray:
    value = graph.constant(index)
    if value is None:
        raise TFLiteFormatError(f"{where}: its weights {graph.name(index)!r} are not a constant tensor")
    if value.ndim != dims:
        raise TFLiteFormatError(
            f"{where}: tensor {graph.name(index)!r} has shape {tuple(value.shape)}, expected {dims} dimensions"
        )
    return value


def _bias_name(graph: _Graph, ins: list[int]) -> str:
    return graph.name(ins[2]) if len(ins) > 2 and ins[2] >= 0 else "(no bias)"


def _bias(graph: _Graph, ins: list[int], channels: int, where: str) -> torch.Tensor:
    if len(ins) <= 2 or ins[2] < 0:
        return torch.zeros(channels)
    bias = _constant(graph, ins[2], where, dims=1)
    if bias.shape != (channels,):
        raise TFLiteFormatError(
            f"{where}: bias {graph.name(ins[2])!r} has shape {tuple(bias.shape)}, expected ({channels},)"
        )
    return torch.from_numpy(bias.copy())


def _conv_weights(
    graph: _Graph, ins: list[int], where: str, depthwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a convolution: OHWI -> OIHW, depthwise 1HWC -> C1HW."""
    kernel = torch.from_numpy(_constant(graph, ins[1], where, dims=4).copy())
    if depthwise:
        if kernel.shape[0] != 1:
            raise TFLiteFormatError(
                f"{where}: depthwise kernel {graph.name(ins[1])!r} of shape {tuple(kernel.shape)}, "
                "expected (1, height, width, channels)"
            )
        weight = kernel.permute(3, 0, 1, 2).contiguous()
    else:
        weight = kernel.permute(0, 3, 1, 2).contiguous()
    return weight, _bias(graph, ins, weight.shape[0], where)


def _check_body(body: list[FoldedConv], source: str) -> None:
    """The body is the stem and 13 depthwise/pointwise pairs with Table 1's strides and one activation."""
    if len(body) != BODY_CONVOLUTIONS:
        raise TFLiteFormatError(
            f"{source}: {len(body)} convolutions before the pool, expected {BODY_CONVOLUTIONS} (the stem "
            f"and {len(BLOCK_SPECS)} depthwise-separable blocks of MobileNet v1)"
        )
    expected: list[tuple[bool, int, int]] = [(False, 3, 2)]  # (depthwise, kernel, stride)
    for _, stride in BLOCK_SPECS:
        expected += [(True, 3, stride), (False, 1, 1)]
    for number, (conv, (depthwise, kernel, stride)) in enumerate(zip(body, expected)):
        where = f"{source}: operator {conv.operator} (tensor {conv.weight_name!r})"
        layer = _layer_name(number)
        got = (conv.depthwise, int(conv.weight.shape[-1]), conv.stride)
        if got != (depthwise, kernel, stride):
            raise TFLiteFormatError(
                f"{where}: a {'depthwise' if got[0] else 'plain'} {got[1]}x{got[1]} convolution of stride "
                f"{got[2]} where MobileNet v1's {layer} is a {'depthwise' if depthwise else 'plain'} "
                f"{kernel}x{kernel} convolution of stride {stride}"
            )
        if kernel > 1 and conv.padding != "SAME":
            raise TFLiteFormatError(
                f"{where}: {conv.padding} padding; the backbone reproduces TensorFlow's SAME padding only"
            )
        if conv.activation != body[0].activation:
            raise TFLiteFormatError(
                f"{where}: activation {conv.activation} after {body[0].activation} in the stem; the backbone "
                "has one activation for all layers"
            )


def _layer_name(number: int) -> str:
    """``stem``, ``block1.dw``, ``block1.pw``, ... for the ``number``-th body convolution."""
    if number == 0:
        return "stem"
    return f"block{(number + 1) // 2}.{'dw' if number % 2 else 'pw'}"


def body_module(number: int) -> str:
    """The backbone module (``stem``, ``blocks.block1.dw``, ...) of the ``number``-th body convolution."""
    layer = _layer_name(number)
    return layer if layer == "stem" else f"blocks.{layer}"


def folded_state(
    network: TFLiteMobileNet,
    bn_eps: Callable[[str], float],
    drop_background: bool = True,
) -> dict[str, tuple[str, torch.Tensor]]:
    """``{backbone key: (tensor name in the file, tensor)}`` for the backbone's state dict.

    Each convolution takes the folded weight; its batch norm becomes the identity plus the folded bias:
    weight √(1+ε), bias = folded bias, running mean 0, running var 1, so that eval mode computes exactly
    the TFLite layer (conv + bias) for any ε (``bn_eps(module)`` gives each batch norm's). With
    ``drop_background`` a 1001-class classifier loses class 0 and keeps the 1000 ImageNet classes.
    """
    state: dict[str, tuple[str, torch.Tensor]] = {}
    for number, conv in enumerate(network.body):
        module = body_module(number)
        channels = conv.bias.shape[0]
        eps = bn_eps(f"{module}.bn")
        folded = f"{conv.bias_name} (folded batch norm:"
        state[f"{module}.conv.weight"] = (conv.weight_name, conv.weight)
        state[f"{module}.bn.weight"] = (
            f"{folded} weight √(1+ε))",
            torch.full((channels,), math.sqrt(1 + eps)),
        )
        state[f"{module}.bn.bias"] = (conv.bias_name, conv.bias)
        state[f"{module}.bn.running_mean"] = (f"{folded} mean 0)", torch.zeros(channels))
        state[f"{module}.bn.running_var"] = (f"{folded} var 1)", torch.ones(channels))
    head = network.classifier
    if head is not None:
        weight, bias = head.weight, head.bias
        if drop_background and weight.shape[0] == CLASSES_WITH_BACKGROUND:
            weight, bias = weight[1:].contiguous(), bias[1:].contiguous()
        state["classifier.weight"] = (head.weight_name, weight)
        state["classifier.bias"] = (head.bias_name, bias)
    return state
