"""``--format tflite`` through litert-torch, an optional extra: without it, or when it cannot lower an
operator, the export is one clear error and writes nothing."""

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from mobilenets.tasks.deploy.export import ExportError
from mobilenets.tasks.deploy.tflite_export import export_tflite, metadata_path


class Spectral(nn.Module):
    """A network with a 2-D FFT, behind the export contract."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def export_module(self) -> nn.Module:
        return self

    def export_metadata(self) -> dict[str, str]:
        return {"task": "test", "input_size": "32", "mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(self.conv(x)).abs().mean((2, 3))


def test_without_litert_torch_the_error_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if not installed
    out = tmp_path / "model.tflite"
    with pytest.raises(ExportError, match=r"pip install 'mobilenets\[tflite-export\]'"):
        export_tflite(Spectral().eval(), out)
    assert list(tmp_path.iterdir()) == []


def converter_raising(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """A stand-in for litert-torch whose ``convert`` raises ``error``."""

    def convert(module: nn.Module, args: tuple) -> None:
        raise error

    monkeypatch.setitem(sys.modules, "litert_torch", types.SimpleNamespace(convert=convert))


def test_an_operator_the_converter_cannot_lower_is_quoted_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # litert-torch 0.10's own message for this network (measured with the real converter)
    converter_raising(
        monkeypatch, NotImplementedError("Only 1D FFT on the last dimension is currently supported.\nmore")
    )
    out = tmp_path / "model.tflite"
    with pytest.raises(
        ExportError,
        match=r"model.tflite: litert-torch cannot convert the model: NotImplementedError: Only 1D FFT on the "
        r"last dimension is currently supported.$",
    ):
        export_tflite(Spectral().eval(), out)
    assert not out.exists() and not metadata_path(out).exists() and list(tmp_path.iterdir()) == []


class ListOutput(Spectral):
    """A network that returns a list of dicts, as Faster R-CNN does: outside the export contract."""

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        return [{"boxes": self.conv(x)}]


def test_a_network_outside_the_export_contract_is_refused_before_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converter_raising(monkeypatch, AssertionError("the converter must not be reached"))
    out = tmp_path / "model.tflite"
    with pytest.raises(ExportError, match=r"must return a tensor or a tuple of tensors, got list"):
        export_tflite(ListOutput().eval(), out)
    assert list(tmp_path.iterdir()) == []
