"""``mobilenets export --format tflite``: a task's network to a LiteRT (TFLite) flatbuffer for phones, through
Google's maintained converter ``litert-torch`` (the optional extra ``tflite-export``; the base install stays
free of it and of the JAX/TensorFlow-converter stack it brings).

The file takes float32 NCHW images at batch 1 (TFLite shapes are static), like the ONNX export takes
them; batch norm is folded first. It is verified in LiteRT's interpreter against the PyTorch model on two
inputs and written atomically: a conversion that fails or does not match leaves no file. TFLite files have
no free-form metadata here, so the export's metadata goes beside it as ``<out>.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from torch import nn

from mobilenets.datasets.atomic import atomic_path, write_text_atomic
from mobilenets.tasks.deploy.export import (
    DEFAULT_TOLERANCE,
    VERIFY_SEED,
    ExportError,
    ExportResult,
    _check,
    _reference_outputs,
    prepare_module,
    sample_inputs,
    static_same_padding,
)

INSTALL_HINT = "pip install 'mobilenets[tflite-export]'"


def metadata_path(out: Path) -> Path:
    """Where the metadata of a TFLite export is written: ``<out>.json``."""
    return out.with_name(out.name + ".json")


def export_tflite(task: nn.Module, out: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Convert ``task.export_module()`` (batch norm folded, batch 1) with litert-torch, verify it in LiteRT
    at two inputs against PyTorch and write it with its metadata beside it; nothing is written on failure.

    An operator the converter cannot lower is an :class:`ExportError` quoting the converter's message,
    which names the operator.
    """
    try:
        import litert_torch
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ExportError(
            f"--format tflite needs litert-torch and ai-edge-litert ({INSTALL_HINT}): {error}"
        ) from error
    out = Path(out)
    module, folded, metadata = prepare_module(task)
    input_size = int(metadata.get("input_size", 224))
    example = sample_inputs(input_size, 1, seed=VERIFY_SEED + 1)
    # the export contract first, as the ONNX export checks it: a network that does not return a tensor or a
    # tuple of tensors (Faster R-CNN's list of dicts) is refused by name, not by a converter trace error
    _reference_outputs(module, example)
    metadata = {**metadata, "format": "tflite", "batchnorm_folded": "true", "layout": "NCHW", "batch": "1"}
    try:
        with warnings.catch_warnings(), static_same_padding(folded, example):
            warnings.simplefilter("ignore")
            converted = litert_torch.convert(folded, (example,))
    except Exception as error:  # the converter's message names the operator it could not lower
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(
            f"{out}: litert-torch cannot convert the model: {type(error).__name__}: {first_line}"
        ) from error
    with atomic_path(out) as tmp:
        converted.export(str(tmp))
        interpreter = Interpreter(model_path=str(tmp))
        interpreter.allocate_tensors()
        diffs = []
        for seed in (VERIFY_SEED, VERIFY_SEED + 2):
            x = sample_inputs(input_size, 1, seed=seed)
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.numpy())
            interpreter.invoke()
            reference = _reference_outputs(module, x)
            got = [np.asarray(interpreter.get_tensor(d["index"])) for d in interpreter.get_output_details()]
            if len(got) != len(reference):
                raise ExportError(
                    f"{out}: the converted model has {len(got)} outputs, PyTorch {len(reference)}"
                )
            got = _match_outputs(reference, got)
            diffs.append(_check(reference, got, tolerance, str(out)))
        write_text_atomic(metadata_path(out), json.dumps(metadata, indent=1) + "\n")
    return ExportResult(out, "tflite", max(d[0] for d in diffs), max(d[1] for d in diffs), metadata)


def _match_outputs(reference: list[np.ndarray], got: list[np.ndarray]) -> list[np.ndarray]:
    """LiteRT may list a multi-output model's outputs in another order: pair each with the reference output
    of its shape (in order, for equal shapes)."""
    remaining = list(got)
    matched = []
    for ref in reference:
        index = next((i for i, g in enumerate(remaining) if g.shape == ref.shape), 0)
        matched.append(remaining.pop(index))
    return matched
