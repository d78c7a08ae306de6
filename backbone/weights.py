"""Pretrained weights from local files: timm, Keras (h5), TFLite and this project's own Lightning checkpoints.

``load_pretrained(model, path)`` reads the file without unpickling code (``torch.load(weights_only=True)``,
``safetensors``, ``h5py``, the ``tflite`` flatbuffer binding), recognises its layout and maps its keys with
one pure function per foreign layout (``filter_timm_state_dict``, ``filter_keras_h5``, ``filter_tflite``,
``filter_lightning_checkpoint``), then checks every tensor against the backbone before anything is copied:

- a classifier of another size (or any classifier, for a headless backbone) is dropped with a log line;
- any other tensor of the wrong shape fails with a message naming the first such key and both shapes;
- keys the backbone does not have, or backbone keys the file lacks, fail with both lists.

Errors are :class:`PretrainedWeightsError` (a ``ValueError``) and always name the file.

``official:<name>`` (``official:0.25_128``) loads one of Google's TFLite files shipped in the package. TFLite
files have batch norm folded into the convolutions: ``load_pretrained`` lists the batch norms that carry
the folded form in the backbone's ``folded_batchnorm`` attribute, for
``mobilenets.backbone.inference.reestimate_folded_batchnorm`` to give them real statistics before training.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.backbone.inference import FOLDED_BATCHNORM_ATTR
from mobilenets.backbone.mobilenet import BLOCK_SPECS, SHALLOW_REMOVED_BLOCKS, MobileNetV1
from mobilenets.backbone.tflite import (
    CLASSES_WITH_BACKGROUND,
    OFFICIAL_DIR,
    OFFICIAL_PREFIX,
    OFFICIAL_WEIGHTS,
    TFLiteFormatError,
    TFLiteMobileNet,
    folded_state,
    is_tflite,
    read_tflite,
)

log = logging.getLogger(__name__)

CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
#: The key every MobileNetV1 state dict has, full_conv and shallow included: used to find a backbone.
STEM_KEY = "stem.conv.weight"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"


class PretrainedWeightsError(MobilenetsError, ValueError):
    """A weight file that cannot be read or does not fit the backbone; the message names the file."""


class WeightFileNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """The weight file does not exist."""


@dataclass(frozen=True)
class _Mapped:
    """One tensor of the file under the backbone's key, with the key it had in the file."""

    source_key: str
    tensor: torch.Tensor


# --------------------------------------------------------------------------------------------- timm
def _timm_stage_index() -> dict[tuple[int, int], int]:
    """(timm stage, index in stage) -> our 1-based block number.

    timm's ``mobilenetv1_*`` groups the 13 separable blocks into stages that each start at a stride-2
    block (``blocks.0.0`` .. ``blocks.4.1``), so the grouping follows from Table 1's strides.
    """
    mapping: dict[tuple[int, int], int] = {}
    stage, position = 0, 0
    for number, (_, stride) in enumerate(BLOCK_SPECS, start=1):
        if stride == 2:
            stage, position = stage + 1, 0
        mapping[(stage, position)] = number
        position += 1
    return mapping


_TIMM_BLOCKS = _timm_stage_index()
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(conv_dw|bn1|conv_pw|bn2)\.(.+)$")
_TIMM_BLOCK_PARTS = {"conv_dw": "dw.conv", "bn1": "dw.bn", "conv_pw": "pw.conv", "bn2": "pw.bn"}
_TIMM_TOP_PARTS = {"conv_stem.": "stem.conv.", "bn1.": "stem.bn.", "classifier.": "classifier."}


def _timm_key(key: str) -> str:
    """Our key for one timm ``mobilenetv1_*`` key; unknown keys come back unchanged."""
    match = _TIMM_BLOCK_KEY.match(key)
    if match:
        stage, position, part, leaf = match.groups()
        number = _TIMM_BLOCKS.get((int(stage), int(position)))
        if number is None:
            return key
        return f"blocks.block{number}.{_TIMM_BLOCK_PARTS[part]}.{leaf}"
    for prefix, ours in _TIMM_TOP_PARTS.items():
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    return key


def _strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix shared by all keys."""
    out = dict(state_dict)
    for prefix in ("module.", "_orig_mod."):
        if out and all(key.startswith(prefix) for key in out):
            out = {key[len(prefix) :]: value for key, value in out.items()}
    return out


def _map_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, _Mapped]:
    return {_timm_key(key): _Mapped(key, tensor) for key, tensor in _strip_wrapper_prefix(state_dict).items()}


def filter_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: MobileNetV1
) -> dict[str, torch.Tensor]:
    """Map a timm ``mobilenetv1_100``/``mobilenetv1_125`` state dict onto ``model``'s keys.

    ``conv_stem``/``bn1`` become the stem, ``blocks.i.j.{conv_dw,bn1,conv_pw,bn2}`` the separable
    blocks (timm's stage ``i`` and index ``j``, numbered by Table 1's order), ``classifier`` stays.
    Keys it does not know are passed through unchanged so that the loader reports them.
    """
    del model  # same layout for every width: the shapes are checked by the loader
    return {key: mapped.tensor for key, mapped in _map_timm(state_dict).items()}


# -------------------------------------------------------------------------------------------- Keras
_KERAS_LAYER = re.compile(r"^conv_(dw|pw)_(\d+)(_bn)?$")
_KERAS_PARAMS = {
    "kernel": "weight",
    "depthwise_kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
#: Variable order of Keras 3 ``.weights.h5`` files, which store ``vars/0``, ``vars/1``, ... without names.
_KERAS3_VAR_NAMES = {
    "conv": ("kernel", "bias"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
}

KerasWeights = dict[str, dict[str, np.ndarray]]


def _keras_module(layer: str) -> str | None:
    """Our module path for a Keras MobileNet layer name, or None for a layer we do not know."""
    if layer == "conv1":
        return "stem.conv"
    if layer == "conv1_bn":
        return "stem.bn"
    if layer == "conv_preds":
        return "classifier"
    match = _KERAS_LAYER.match(layer)
    if match:
        kind, number, bn = match.groups()
        return f"blocks.block{int(number)}.{kind}.{'bn' if bn else 'conv'}"
    return None


def _keras_param_name(weight_name: str) -> str:
    """``conv_dw_1/depthwise_kernel:0`` or ``conv_dw_1/kernel`` -> ``depthwise_kernel`` / ``kernel``."""
    return re.sub(r":\d+$", "", weight_name.rsplit("/", 1)[-1])


def _decode(values: Any) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _h5_attribute_list(group: Any, name: str) -> list[str]:
    """A list attribute that Keras may have split into ``name0``, ``name1``, ... chunks."""
    if name in group.attrs:
        return _decode(group.attrs[name])
    values: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in group.attrs:
        values += _decode(group.attrs[f"{name}{chunk}"])
        chunk += 1
    return values


def read_keras_h5(h5: Any) -> KerasWeights:
    """``{layer name: {weight name: array}}`` from an open ``h5py.File``/``Group`` of Keras weights.

    Understands the three layouts Keras writes: the legacy weights-only file (``save_weights`` of
    Keras 2, the layout of the released ``mobilenet_*_tf.h5``: one group per layer with a
    ``weight_names`` attribute such as ``conv_dw_1/depthwise_kernel:0``), the legacy full-model file
    (the same under ``model_weights/``) and Keras 3's ``.weights.h5`` (``layers/<id>/vars/<i>`` with
    the layer name in the ``vars`` group's ``name`` attribute; also inside a ``.keras`` archive).
    """
    if "model_weights" in h5:
        h5 = h5["model_weights"]
    if "layers" in h5 and "layer_names" not in h5.attrs and not _h5_attribute_list(h5, "layer_names"):
        return _read_keras3_weights(h5["layers"])
    weights: KerasWeights = {}
    layer_names = _h5_attribute_list(h5, "layer_names") or list(h5.keys())
    for layer in layer_names:
        if layer not in h5 or not hasattr(h5[layer], "keys"):
            continue
        group = h5[layer]
        names = _h5_attribute_list(group, "weight_names")
        if not names:  # writers that left the attribute out: every dataset below the layer group
            names = []
            group.visititems(
                lambda name, obj, found=names: found.append(name) if hasattr(obj, "shape") else None
            )
        for name in names:
            # a MobileNet nested in a bigger Keras model is saved as one group of ``conv1/kernel``, ... names
            owner = _keras_layer_of(name, default=layer)
            weights.setdefault(owner, {})[_keras_param_name(name)] = np.asarray(group[name])
    return weights


def _keras_layer_of(weight_name: str, default: str) -> str:
    """The MobileNet layer a weight name belongs to (``conv_dw_1/depthwise_kernel:0`` -> ``conv_dw_1``)."""
    parts = weight_name.split("/")
    if len(parts) >= 2 and _keras_module(parts[-2]) is not None:
        return parts[-2]
    return default


def _read_keras3_weights(layers: Any) -> KerasWeights:
    weights: KerasWeights = {}
    for group_name in layers:
        group = layers[group_name]
        if "vars" not in group or not len(group["vars"]):
            continue
        variables = group["vars"]
        layer = str(_decode([variables.attrs.get("name", group_name)])[0])
        kind = "bn" if layer.endswith("_bn") else "conv"
        order = _KERAS3_VAR_NAMES[kind]
        indices = sorted(int(index) for index in variables)
        if len(indices) > len(order):
            raise ValueError(f"layer {layer!r} has {len(indices)} variables, expected at most {len(order)}")
        weights[layer] = {order[i]: np.asarray(variables[str(i)]) for i in indices}
    return weights


def _keras_order(layer: str) -> tuple[int, int, int]:
    """Network order of a Keras MobileNet layer: conv1, conv1_bn, conv_dw_1, conv_dw_1_bn, conv_pw_1, ..."""
    if layer.startswith("conv1"):
        return (0, 0, layer.endswith("_bn"))
    if layer == "conv_preds":
        return (10_000, 0, 0)
    match = _KERAS_LAYER.match(layer)
    if match:
        kind, number, bn = match.groups()
        return (int(number), kind == "pw", bool(bn))
    return (20_000, 0, 0)


def _keras_tensor(module: str, param: str, value: np.ndarray, source: str) -> torch.Tensor:
    """Convert one Keras array to PyTorch's layout (HWIO -> OIHW; depthwise H W C 1 -> C 1 H W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(value))
    if param not in ("kernel", "depthwise_kernel"):
        return tensor
    if tensor.dim() != 4:
        raise ValueError(f"{source}: a convolution kernel must be 4-D, got shape {tuple(tensor.shape)}")
    if module == "classifier":  # conv_preds: a 1x1 convolution with bias == our Linear
        return tensor[0, 0].t().contiguous() if tensor.shape[:2] == (1, 1) else tensor.permute(3, 2, 0, 1)
    if module.endswith("dw.conv"):
        if tensor.shape[3] != 1:
            raise ValueError(f"{source}: depth multiplier {tensor.shape[3]} (only 1 is MobileNet v1)")
        return tensor.permute(2, 3, 0, 1).contiguous()
    return tensor.permute(3, 2, 0, 1).contiguous()


def _map_keras(weights: KerasWeights) -> dict[str, _Mapped]:
    mapped: dict[str, _Mapped] = {}
    for layer in sorted(weights, key=_keras_order):
        module = _keras_module(layer)
        for param, value in weights[layer].items():
            source = f"{layer}/{param}"
            ours = _KERAS_PARAMS.get(param)
            if module is None or ours is None:
                mapped[source] = _Mapped(source, torch.from_numpy(np.ascontiguousarray(value)))
                continue
            mapped[f"{module}.{ours}"] = _Mapped(source, _keras_tensor(module, param, value, source))
    return mapped


def filter_keras_h5(h5file_or_weights: Any, model: MobileNetV1) -> dict[str, torch.Tensor]:
    """Map Keras MobileNet weights (an open h5py file/group, or ``read_keras_h5``'s dict) onto ``model``.

    Layers ``conv1``, ``conv_dw_i``, ``conv_pw_i``, their ``_bn`` and ``conv_preds`` (a 1x1 convolution
    with bias, i.e. our ``Linear``); kernels go from HWIO to OIHW, depthwise kernels from (H, W, C, 1) to
    (C, 1, H, W), batch norm gamma/beta/moving_mean/moving_variance to weight/bias/running_mean/running_var.
    Unknown layers are passed through under ``layer/weight`` so that the loader reports them.
    """
    del model
    weights = h5file_or_weights if isinstance(h5file_or_weights, dict) else read_keras_h5(h5file_or_weights)
    return {key: mapped.tensor for key, mapped in _map_keras(weights).items()}


# ------------------------------------------------------------------------------------------- TFLite
def _bn_eps_of(model: nn.Module) -> Callable[[str], float]:
    """``module name -> eps`` of the model's batch norms (the first one's for modules it does not have)."""
    default = _bn_eps(model) or 1e-5

    def eps(name: str) -> float:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return default
        return float(module.eps) if isinstance(module, nn.BatchNorm2d) else default

    return eps


def _map_tflite(network: TFLiteMobileNet, model: nn.Module) -> dict[str, _Mapped]:
    state = folded_state(network, _bn_eps_of(model))
    return {key: _Mapped(source, tensor) for key, (source, tensor) in state.items()}


def filter_tflite(network_or_bytes: TFLiteMobileNet | bytes, model: MobileNetV1) -> dict[str, torch.Tensor]:
    """Map a MobileNet v1 TFLite file (its bytes, or ``read_tflite``'s result) onto ``model``'s keys.

    The 27 convolutions in graph order become the stem and the depthwise/pointwise layers of the 13
    blocks (OHWI -> OIHW, depthwise 1HWC -> C1HW), dequantized with their scale and zero point. Batch norm
    is folded into them in the file, so each batch norm is set to add the folded bias and nothing else in
    eval mode (weight √(1+ε), bias = folded bias, running mean 0, running var 1). A 1001-class classifier
    drops its background class 0, leaving the 1000 ImageNet classes in the usual order; a body-only file
    has no classifier keys.
    """
    network = read_tflite(network_or_bytes) if isinstance(network_or_bytes, bytes) else network_or_bytes
    return {key: mapped.tensor for key, mapped in _map_tflite(network, model).items()}


# ------------------------------------------------------------------------------ Lightning / native
def find_backbone_prefix(state_dict: Mapping[str, Any]) -> str:
    """The prefix under which a task state dict keeps its MobileNet (``backbone.`` for tasks of this suite).

    Any attribute name works: the prefix is read off the key that ends in ``stem.conv.weight``. When a
    task holds several (an EMA copy, a teacher), the one called ``backbone.`` wins.
    """
    prefixes = [key[: -len(STEM_KEY)] for key in state_dict if key.endswith(STEM_KEY)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        raise ValueError(f"no MobileNet v1 backbone found in the state dict (no key ends with {STEM_KEY!r})")
    if len(prefixes) == 1:
        return prefixes[0]
    for preferred in ("backbone.", ""):
        if preferred in prefixes:
            return preferred
    nested = [p for p in prefixes if p.endswith(".backbone.")]
    if len(nested) == 1:
        return nested[0]
    raise ValueError(
        f"several MobileNet backbones in the state dict, under {prefixes}: cannot tell which to load"
    )


def _map_lightning(checkpoint: Mapping[str, Any]) -> dict[str, _Mapped]:
    state_dict = checkpoint.get("state_dict", checkpoint)
    prefix = find_backbone_prefix(state_dict)
    return {
        key[len(prefix) :]: _Mapped(key, tensor)
        for key, tensor in state_dict.items()
        if key.startswith(prefix) and isinstance(tensor, torch.Tensor)
    }


def filter_lightning_checkpoint(checkpoint: Mapping[str, Any], model: MobileNetV1) -> dict[str, torch.Tensor]:
    """The backbone tensors of a Lightning checkpoint of this project (or of a bare task state dict).

    The task's backbone keys carry its attribute name (``backbone.stem.conv.weight``); the prefix is found
    from the stem key, so any attribute name works. Heads and losses of the task are left out.
    """
    del model
    return {key: mapped.tensor for key, mapped in _map_lightning(checkpoint).items()}


# ---------------------------------------------------------------------------------------- reading
def _is_safetensors(head: bytes) -> bool:
    """Safetensors files start with a little-endian u64 header length, then a JSON object."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length < 100_000_000 and head[8:9] == b"{"


def _read_keras_archive(path: Path) -> KerasWeights | None:
    """The weights of a Keras 3 ``.keras`` archive (a zip holding ``model.weights.h5``), else None."""
    import h5py

    try:
        with zipfile.ZipFile(path) as archive:
            if KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
                return None
            data = archive.read(KERAS_ARCHIVE_WEIGHTS)
        with h5py.File(io.BytesIO(data), "r") as h5:
            return read_keras_h5(h5)
    except (zipfile.BadZipFile, OSError, KeyError, ValueError):
        return None  # left to torch.load, whose error names what is wrong


def _read_file(path: Path) -> tuple[str, Any]:
    """(kind, content): ("keras", KerasWeights), ("safetensors", dict) or ("torch", whatever it holds)."""
    if not path.exists():
        raise WeightFileNotFoundError(f"{path}: weight file not found")
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: not a file")
    with path.open("rb") as stream:
        head = stream.read(16)
    if not head:
        raise PretrainedWeightsError(f"{path}: the weight file is empty")
    if is_tflite(head):
        try:
            return "tflite", read_tflite(path)
        except TFLiteFormatError as error:
            raise PretrainedWeightsError(str(error)) from error
    if head.startswith(HDF5_SIGNATURE):
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                return "keras", read_keras_h5(h5)
        except Exception as error:
            raise PretrainedWeightsError(
                f"{path}: cannot read the Keras HDF5 weight file (truncated or not Keras weights?): "
                f"{type(error).__name__}: {error}"
            ) from error
    if head.startswith(b"PK\x03\x04"):  # a zip: a torch archive, or a Keras 3 ``.keras`` model
        keras_weights = _read_keras_archive(path)
        if keras_weights is not None:
            return "keras", keras_weights
    if _is_safetensors(head):
        from safetensors.torch import load_file

        try:
            return "safetensors", load_file(str(path), device="cpu")
        except Exception as error:
            raise PretrainedWeightsError(
                f"{path}: cannot read the safetensors file (truncated?): {type(error).__name__}: {error}"
            ) from error
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        what = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
            hint = "it holds Python objects other than tensors, which are not loaded for safety"
        else:
            hint = "truncated, or not a safetensors, PyTorch, Keras HDF5 or TFLite weight file"
        raise PretrainedWeightsError(
            f"{path}: cannot read weights ({hint}): {type(error).__name__}: {what}"
        ) from error
    return "torch", content


def _tensor_items(content: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(content, Mapping):
        raise PretrainedWeightsError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(content).__name__}"
        )
    return {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}


def _identify(kind: str, content: Any, path: Path, model: nn.Module) -> tuple[str, dict[str, _Mapped]]:
    """The layout of the file ("timm", "keras", "tflite", "lightning", "mobilenets" or "unknown") and its
    tensors under our keys."""
    if kind == "keras":
        return "keras", _map_keras(content)
    if kind == "tflite":
        return "tflite", _map_tflite(content, model)
    # Lightning and timm training checkpoints keep the weights under "state_dict"
    wrapped = isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping)
    tensors = _tensor_items(content["state_dict"] if wrapped else content, path)
    if not tensors:
        raise PretrainedWeightsError(f"{path}: the file holds no tensors")
    if "conv_stem.weight" in _strip_wrapper_prefix(tensors):
        return "timm", _map_timm(tensors)
    if any(key.endswith(STEM_KEY) for key in tensors):
        # this project's own layout: a backbone state dict, or a task's with the backbone prefixed
        layout = "mobilenets" if STEM_KEY in tensors else "lightning"
        return layout, _map_lightning({"state_dict": tensors})
    return "unknown", {key: _Mapped(key, tensor) for key, tensor in tensors.items()}


# ---------------------------------------------------------------------------------------- checking
def _shape(value: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    return tuple(int(n) for n in value.shape)


def _first_param(model: nn.Module) -> tuple[str, tuple[int, ...]]:
    key, tensor = next(iter(model.state_dict().items()))
    return key, _shape(tensor)


def _bn_eps(model: nn.Module) -> float | None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            return float(module.eps)
    return None


def _check_source_options(
    model: MobileNetV1, layout: str, path: Path, expected: dict[str, Any] | None = None
) -> None:
    """Warn when the backbone's options differ from those the weights were trained with.

    ``expected`` overrides the layout's usual options (a TFLite file says its activation itself; its
    batch norms are folded, so any ε reproduces it).
    """
    expected = expected or {
        "keras": {"padding": "tf", "activation": "relu6", "bn_eps": 1e-3},
        "timm": {"padding": "torch", "activation": "relu6", "bn_eps": 1e-5},
    }.get(layout)
    if expected is None:
        return
    actual = {
        "padding": getattr(model, "padding", None),
        "activation": getattr(model, "activation", None),
        "bn_eps": _bn_eps(model),
    }
    differ = [
        f"{name}={actual[name]!r} (the {layout} weights were trained with {value!r})"
        for name, value in expected.items()
        if actual[name] != value
    ]
    if differ:
        log.warning(
            "%s: loading %s weights into a backbone with %s; its outputs will not reproduce the source "
            "model's",
            path,
            layout,
            ", ".join(differ),
        )


def _merge(
    model: MobileNetV1, layout: str, mapped: dict[str, _Mapped], path: Path
) -> dict[str, torch.Tensor]:
    """The model's state dict with the file's tensors in it, after checking every key and shape."""
    own = model.state_dict()
    if layout == "unknown" or not any(key in own for key in mapped):
        first = next(iter(mapped.values()))
        model_key, model_shape = _first_param(model)
        raise PretrainedWeightsError(
            f"{path}: not MobileNet v1 weights in a known layout (timm, Keras, mobilenets): its first key "
            f"{first.source_key!r} has shape {_shape(first.tensor)}, where this backbone's first key "
            f"{model_key!r} has shape {model_shape}"
        )
    merged = dict(own)
    unexpected: list[str] = []
    skipped_blocks: list[str] = []
    drop_classifier = False
    # network order, so that "the first key that does not fit" is the shallowest one (safetensors sorts)
    in_model_order = [key for key in own if key in mapped] + [key for key in mapped if key not in own]
    for key in in_model_order:
        item = mapped[key]
        if key not in own:
            block = re.match(r"^blocks\.block(\d+)\.", key)
            if getattr(model, "shallow", False) and block and int(block.group(1)) in SHALLOW_REMOVED_BLOCKS:
                skipped_blocks.append(key)
            elif key in CLASSIFIER_KEYS:
                drop_classifier = True
            else:
                unexpected.append(item.source_key)
            continue
        if _shape(item.tensor) != _shape(own[key]):
            if key in CLASSIFIER_KEYS:
                drop_classifier = True
                continue
            origin = "" if item.source_key == key else f" (from {item.source_key!r} in the file)"
            raise PretrainedWeightsError(
                f"{path}: the {layout} weights do not fit this backbone: {key!r}{origin} has shape "
                f"{_shape(item.tensor)} in the file, but the backbone expects {_shape(own[key])} "
                f"(width_mult={getattr(model, 'width_mult', '?')}; was the file made for another α or "
                f"architecture?)"
            )
        merged[key] = item.tensor.to(own[key].dtype)
    if unexpected:
        hint = (
            "this backbone is the full_conv ablation, which has no separable blocks"
            if getattr(model, "full_conv", False)
            else "weights of a different architecture?"
        )
        raise PretrainedWeightsError(
            f"{path}: {len(unexpected)} tensors of the {layout} file have no place in this backbone, "
            f"first {unexpected[:5]} ({hint})"
        )
    missing = [
        key
        for key in own
        if key not in mapped and not key.endswith("num_batches_tracked") and key not in CLASSIFIER_KEYS
    ]
    if missing:
        raise PretrainedWeightsError(
            f"{path}: the {layout} file lacks {len(missing)} tensors of this backbone, first {missing[:5]}"
        )
    if skipped_blocks:
        log.info("%s: shallow backbone: skipping %d tensors of blocks 7-11", path, len(skipped_blocks))
    file_classes = _shape(mapped["classifier.weight"].tensor)[0] if "classifier.weight" in mapped else None
    if drop_classifier:  # ``merged`` still holds the backbone's own classifier, if it has one
        log.info(
            "%s: dropping the file's %s-class classifier: this backbone has %s; its classifier stays "
            "freshly initialised",
            path,
            file_classes,
            f"{model.num_classes} classes" if model.num_classes else "no classifier (headless)",
        )
    elif file_classes is None and any(key in own for key in CLASSIFIER_KEYS):
        log.info("%s: the file has no classifier; this backbone's classifier stays freshly initialised", path)
    return merged


def resolve_weights(source: str | Path) -> Path:
    """The file of a ``weights:`` value: a path, or a built-in source ``official:<name>``."""
    text = str(source)
    if not text.startswith(OFFICIAL_PREFIX):
        return Path(source)
    name = text[len(OFFICIAL_PREFIX) :]
    if name not in OFFICIAL_WEIGHTS:
        known = ", ".join(OFFICIAL_PREFIX + key for key in OFFICIAL_WEIGHTS)
        raise PretrainedWeightsError(f"{text}: no such built-in weights; the built-in ones are: {known}")
    path = OFFICIAL_DIR / OFFICIAL_WEIGHTS[name]
    if not path.is_file():
        raise WeightFileNotFoundError(
            f"{path}: the built-in weights {text} are missing from the installation"
        )
    return path


def _log_tflite(network: TFLiteMobileNet, model: MobileNetV1, path: Path) -> None:
    if network.num_classes == CLASSES_WITH_BACKGROUND and model.num_classes == CLASSES_WITH_BACKGROUND - 1:
        log.info("%s: dropping the classifier's background class 0: 1000 ImageNet classes remain", path)
    low_high = network.input_range
    log.info(
        "%s: TFLite MobileNet v1 for %dx%d inputs%s; batch norm is folded into the convolutions "
        "(re-estimate it before training: reestimate_folded_batchnorm)",
        path,
        *network.input_size,
        f" in [{low_high[0]:g}, {low_high[1]:g}]" if low_high else "",
    )


def load_pretrained(model: MobileNetV1, path: str | Path) -> None:
    """Load a local weight file into ``model`` in place, checking every key and shape first.

    Reads timm state dicts (``.safetensors``, ``.pth``, ``.bin``), Keras MobileNet ``.h5`` files (legacy
    weights-only or full-model layout, or Keras 3 ``.weights.h5``), TFLite MobileNet v1 files (Google's
    quantized releases; ``official:0.25_128`` is shipped in the package), and this project's Lightning
    checkpoints or saved backbone state dicts. The format is recognised from the content, not the suffix.
    Nothing is changed in ``model`` when the file does not fit. Afterwards ``model.folded_batchnorm``
    names the batch norms that hold folded statistics (those of a TFLite file; empty otherwise).
    """
    path = resolve_weights(path)
    kind, content = _read_file(path)
    try:
        layout, mapped = _identify(kind, content, path, model)
    except PretrainedWeightsError:
        raise
    except ValueError as error:
        raise PretrainedWeightsError(f"{path}: {error}") from error
    if not mapped:
        expected = {
            "keras": "Keras layer groups with 'weight_names', 'model_weights/' or Keras 3 'layers/'",
        }.get(layout, "tensors")
        raise PretrainedWeightsError(f"{path}: the file holds no weights (expected {expected})")
    expected = {"padding": "tf", "activation": content.activation} if layout == "tflite" else None
    _check_source_options(model, layout, path, expected)
    merged = _merge(model, layout, mapped, path)
    model.load_state_dict(merged, strict=True)
    folded = [  # the batch norms that stand for folded ones (a shallow backbone skips some)
        key[: -len(".running_var")]
        for key in mapped
        if layout == "tflite" and key.endswith(".bn.running_var") and key in merged
    ]
    setattr(model, FOLDED_BATCHNORM_ATTR, tuple(folded))
    if layout == "tflite":
        _log_tflite(content, model, path)
    log.info("%s: loaded %d tensors (%s layout)", path, len(mapped), layout)
