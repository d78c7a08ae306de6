"""An exported ``.onnx`` model served by ONNX Runtime behind a torch ``forward``, so that a task's own
predict loop (``mobilenets predict --ckpt_path model.onnx``) runs on it instead of its PyTorch network.

``BaseTask.use_exported(path)`` attaches one after ``check_export_metadata`` has matched the file's metadata
against the task; the task's ``predict_network(images)`` then goes through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.tasks.deploy.export import ExportError, onnx_metadata, ort_session, parse_floats, run_onnx

#: Relative tolerance for mean/std read back from metadata text.
NORMALIZATION_TOLERANCE = 1e-6


class ExportMismatchError(MobilenetsError, ValueError):
    """An exported model that does not fit the task or config it is attached to; the message names the file,
    the metadata key, the expected and the found value."""


class OnnxNetwork(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU: an image batch in, torch tensors on the input's device
    out (one tensor, or a tuple when the model has several outputs).

    It holds no parameters: ``.to(device)`` changes nothing and the session always runs on the CPU.

    Args:
        path: an ``.onnx`` file written by ``mobilenets export`` (float or int8).
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX model not found")
        try:
            self.metadata: dict[str, str] = onnx_metadata(self.path)
            self.session = ort_session(self.path, threads)
        except Exception as error:  # protobuf decode errors, ORT load failures: name the file
            raise ExportError(
                f"{self.path}: cannot load as ONNX ({type(error).__name__}: {error})"
            ) from error
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExportError(f"{self.path}: expected one image input, the model has {len(inputs)}")
        shape = inputs[0].shape
        # exports have a dynamic batch axis and a fixed image size: ORT's own error does not say which
        self.image_size = (
            tuple(shape[2:]) if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]) else None
        )
        self.output_names = [output.name for output in self.session.get_outputs()]

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if images.ndim != 4:
            raise ValueError(f"{self.path}: expected an (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        if self.image_size is not None and tuple(images.shape[2:]) != self.image_size:
            height, width = self.image_size
            raise ValueError(
                f"{self.path}: the model takes {height}x{width} images, got "
                f"{images.shape[2]}x{images.shape[3]}; set the data's input_size to {height}"
            )
        outputs = run_onnx(self.session, images.detach().to("cpu", torch.float32))
        tensors = tuple(torch.from_numpy(output).to(images.device) for output in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def extra_repr(self) -> str:
        return f"{self.path}, outputs={self.output_names}"


def check_export_metadata(
    path: str | Path,
    metadata: Mapping[str, str],
    task_name: str,
    input_size: int,
    mean: Any,
    std: Any,
) -> None:
    """Refuse an export made by another task class, at another input size or with another normalisation:
    an ``ExportMismatchError`` naming the file, the key, what this task expects and what the file holds."""

    def mismatch(key: str, expected: Any, found: Any) -> ExportMismatchError:
        return ExportMismatchError(
            f"{path}: metadata key {key!r}: this config expects {expected}, the export has {found}"
        )

    for key in ("task", "input_size", "mean", "std"):
        if key not in metadata:
            raise ExportMismatchError(
                f"{path}: metadata key {key!r} is missing; export the model with 'mobilenets export'"
            )
    if metadata["task"] != task_name:
        raise mismatch("task", repr(task_name), repr(metadata["task"]))
    if metadata["input_size"].strip() != str(int(input_size)):
        raise mismatch("input_size", int(input_size), metadata["input_size"])
    for key, expected in (("mean", mean), ("std", std)):
        found = parse_floats(metadata[key], key)
        expected = tuple(float(v) for v in expected)
        if len(found) != len(expected) or any(
            abs(f - e) > NORMALIZATION_TOLERANCE * max(1.0, abs(e)) for f, e in zip(found, expected)
        ):
            raise mismatch(key, ",".join(map(str, expected)), metadata[key])
