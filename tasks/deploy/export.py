"""``mobilenets export``: any task checkpoint to ONNX or TorchScript, verified, optionally int8-quantized.

Export goes through the task contract of ``tasks/base.py`` only, never through task-specific code:

- ``BaseTask.load_task(ckpt)`` rebuilds the task from its checkpoint;
- ``task.export_module()`` is the network to export (an image batch in, one tensor or a tuple of tensors out);
- ``task.export_metadata()`` is the ``dict[str, str]`` written as ONNX metadata properties (and as a JSON
  extra file in TorchScript archives): the task's ``ExportMetadata`` record (``tasks/deploy/metadata.py``)
  as properties. Keys read here besides the base ones (task, input_size, mean, std):

  - ``output_kind``: ``logits`` (default; top-1 agreement), ``multilabel_logits`` (mean |Δ| of sigmoid
    probabilities), ``embedding`` (cosine), ``detection`` (cosine of the raw head outputs);
  - ``output_names``: the names of the module's outputs (default ``output`` / ``output0,...``);
  - ``class_names`` / ``attributes``: used by ``onnx-predict``.

  Name lists are JSON lists of strings (``format_name_list``); ``parse_name_list`` also reads the
  comma-separated form of older exports.

Every export folds batch norm into the convolutions, has a dynamic batch axis, is verified against the
PyTorch model (max abs difference printed) and is written atomically: a failed verification leaves no file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.backbone.inference import fold_batchnorm
from mobilenets.backbone.mobilenet import Conv2dSame
from mobilenets.datasets.atomic import atomic_path
from mobilenets.datasets.images import load_rgb
from mobilenets.datasets.transforms import ClassificationTransform
from mobilenets.tasks.deploy.close_calls import close_call_margin, route_close_calls, routed_share
from mobilenets.tasks.deploy.qat import (
    DEFAULT_QAT_LR,
    correct_bias,
    grid_weight_scales,
    qat_finetune,
    weight_bound,
)
from mobilenets.tasks.deploy.timing import cycling, measure_alternating

ExportFormat = Literal["onnx", "torchscript"]
OutputKind = Literal["logits", "multilabel_logits", "embedding", "detection"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "multilabel_logits", "embedding", "detection")
INPUT_NAME = "input"
#: ONNX opset of the exports (ONNX Runtime >= 1.12 runs it; the int8 QDQ path needs >= 13).
OPSET = 17
#: Maximum allowed |exported − PyTorch| relative to max(1, max |PyTorch output|).
DEFAULT_TOLERANCE = 1e-4
#: Name of the JSON metadata file inside TorchScript archives.
TORCHSCRIPT_METADATA_FILE = "mobilenets_metadata.json"
#: Seed of the random sample inputs used for verification (reproducible reports).
VERIFY_SEED = 1234


class ExportError(MobilenetsError, RuntimeError):
    """An export that failed or could not be verified; nothing was written."""


class AgreementError(ExportError):
    """An int8 model whose agreement with the float model is below the requested floor."""


# ---------------------------------------------------------------------------------------------- helpers
def _as_tensor_list(outputs: Any, where: str) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, list | tuple) and all(isinstance(t, torch.Tensor) for t in outputs):
        return list(outputs)
    raise ExportError(
        f"{where}: export_module() must return a tensor or a tuple of tensors, got {type(outputs).__name__}"
    )


#: Metadata keys that imply an output kind when a task does not set ``output_kind`` itself.
KIND_HINTS: tuple[tuple[str, str], ...] = (
    ("attribute_names", "multilabel_logits"),
    ("attributes", "multilabel_logits"),
    ("embedding_size", "embedding"),
    ("num_anchors", "detection"),
)


def output_kind(metadata: dict[str, str]) -> str:
    """The ``output_kind`` metadata key, else implied by a well-known key (``attributes`` → multi-label,
    ``embedding_size`` → embedding, ``num_anchors`` → detection), else ``logits``; checked."""
    implied = next((kind for key, kind in KIND_HINTS if key in metadata), "logits")
    kind = metadata.get("output_kind", implied)
    if kind not in OUTPUT_KINDS:
        raise ExportError(f"export_metadata: output_kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    return kind


def output_names(metadata: dict[str, str], count: int) -> list[str]:
    """Names of the exported outputs: the ``output_names`` metadata key, or output / output0..N."""
    if metadata.get("output_names"):
        names = [name.strip() for name in parse_name_list(metadata["output_names"])]
        if len(names) != count:
            raise ExportError(
                f"export_metadata: output_names lists {len(names)} names but the module returns {count} outputs"
            )
        return names
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def format_name_list(names: Sequence[str]) -> str:
    """A list of names as metadata text: a JSON list of strings (a name may hold a comma)."""
    return json.dumps([str(name) for name in names], ensure_ascii=False)


def parse_name_list(value: str | None) -> list[str]:
    """A metadata list of names: a JSON list (``format_name_list``), or the comma-separated names of
    exports written before names were JSON."""
    if not value:
        return []
    if value.lstrip().startswith("["):
        return [str(v) for v in json.loads(value)]
    return [v.strip() for v in value.split(",")]


def parse_floats(value: str, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as error:
        raise ExportError(f"metadata key {key!r}: expected comma-separated numbers, got {value!r}") from error


def sample_inputs(input_size: int, batch_size: int, seed: int = VERIFY_SEED) -> torch.Tensor:
    """Reproducible random normalised images (roughly the range of mean/std-normalised pixels)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, input_size, input_size, generator=generator).clamp_(-2.5, 2.5)


def max_relative_difference(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray]) -> float:
    """max |exported − reference| / max(1, max |reference|), over all outputs."""
    worst = 0.0
    for ref, got in zip(reference, exported):
        if ref.shape != got.shape:
            return float("inf")
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        worst = max(worst, float(np.abs(ref - got).max(initial=0.0)) / scale)
    return worst


def max_abs_difference(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray]) -> float:
    return max(
        float(np.abs(r - g).max(initial=0.0)) if r.shape == g.shape else float("inf")
        for r, g in zip(reference, exported)
    )


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matched PyTorch."""

    path: Path
    format: str
    max_abs_diff: float
    max_rel_diff: float
    metadata: dict[str, str]
    agreement: AgreementReport | None = None

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.format}, batch norm folded, "
            f"{'batch 1' if self.metadata.get('batch') == '1' else 'dynamic batch'}; "
            f"max abs difference vs PyTorch {self.max_abs_diff:.3g} (relative {self.max_rel_diff:.3g})"
        )
        if self.agreement is not None:
            text += f" (the float graph, before quantisation)\n{self.agreement.summary()}"
        return text


def prepare_module(task: nn.Module) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """(reference module in eval mode, its batch-norm-folded copy, metadata) of a task."""
    task.eval()
    module = task.export_module() if hasattr(task, "export_module") else task
    module.eval()
    metadata = dict(task.export_metadata()) if hasattr(task, "export_metadata") else {}
    output_kind(metadata)
    folded = fold_batchnorm(module)
    folded.requires_grad_(False)
    return module, folded, metadata


def _reference_outputs(module: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in _as_tensor_list(module(x), "reference")]


def _check(reference: list[np.ndarray], exported: list[np.ndarray], tolerance: float, what: str) -> tuple:
    abs_diff = max_abs_difference(reference, exported)
    rel_diff = max_relative_difference(reference, exported)
    if not (rel_diff <= tolerance):  # also catches NaN
        raise ExportError(
            f"{what}: exported model differs from PyTorch by {abs_diff:.3g} (relative {rel_diff:.3g}), "
            f"above the tolerance {tolerance:g}; nothing written"
        )
    return abs_diff, rel_diff


# ---------------------------------------------------------------------------------------------- ONNX
def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations (and ``threads`` intra-op threads).

    An int8 export with 8-bit weights (metadata ``int8_weight_bits``) run on an x86 CPU without VNNI gets
    ONNX Runtime's ``session.x64quantprecision``: its kernels then add products without the int16
    saturation that 8-bit weights would hit (top-1 agreement 0.80 -> 0.89 at 0.25-128, but 1.4x slower
    there, which is why such CPUs quantise to 7 bits by default). Thread-pool spinning, denormals-as-zero,
    sequential execution and I/O binding were measured too: no change beyond the noise (issue 16).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if onnx_metadata(path).get("int8_weight_bits") == "8" and needs_high_precision_int8():
        options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def needs_high_precision_int8(flags: set[str] | None = None) -> bool:
    """Whether 8-bit int8 weights saturate here: an x86 CPU without VNNI (others are unaffected)."""
    flags = cpu_flags() if flags is None else flags
    return "sse2" in flags and int8_weight_bits(flags) == 7  # sse2: any x86-64 CPU


def run_onnx(session: Any, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    array = x.numpy() if isinstance(x, torch.Tensor) else x
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(array, dtype=np.float32)})


def session_runner(session: Any, x: np.ndarray) -> Callable[[], object]:
    """One timed call of ``session`` on ``x``: the input is fed as it is, converted once beforehand."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)}
    return lambda: session.run(None, feed)


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata properties of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def set_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


@contextlib.contextmanager
def static_same_padding(module: nn.Module, example: torch.Tensor) -> Iterator[int]:
    """TF "SAME" convolutions (``Conv2dSame``) of ``module`` with their pads fixed for ``example``'s size,
    for tracing; yields how many were fixed.

    ``Conv2dSame`` computes its pads from the input's shape, which the exporter records as about twenty
    Shape/Gather/Sub/Div/Concat/... nodes and a Pad per convolution. ONNX Runtime cannot fold them (the batch
    is dynamic) and re-lays out its NCHWc tensors around every Pad: 0.25 MobileNet-128 with Google's weights
    ran at 670 img/s instead of 1,850 (2 AVX2 cores). The exported input size is fixed, so the pads are
    constants: symmetric ones go into the convolution, asymmetric ones into a constant Pad that
    ``fuse_pads_into_convs`` folds into the Conv's own pads.
    """
    convs = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    sizes: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:])))
        for m in convs
    ]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    for conv in convs:
        pads: list[int] = []  # F.pad order: left, right, top, bottom
        for size, k, s in zip(reversed(sizes[conv]), reversed(conv.kernel_size), reversed(conv.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        conv.forward = functools.partial(_conv_with_pads, conv, tuple(pads))
    try:
        yield len(convs)
    finally:
        for conv in convs:
            del conv.forward


def _conv_with_pads(conv: nn.Conv2d, pads: tuple[int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    if pads[0] == pads[1] and pads[2] == pads[3]:
        return F.conv2d(
            x, conv.weight, conv.bias, conv.stride, (pads[2], pads[0]), conv.dilation, conv.groups
        )
    return F.conv2d(F.pad(x, pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def fuse_pads_into_convs(path: Path) -> int:
    """Constant-fold ``path`` (ONNX Runtime's basic, hardware-independent level, saved as plain ONNX) and
    fold every zero Pad of the spatial axes that feeds one Conv into that Conv's ``pads``; returns how many.

    ONNX Runtime leaves such a Pad in place (and, on x86, a layout reorder on each side of it).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="mobilenets-basic-") as work:
        options.optimized_model_filepath = str(Path(work) / "basic.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    fused = []
    for node in graph.node:
        if node.op_type != "Pad" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        value = node.input[2] if len(node.input) > 2 else ""
        if mode != b"constant" or (value and (value not in constants or constants[value].any())):
            continue
        users = consumers.get(node.output[0], [])
        pads = constants[node.input[1]].tolist()  # N, C, H, W begins, then N, C, H, W ends
        if (
            len(users) != 1
            or users[0].op_type != "Conv"
            or len(pads) != 8
            or any(pads[i] for i in (0, 1, 4, 5))
        ):
            continue
        conv = users[0]
        old = next((a for a in conv.attribute if a.name == "pads"), None)
        base = list(old.ints) if old is not None else [0, 0, 0, 0]
        if old is not None:
            conv.attribute.remove(old)
        conv.attribute.append(
            helper.make_attribute(
                "pads", [base[0] + pads[2], base[1] + pads[3], base[2] + pads[6], base[3] + pads[7]]
            )
        )
        conv.input[0] = node.input[0]
        fused.append(node)
    for node in fused:
        graph.node.remove(node)
    # the fused Pads' constants: left in, ONNX Runtime warns about each one whenever the model is opened
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    unused = [init for init in graph.initializer if init.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    used = {""} | {node.domain for node in graph.node}  # ONNX Runtime declares its own domains: drop them
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, str(path))
    return len(fused)


def _torch_onnx_export(folded: nn.Module, example: torch.Tensor, path: Path, names: list[str]) -> None:
    dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]}
    with warnings.catch_warnings(), static_same_padding(folded, example):
        # The TorchScript-based exporter is deprecated in favour of dynamo but is the fast, reliable path
        # for a plain CNN; the backbone's input-size check is a trace-time constant (the size is fixed).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            folded,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    fuse_pads_into_convs(path)


def export_onnx(task: nn.Module, out: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export ``task.export_module()`` (batch norm folded, dynamic batch) to ONNX with its metadata, verified
    with ONNX Runtime at batch 1 and 3 against the PyTorch model; nothing is written if it does not match."""
    out = Path(out)
    module, folded, metadata = prepare_module(task)
    input_size = int(metadata.get("input_size", 224))
    example = sample_inputs(input_size, 2, seed=VERIFY_SEED + 1)
    count = len(_reference_outputs(module, example[:1]))
    names = output_names(metadata, count)
    metadata = {
        **metadata,
        "format": "onnx",
        "input_name": INPUT_NAME,
        "output_names": format_name_list(names),
    }
    metadata.update(batchnorm_folded="true", layout="NCHW", opset=str(OPSET))
    with atomic_path(out) as tmp:
        _torch_onnx_export(folded, example, tmp, names)
        set_onnx_metadata(tmp, metadata)
        session = ort_session(tmp)
        diffs = []
        for batch in (1, 3):  # different from the traced batch of 2: proves the batch axis is dynamic
            x = sample_inputs(input_size, batch)
            diffs.append(_check(_reference_outputs(module, x), run_onnx(session, x), tolerance, str(out)))
    return ExportResult(out, "onnx", max(d[0] for d in diffs), max(d[1] for d in diffs), metadata)


# ---------------------------------------------------------------------------------------------- TorchScript
def export_torchscript(
    task: nn.Module, out: str | Path, tolerance: float = DEFAULT_TOLERANCE
) -> ExportResult:
    """Trace ``task.export_module()`` (batch norm folded) to a TorchScript archive with the metadata as the
    extra file ``mobilenets_metadata.json``, verified at batch 1 and 3; nothing is written on mismatch."""
    out = Path(out)
    module, folded, metadata = prepare_module(task)
    input_size = int(metadata.get("input_size", 224))
    metadata = {**metadata, "format": "torchscript", "batchnorm_folded": "true", "layout": "NCHW"}
    example = sample_inputs(input_size, 2, seed=VERIFY_SEED + 1)
    with warnings.catch_warnings(), _lightning_scripting(folded):
        warnings.simplefilter("ignore")  # deprecation of torch.jit and trace-time constant warnings
        traced = torch.jit.trace(folded, example, check_trace=False)
        with atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})
            loaded = torch.jit.load(str(tmp), map_location="cpu")
            diffs = []
            for batch in (1, 3):
                x = sample_inputs(input_size, batch)
                with torch.no_grad():
                    got = [t.numpy() for t in _as_tensor_list(loaded(x), "torchscript")]
                diffs.append(_check(_reference_outputs(module, x), got, tolerance, str(out)))
    return ExportResult(out, "torchscript", max(d[0] for d in diffs), max(d[1] for d in diffs), metadata)


@contextlib.contextmanager
def _lightning_scripting(module: nn.Module) -> Iterator[None]:
    """Mark LightningModules as being scripted (what ``LightningModule.to_torchscript`` does) so that tracing
    them does not touch properties that need a Trainer."""
    flagged = [m for m in module.modules() if hasattr(m, "_jit_is_scripting")]
    for m in flagged:
        m._jit_is_scripting = True
    try:
        yield
    finally:
        for m in flagged:
            m._jit_is_scripting = False


def torchscript_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored in a TorchScript archive written by ``export_torchscript``."""
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_METADATA_FILE] or "{}")


# ---------------------------------------------------------------------------------------------- images
def preprocess_images(paths: Sequence[Path], metadata: dict[str, str]) -> np.ndarray:
    """Images as the model's eval transform prepares them: an (N, 3, S, S) float32 batch."""

    size = int(metadata.get("input_size", 224))
    mean = parse_floats(metadata.get("mean", "0.5,0.5,0.5"), "mean")
    std = parse_floats(metadata.get("std", "0.5,0.5,0.5"), "std")
    transform = ClassificationTransform(size, train=False, mean=mean, std=std)
    if not paths:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack([transform(load_rgb(p, min_size=transform.decode_size)).numpy() for p in paths])


# ---------------------------------------------------------------------------------------------- int8
@dataclass(frozen=True)
class AgreementReport:
    """How closely the int8 model follows the float model on held-out images."""

    kind: str
    measure: str
    value: float
    images: int
    detail: str = ""

    def summary(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"int8 vs float on {self.images} held-out images: {self.measure} = {self.value:.4f}{extra}"


def mean_kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean KL divergence of ``other``'s softmax from ``reference``'s (rows of logits): closeness finer
    than top-1."""
    p = reference - np.logaddexp.reduce(reference.astype(np.float64), axis=1, keepdims=True)
    q = other - np.logaddexp.reduce(other.astype(np.float64), axis=1, keepdims=True)
    return float((np.exp(p) * (p - q)).sum(1).mean())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(denominator, 1e-12)


def agreement(kind: str, reference: list[np.ndarray], quantized: list[np.ndarray]) -> AgreementReport:
    """Compare float and int8 outputs the way the output kind calls for; ``value`` is higher-is-better
    and in [0, 1] except for cosines (in [-1, 1])."""
    n = len(reference[0])
    if kind == "logits":
        same = reference[0].argmax(1) == quantized[0].argmax(1)
        detail = ""
        if not same.all():
            # how close float's own call was on the flipped images: near-ties flip under any rounding
            top_two = np.sort(reference[0][~same], axis=1)[:, -2:]
            margins = top_two[:, 1] - top_two[:, 0]
            detail = (
                f"{len(margins)} flipped; float's top-two logit margin there: median {np.median(margins):.3f}, "
                f"largest {margins.max():.3f}"
            )
        return AgreementReport(kind, "top-1 agreement", float(same.mean()), n, detail)
    if kind == "multilabel_logits":
        delta = float(np.abs(_sigmoid(reference[0]) - _sigmoid(quantized[0])).mean())
        return AgreementReport(kind, "1 − mean |Δ probability|", 1.0 - delta, n, f"mean |Δ| = {delta:.4f}")
    if kind == "embedding":
        cosine = _cosine_rows(reference[0], quantized[0])
        return AgreementReport(kind, "mean cosine", float(cosine.mean()), n, f"min {cosine.min():.4f}")
    cosines = [float(_cosine_rows(r, q).mean()) for r, q in zip(reference, quantized)]
    return AgreementReport(kind, "mean cosine of raw outputs", min(cosines), n)


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over preprocessed images, a few at a time."""

    def __init__(self, batch: np.ndarray, input_name: str = INPUT_NAME, batch_size: int = 8) -> None:
        self.batches = [batch[i : i + batch_size] for i in range(0, len(batch), batch_size)]
        self.input_name = input_name
        self.position = 0
        # calibration runs the whole network per batch: a bar on a terminal (none in logs or pipes)
        self.progress = tqdm(total=len(self.batches), desc="int8 calibration", unit="batch", disable=None)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            self.progress.close()
            return None
        self.position += 1
        self.progress.update(1)
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


WeightBits = Literal[7, 8]
#: /proc/cpuinfo flags of the int8 dot-product instructions that add u8 x s8 products in 32 bits.
VNNI_FLAGS: tuple[str, ...] = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def int8_weight_bits(flags: set[str] | None = None) -> WeightBits:
    """8 where the CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX), else 7.

    Without VNNI, x86 int8 kernels add pairs of u8 x s8 products in int16 (``vpmaddubsw``), which saturates
    with full-range 8-bit weights (0.25 MobileNet-128, top-1 agreement 0.17 per-tensor); 7-bit weights
    cannot saturate. VNNI adds in int32, so 8-bit weights are exact there and twice as fine.
    """
    flags = cpu_flags() if flags is None else flags
    return 8 if any(flag in flags for flag in VNNI_FLAGS) else 7


def output_layers(path: str | Path) -> list[str]:
    """Names of the Gemm/MatMul/Conv nodes whose output is a graph output: the layers quantisation keeps in
    float. An 8-bit output steps the logits by about range/255 (0.15 for ImageNet logits), which flips the
    top-1 of close classes: at 0.25 MobileNet-128 on real photos, keeping the classifier in float raised
    agreement 0.89 -> 0.91 (8-bit weights), for a layer of under 2 % of the mult-adds."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {output.name for output in graph.output}
    return [
        node.name
        for node in graph.node
        if node.op_type in ("Gemm", "MatMul", "Conv") and node.name and outputs.intersection(node.output)
    ]


def entry_layers(path: str | Path) -> list[str]:
    """Names of the stem convolution (the first on the image) and, when it is depthwise, the convolution after
    it: the layers quantisation keeps in float for speed. There ONNX Runtime's int8 kernels are slower than
    its float ones (3 input channels; a depthwise layer of few channels at the highest resolution): at batch 1,
    1 thread, keeping both in float took the int8 model from 0.97x to 1.57x LiteRT's speed at 0.25-128, and
    from 1.94x to 2.22x at 1.0-224 (``benchmarks/deploy.py``, AVX-512 VNNI), for about 3 % of the mult-adds."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def next_conv(tensor: str) -> Any:
        """The first Conv fed by ``tensor`` through element-wise activations only (None otherwise)."""
        frontier = [tensor]
        while frontier:
            following = [node for name in frontier for node in consumers.get(name, [])]
            convs = [node for node in following if node.op_type == "Conv"]
            if convs:
                return convs[0] if len(following) == 1 else None
            if len(following) != 1 or following[0].op_type not in ("Clip", "Relu", "Pad"):
                return None
            frontier = list(following[0].output)
        return None

    image = next((i.name for i in graph.input if i.name not in initializers), None)
    stem = next_conv(image) if image else None
    if stem is None or not stem.name:
        return []
    layers = [stem.name]
    after = next_conv(stem.output[0])
    groups = next((a.i for a in after.attribute if a.name == "group"), 1) if after is not None else 1
    if after is not None and after.name and groups > 1:
        layers.append(after.name)
    return layers


def conv_layers(path: str | Path) -> list[str]:
    """Names of the Conv nodes of ``path``, in graph order (from the input)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type == "Conv" and node.name]


def float_layers(path: str | Path, float_prefix: int | None = None) -> list[str]:
    """The layers int8 quantisation keeps in float: ``entry_layers`` (speed), or the first ``float_prefix``
    convolutions (``export_int8``'s float fallback), and ``output_layers`` (accuracy)."""
    first = entry_layers(path) if float_prefix is None else conv_layers(path)[:float_prefix]
    return list(dict.fromkeys([*first, *output_layers(path)]))


def unquantized_layers(path: str | Path, kept: Sequence[str] = ()) -> list[str]:
    """``name (op)`` of every node of a QDQ model that still reads a float weight (a float initializer of
    two or more dimensions, not through DequantizeLinear): the layers int8 quantisation could not reach,
    besides the ``kept`` ones it was asked to leave in float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {
        init.name
        for init in graph.initializer
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
        and len(init.dims) >= 2
    }
    return [
        f"{node.name or node.output[0]} ({node.op_type})"
        for node in graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and node.name not in kept
        and weights.intersection(node.input)
    ]


def grid_weight_overrides(path: str | Path, bound: int, kept: Sequence[str] = ()) -> dict[str, list[dict]]:
    """ONNX Runtime's per-channel ``TensorQuantOverrides`` for the convolution weights of ``path`` (but the
    ``kept`` layers') that lie on a grid: their grid's step as the scale (``grid_weight_scales``), so
    quantisation reproduces them exactly."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name: init for init in graph.initializer}
    overrides: dict[str, list[dict]] = {}
    for node in graph.node:
        if node.op_type != "Conv" or node.name in kept or node.input[1] not in initializers:
            continue
        scales = grid_weight_scales(numpy_helper.to_array(initializers[node.input[1]]), bound)
        if scales is not None:
            overrides[node.input[1]] = [
                {"axis": 0, "scale": np.float32(scale), "zero_point": np.int8(0)} for scale in scales.tolist()
            ]
    return overrides


def quantize_onnx(
    float_path: str | Path,
    out: str | Path,
    calibration: np.ndarray,
    heldout: np.ndarray,
    min_agreement: float = 0.99,
    weight_bits: WeightBits | None = None,
    reference_path: str | Path | None = None,
    extra_metadata: dict[str, str] | None = None,
    grid_weights: bool = True,
    float_prefix: int | None = None,
) -> AgreementReport:
    """Static int8 quantisation (QDQ, per-channel weights, min-max calibration) of a float ONNX export;
    writes ``out`` only if the agreement with the float model on ``heldout`` reaches ``min_agreement``.

    The agreement is measured against ``reference_path`` (default ``float_path``): the original float
    export when ``float_path`` holds quantisation-aware fine-tuned weights.

    ``weight_bits`` is 8 or 7 (default: ``int8_weight_bits()`` of this CPU), recorded in the metadata as
    ``int8_weight_bits``. Weights that already lie on a grid (read from an int8 file) are re-quantised on it,
    losslessly, unless ``grid_weights`` is off (``grid_weight_overrides``; their number is
    ``int8_grid_weight_layers``). The stem, the first depthwise layer (or the first ``float_prefix``
    convolutions) and the layers that produce the outputs stay in float (``float_layers``, listed in
    ``int8_float_layers``); any other layer whose weight the quantiser leaves in float (an operator it has no
    int8 form of) is an error naming the layer.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, out = Path(float_path), Path(out)
    if len(calibration) == 0 or len(heldout) == 0:
        raise ExportError("int8 quantisation needs at least one calibration and one held-out image")
    bits = int8_weight_bits() if weight_bits is None else weight_bits
    if bits not in (7, 8):
        raise ExportError(f"int8 weight bits must be 7 or 8, got {bits!r}")
    metadata = onnx_metadata(float_path)
    kind = output_kind(metadata)

    class _Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="mobilenets-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantise the plain export instead
            prepared = float_path
        kept = float_layers(prepared, float_prefix)
        overrides = grid_weight_overrides(prepared, weight_bound(bits), kept) if grid_weights else {}
        with atomic_path(out) as tmp:
            try:
                quantize_static(
                    str(prepared),
                    str(tmp),
                    _Reader(calibration.astype(np.float32), metadata.get("input_name", INPUT_NAME)),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=bits == 7,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=kept,
                    extra_options={"TensorQuantOverrides": overrides},
                )
            except Exception as error:  # the quantiser's own message names the node it stopped at
                raise ExportError(f"{float_path}: int8 quantisation failed: {error}") from error
            left = unquantized_layers(tmp, kept)
            if left:
                raise ExportError(
                    f"{float_path}: int8 quantisation cannot reach {len(left)} layer(s), first {left[0]}: "
                    "onnxruntime has no int8 form of that operator or weight; not written"
                )
            set_onnx_metadata(
                tmp,
                {
                    **metadata,
                    "quantization": f"int8 static QDQ per-channel ({bits}-bit weights)",
                    "int8_weight_bits": str(bits),
                    "int8_float_layers": ",".join(kept),
                    "int8_grid_weight_layers": str(len(overrides)),
                    **(extra_metadata or {}),
                },
            )
            reference = run_onnx(ort_session(reference_path or float_path), heldout)
            quantized = run_onnx(ort_session(tmp), heldout)
            report = agreement(kind, reference, quantized)
            if not report.value >= min_agreement:
                raise AgreementError(
                    f"{out}: {report.summary()} is below the floor {min_agreement}; not written"
                )
    return report


BiasCorrection = Literal["auto", "on", "off"]


def shortest_float_prefix(meets: Callable[[int], bool], fails: int, most: int) -> int | None:
    """Bisection for the shortest run of first layers kept in float whose int8 model meets the floor:
    ``meets(count)`` quantises with the first ``count`` in float and says whether it does; ``fails`` is a
    count known to fall short, ``most`` the largest to try. None if even ``most`` falls short."""
    if not meets(most):
        return None
    while most - fails > 1:
        middle = (fails + most) // 2
        if meets(middle):
            most = middle
        else:
            fails = middle
    return most


@dataclass(frozen=True)
class FloatFallback:
    """What the float fallback found: with the first ``count`` of the ``total`` convolutions in float the
    int8 model at ``path`` agrees as ``report`` says; ``count`` and ``path`` are None when not even all but
    the last in float met the floor, and ``report`` is then theirs."""

    count: int | None
    total: int
    report: AgreementReport
    path: Path | None


@dataclass(frozen=True)
class FallbackInputs:
    """What every float-fallback step quantises from: the task, its float export, a folder for the models
    it writes, the calibration and held-out images, the int8 weight bits, whether biases are corrected
    first, the export's tolerance, and metadata every model it writes records."""

    task: nn.Module
    float_path: Path
    work: Path
    calibration: np.ndarray
    heldout: np.ndarray
    bits: WeightBits
    bias_correction: bool
    tolerance: float = DEFAULT_TOLERANCE
    metadata: dict[str, str] = field(default_factory=dict)


def quantize_with_float_prefix(
    inputs: FallbackInputs, count: int, floor: float | None = None
) -> tuple[AgreementReport, Path]:
    """The int8 model with the first ``count`` convolutions kept in float, in ``inputs.work``: the biases
    of the rest corrected first when ``inputs.bias_correction`` (``export_for_int8``), then quantised
    (``quantize_onnx``); ``int8_float_fallback`` in its metadata says how many are float (and for which
    ``floor``, when one chose them). With its agreement on the held-out images."""
    total = len(conv_layers(inputs.float_path))
    out = inputs.work / f"int8-prefix-{count}.onnx"
    fallback = f"first {count} of {total} convolutions in float" + (
        "" if floor is None else f" (floor {floor:g})"
    )
    extra = {**inputs.metadata, "int8_float_fallback": fallback}
    source = inputs.float_path
    if inputs.bias_correction:
        source = inputs.work / f"prefix-{count}.onnx"
        export_for_int8(
            inputs.task,
            inputs.float_path,
            source,
            inputs.calibration,
            inputs.bits,
            tolerance=inputs.tolerance,
            log=lambda _: None,
            float_prefix=count,
        )
    report = quantize_onnx(
        source,
        out,
        inputs.calibration,
        inputs.heldout,
        0.0,
        inputs.bits,
        inputs.float_path,
        extra,
        float_prefix=count,
    )
    return report, out


def search_float_prefix(
    inputs: FallbackInputs, floor: float, log: Callable[[str], None] = print
) -> FloatFallback:
    """``export_int8``'s first-layers fallback: the shortest run of first convolutions kept in float whose
    int8 model meets ``floor`` on the held-out images, by bisection (``shortest_float_prefix``) from
    ``entry_layers`` up to all but the last convolution (all of them in float is no int8 model); each step
    is ``quantize_with_float_prefix``."""
    total = len(conv_layers(inputs.float_path))
    tried: dict[int, tuple[AgreementReport, Path]] = {}

    def meets(count: int) -> bool:
        report, out = quantize_with_float_prefix(inputs, count, floor)
        log(f"int8 float fallback: first {count} of {total} convolutions in float: {report.summary()}")
        tried[count] = (report, out)
        return report.value >= floor

    count = shortest_float_prefix(meets, len(entry_layers(inputs.float_path)), total - 1)
    if count is None:
        return FloatFallback(None, total, tried[total - 1][0], None)
    return FloatFallback(count, total, *tried[count])


FloatFallbackKind = Literal["auto", "close-calls", "first-layers", "off"]


def fallback_to_float_on_close_calls(
    float_path: Path,
    int8_path: Path,
    out: Path,
    heldout: np.ndarray,
    reference: np.ndarray,
    floor: float,
) -> tuple[AgreementReport, np.ndarray]:
    """``export_int8``'s float fallback for classifiers: the int8 model at ``int8_path`` with the float one
    answering its close calls (``close_calls``), written to ``out``. The routing margin is just above the
    widest int8 top-two margin among the held-out images whose top-1 int8 flips against ``reference``
    (the float model's logits on ``heldout``), so that none of them flips there; metadata
    ``int8_close_call_margin`` holds it and ``int8_float_fallback`` says what share of the held-out images
    it hands to float. Returns the routed model's own agreement on ``heldout``, and its logits there."""
    import onnx

    quantized = run_onnx(ort_session(int8_path), heldout)[0]
    margin = close_call_margin(reference, quantized) or 0.0
    share = routed_share(quantized, margin)
    model = route_close_calls(onnx.load(str(int8_path)), onnx.load(str(float_path)), margin)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    del model.metadata_props[:]
    fallback = (
        f"float on close calls: int8 top-two logit margin below {margin:.4g} "
        f"({share:.1%} of the held-out images; floor {floor:g})"
    )
    if "int8_float_fallback" in metadata:  # first layers in float already
        fallback = f"{metadata['int8_float_fallback']}, and {fallback}"
    extra = {"int8_float_fallback": fallback, "int8_close_call_margin": repr(margin)}
    onnx.helper.set_model_props(model, {**metadata, **extra})
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    routed_logits = run_onnx(ort_session(out), heldout)[0]
    report = agreement("logits", [reference], [routed_logits])
    routed = f"{share:.1%} of them to float"
    return replace(report, detail=f"{report.detail}; {routed}" if report.detail else routed), routed_logits


#: Candidates of ``--float-fallback auto`` at least this share of the fastest one's speed count as tied
#: (alternating passes over the same images still differ by a few per cent here). The one closest to
#: float wins: it leaves fewer close calls on images the held-out ones did not show. At 0.25-128, chosen on
#: 300 crops, routing with the first 14 in float (mean KL 0.0010) agreed 1.000 on 40 ImageNet photos,
#: routing with none (0.0031, 3 % slower) 0.975.
SPEED_TIE = 0.9
#: The runs of first convolutions ``--float-fallback auto`` keeps in float under a classifier's close-call
#: routing, as shares of the convolutions (besides none). More in float narrows what must be routed: at
#: 0.25-128 on 300 real photo crops, 22 % of the images with none, 15 % with a quarter, 5 % with half.
ROUTED_PREFIX_SHARES = (0.25, 0.5)


def fastest_routed_fallback(
    inputs: FallbackInputs, int8_path: Path, floor: float, log: Callable[[str], None] = print
) -> tuple[AgreementReport, Path]:
    """``--float-fallback auto`` for classifiers: the int8 model at ``int8_path`` and those with the first
    ``ROUTED_PREFIX_SHARES`` of the convolutions in float (``quantize_with_float_prefix``), each with its
    close calls routed to float wherever a held-out image flips (``fallback_to_float_on_close_calls``, so
    that each agrees on all of them, and ties are not decided by a flip more or less),
    timed at batch 1 on one thread over the held-out images in alternating rounds. Which one is fastest
    depends on how many close calls each leaves and on the CPU, so it is measured, not guessed. Those
    within ``SPEED_TIE`` of the fastest count as tied, and of them the one whose logits lie closest to
    float's (``mean_kl_divergence`` on the held-out images) is returned, with its agreement."""
    float_path, heldout = inputs.float_path, inputs.heldout
    total = len(conv_layers(float_path))
    reference = run_onnx(ort_session(float_path), heldout)[0]
    models: dict[str, tuple[AgreementReport, Path]] = {}
    divergence: dict[str, float] = {}
    for share in (0.0, *ROUTED_PREFIX_SHARES):
        count = max(round(total * share), len(entry_layers(float_path)) + 1) if share else None
        path = int8_path
        report = None
        if count is not None:
            report, path = quantize_with_float_prefix(inputs, count)
        label = f"{'none' if count is None else f'first {count}'} of {total} convolutions in float"
        if report is None or report.value < 1:
            routed = inputs.work / f"{path.stem}-close-calls.onnx"
            report, logits = fallback_to_float_on_close_calls(
                float_path, path, routed, heldout, reference, floor
            )
            label, path = f"{label}, close calls routed", routed
        else:
            logits = run_onnx(ort_session(path), heldout)[0]
        log(f"int8 float fallback: {label}: {report.summary()}")
        models[label] = (report, path)
        divergence[label] = mean_kl_divergence(reference, logits)
    runs = []
    for label, (_, path) in models.items():
        session = ort_session(path, 1)
        runs.append((label, cycling([session_runner(session, image[None]) for image in heldout])))
    rows = measure_alternating("float fallback", runs, rounds=3, per_pass=len(heldout))
    speeds = {row.runtime: row.images_per_s_b1 or 0.0 for row in rows}
    for label, speed in speeds.items():
        log(
            f"int8 float fallback: {label}: {speed:,.0f} images/s (batch 1, 1 thread), mean KL {divergence[label]:.4g}"
        )
    tied = [label for label, speed in speeds.items() if speed >= SPEED_TIE * max(speeds.values())]
    return models[min(tied, key=divergence.__getitem__)]


def export_int8(
    task: nn.Module,
    out: str | Path,
    calibration_paths: Sequence[Path],
    heldout_paths: Sequence[Path],
    min_agreement: float = 0.99,
    tolerance: float = DEFAULT_TOLERANCE,
    weight_bits: WeightBits | None = None,
    qat_epochs: int = 0,
    qat_lr: float = DEFAULT_QAT_LR,
    bias_correction: BiasCorrection = "auto",
    float_fallback: FloatFallbackKind = "auto",
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Float ONNX export (verified), then int8 quantisation calibrated on ``calibration_paths`` and checked
    on ``heldout_paths``; only the int8 model is written to ``out``.

    Before quantisation the folded network is prepared for int8 on the calibration images
    (``export_for_int8``): with ``qat_epochs`` > 0 fine-tuned through int8 fake quantisation towards its own
    float outputs, and with ``bias_correction`` "on" its biases corrected for the mean shift of int8
    rounding. "auto" quantises it both ways and keeps the one that agrees more with float on the held-out
    images (bias correction on a tie): with Google's weights it lowers the mean KL divergence at every width
    but flips a few more close calls than it saves at 0.75. The agreement is always measured against the
    original float export.

    Below ``min_agreement``, ``float_fallback`` lets float answer part of the work; "off" refuses instead.
    Every fallback is chosen on the held-out images, so the floor is met there by construction and a
    separate test set gives the unbiased figure.

    "close-calls" (``fallback_to_float_on_close_calls``) hands float the images whose int8 top-two margin
    is narrow: as narrow as the widest among the held-out images whose top-1 flipped. Confident images keep
    int8's speed, close calls get float's answer. ``int8_float_fallback`` in the metadata says which share
    of the held-out images went to float.

    "auto" is, for classifiers, the fastest of close-call routing on the int8 model and on those with a
    quarter or half of the first convolutions in float, ties going to the closest to float
    (``fastest_routed_fallback``; with ``qat_epochs``, close-calls alone), and "first-layers" for the other
    outputs. For 0.99 chosen on 300 real photo crops (``benchmarks/int8_agreement.py``, one thread, batch
    1): Google's 0.25-128 keeps its first 14 of 27 convolutions in float and routes 5 % of the crops (1.27x
    LiteRT's uint8 speed instead of 1.62x); 0.5-160 and 0.75-192 route 6 % and 7 % with none in float (1.87x
    and 1.99x instead of 2.12x and 2.47x). All three agree 1.000 on 40 ImageNet photos they never saw; with
    routing alone, 0.25-128 routes 22 % of the crops and agrees 0.975 there.

    "first-layers" keeps a longer run of the first convolutions in float (``float_layers``), the shortest
    that meets the floor on the held-out images, found by bisection.
    The first layers are the most sensitive (few channels; at 0.25-128 the first pointwise layer's int8
    input alone costs a fifth of the KL divergence) and the slowest in int8, and one run needs no int8
    boundary inside it. ``int8_float_fallback`` in the metadata says how many are float. For 0.99 on 300
    real photo crops (``benchmarks/int8_agreement.py``), Google's 0.75-192 keeps its first 14 of 27
    convolutions in float (1.6x LiteRT's uint8 speed instead of 2.6x) and 0.5-160 its first 25 (1.1x
    instead of 2.3x); 0.25-128 falls short even with 26 (0.987): ±0.5 grey levels of input noise alone
    flip 2.3 % of its top-1 there. Not combined with ``qat_epochs`` (each step would fine-tune again)."""
    out = Path(out)
    if float_fallback not in ("auto", "close-calls", "first-layers", "off"):
        raise ExportError(
            f"float fallback must be auto, close-calls, first-layers or off, got {float_fallback!r}"
        )
    if qat_epochs < 0:
        raise ExportError(f"--qat-epochs must be 0 or more, got {qat_epochs}")
    if bias_correction not in ("auto", "on", "off"):
        raise ExportError(f"bias correction must be auto, on or off, got {bias_correction!r}")
    bits = int8_weight_bits() if weight_bits is None else weight_bits
    with tempfile.TemporaryDirectory(prefix="mobilenets-export-") as work:
        float_result = export_onnx(task, Path(work) / "float.onnx", tolerance)
        metadata = float_result.metadata
        kind = output_kind(metadata)
        outputs = len(parse_name_list(metadata["output_names"]))  # export_onnx always records them
        classifier = kind == "logits" and outputs == 1
        fallback = float_fallback
        if fallback == "auto":
            fallback = "close-calls" if classifier else "first-layers"
        if fallback == "close-calls" and not classifier:
            raise ExportError(
                "--float-fallback close-calls needs a classifier's logits as the one output; this model has "
                f"output_kind {kind} and {outputs} output(s)"
            )
        calibration = preprocess_images(calibration_paths, metadata)
        heldout = preprocess_images(heldout_paths, metadata)
        enough = math.ceil(3 / (1 - min_agreement)) if min_agreement < 1 else 0
        if len(heldout) < enough:
            # the rule of three: no flip among n images bounds the flip rate below 3 / n (95 % confidence)
            log(
                f"note: {len(heldout)} held-out images can show an agreement of at most "
                f"{max(0.0, 1 - 3 / len(heldout)):.3f} (95 % confidence, none flipping); {min_agreement:g} takes "
                f"{enough} or more (--heldout)"
            )
        qat = {"int8_qat_epochs": str(qat_epochs), "int8_qat_lr": f"{qat_lr:g}"} if qat_epochs else {}
        choices = {"on": (True,), "off": (False,), "auto": (True, False)}[bias_correction]
        labels = {
            c: ("on" if c else "off") + (" (auto)" if bias_correction == "auto" else "") for c in choices
        }
        sources = {corrected: Path(work) / f"prepared-{corrected}.onnx" for corrected in choices}
        if not qat_epochs:
            sources[False] = float_result.path
        if qat_epochs or True in choices:  # one fine-tuning serves both choices
            export_for_int8(
                task,
                float_result.path,
                sources.get(True, sources[False]),
                calibration,
                bits,
                qat_epochs,
                qat_lr,
                True in choices,
                tolerance,
                uncorrected_out=sources[False] if qat_epochs and len(choices) == 2 else None,
            )
        candidates = []
        for corrected in choices:
            source = sources[corrected]
            quantized = Path(work) / f"int8-{corrected}.onnx"
            extra = {**qat, "int8_bias_correction": labels[corrected]}
            report = quantize_onnx(
                source, quantized, calibration, heldout, 0.0, bits, float_result.path, extra
            )
            candidates.append((report, corrected, quantized))
        report, corrected, quantized = max(candidates, key=lambda c: (c[0].value, c[1]))
        if len(candidates) > 1:
            other = next(c[0].value for c in candidates if c[1] != corrected)
            log(
                f"int8 bias correction {'kept' if corrected else 'left out'}: "
                f"{report.value:.4f} against {other:.4f}"
            )
        below = not report.value >= min_agreement
        inputs = FallbackInputs(
            task,
            float_result.path,
            Path(work),
            calibration,
            heldout,
            bits,
            corrected,
            tolerance,
            {**qat, "int8_bias_correction": labels[corrected]},
        )
        if below and fallback == "close-calls":
            log(
                f"int8 float fallback: {report.summary()} is below the floor {min_agreement:g}; routing close calls"
            )
            if float_fallback == "auto" and not qat_epochs:
                report, quantized = fastest_routed_fallback(inputs, quantized, min_agreement, log)
            else:
                routed = Path(work) / "int8-close-calls.onnx"
                reference = run_onnx(ort_session(float_result.path), heldout)[0]
                report, _ = fallback_to_float_on_close_calls(
                    float_result.path, quantized, routed, heldout, reference, min_agreement
                )
                quantized = routed
        elif below and fallback == "first-layers" and not qat_epochs:
            log(f"int8 float fallback: {report.summary()} is below the floor {min_agreement:g}; searching")
            found = search_float_prefix(inputs, min_agreement, log)
            if found.path is None:
                raise AgreementError(
                    f"{out}: {report.summary()} is below the floor {min_agreement}, and so is "
                    f"{found.report.value:.4f} ({found.report.detail}) with all but the last of the "
                    f"{found.total} convolutions in float; not written (export it without --int8)"
                )
            report, quantized = found.report, found.path
        if not report.value >= min_agreement:
            why = (
                " (--qat-epochs has no first-layers fallback)"
                if qat_epochs and fallback == "first-layers"
                else ""
            )
            raise AgreementError(
                f"{out}: {report.summary()} is below the floor {min_agreement}{why}; not written"
            )
        with atomic_path(out) as tmp:
            shutil.copyfile(quantized, tmp)
    return ExportResult(
        out,
        "onnx int8",
        float_result.max_abs_diff,
        float_result.max_rel_diff,
        onnx_metadata(out),
        report,
    )


class _Tuned(nn.Module):
    """A fine-tuned network behind the export contract, with the original task's metadata."""

    def __init__(self, network: nn.Module, metadata: dict[str, str]) -> None:
        super().__init__()
        self.network = network
        self.metadata = metadata

    def export_module(self) -> nn.Module:
        return self.network

    def export_metadata(self) -> dict[str, str]:
        return self.metadata


def torch_modules_of(module: nn.Module, node_names: Sequence[str]) -> list[nn.Module]:
    """The submodules of ``module`` that the exporter named ``/a/b/Op`` (``a.b``) in the ONNX graph."""
    named = dict(module.named_modules())
    paths = (name.strip("/").rsplit("/", 1)[0].replace("/", ".") for name in node_names)
    return [named[path] for path in paths if path in named]


def export_for_int8(
    task: nn.Module,
    float_path: Path,
    out: Path,
    calibration: np.ndarray,
    weight_bits: int,
    qat_epochs: int = 0,
    qat_lr: float = DEFAULT_QAT_LR,
    bias_correction: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
    uncorrected_out: Path | None = None,
    float_prefix: int | None = None,
) -> ExportResult:
    """The task's folded network prepared for int8 on ``calibration`` and exported (float) to ``out``:
    fine-tuned through fake quantisation for ``qat_epochs`` (``qat_finetune``), then with its biases
    corrected for the mean shift of int8 rounding (``correct_bias``); the fine-tuned network before the
    correction also goes to ``uncorrected_out`` when given. The layers ``quantize_onnx`` keeps in float
    (``float_layers`` of ``float_path`` and ``float_prefix``) are left out of both."""
    _, folded, metadata = prepare_module(task)
    kept = float_layers(float_path, float_prefix)
    network = folded
    if qat_epochs:
        on_grid = grid_weight_overrides(float_path, weight_bound(weight_bits), kept)
        if on_grid:
            log(
                f"note: {len(on_grid)} layers' weights lie on an int8 grid and would be quantised exactly; "
                "quantisation-aware fine-tuning moves them off it (on Google's official weights it agreed "
                "less with float than bias correction alone: benchmarks/int8_agreement.py)"
            )
        network = qat_finetune(
            folded,
            calibration,
            qat_epochs,
            weight_bits,
            torch_modules_of(folded, kept),
            logits=output_kind(metadata) == "logits",
            lr=qat_lr,
            log=log,
        )
    if uncorrected_out is not None:
        export_onnx(_Tuned(network, metadata), uncorrected_out, tolerance)
    if bias_correction:
        network = correct_bias(
            network, calibration, weight_bits, torch_modules_of(network, kept), reference=folded, log=log
        )
    return export_onnx(_Tuned(network, metadata), out, tolerance)


def split_calibration(paths: Sequence[Path], every: int = 5) -> tuple[list[Path], list[Path]]:
    """Hold out every ``every``-th image (never used for calibration) when no held-out folder is given."""
    heldout = [p for i, p in enumerate(paths) if i % every == every - 1]
    calibration = [p for i, p in enumerate(paths) if i % every != every - 1]
    return calibration, heldout
