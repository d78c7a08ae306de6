"""Mult-add and parameter counting as the paper counts them, and the paper's Tables 3-9 as data.

Mult-adds are multiply-accumulates of convolutions and fully connected layers (batch norm, activations,
pooling and biases are not counted, as in the paper). Parameters are the learnable weights of the model
(batch-norm scales and shifts included; they change no printed figure at the paper's precision).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mobilenets.backbone.mobilenet import MobileNetV1, SeparableBlock


@dataclass(frozen=True)
class Profile:
    """Counts for one model at one input size."""

    mult_adds: int
    parameters: int

    @property
    def million_mult_adds(self) -> float:
        return self.mult_adds / 1e6

    @property
    def million_parameters(self) -> float:
        return self.parameters / 1e6


def _layer_mult_adds(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_mult_adds(model: nn.Module, inputs: torch.Tensor | list[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass, per input image.

    Works for any module made of ``Conv2d``/``Linear`` layers, detectors included: a layer that runs on
    many crops (a box head on 300 proposals) is counted for each crop.
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += _layer_mult_adds(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    batch = len(inputs) if isinstance(inputs, list) else inputs.shape[0]
    return total // batch


def count_parameters(model: nn.Module | Iterable[nn.Parameter]) -> int:
    params = model.parameters() if isinstance(model, nn.Module) else model
    return sum(p.numel() for p in params)


def profile_model(model: nn.Module, input_size: int | tuple[int, int], in_channels: int = 3) -> Profile:
    """Count mult-adds and parameters of ``model`` on one ``input_size`` image."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    parameter = next(model.parameters(), None)  # a task being tested on a GPU is profiled where it is
    x = torch.zeros(1, in_channels, height, width, device=parameter.device if parameter is not None else None)
    return Profile(count_mult_adds(model, x), count_parameters(model))


def profile_backbone(
    width_mult: float = 1.0,
    input_size: int = 224,
    num_classes: int = 1000,
    full_conv: bool = False,
    shallow: bool = False,
) -> Profile:
    model = MobileNetV1(num_classes=num_classes, width_mult=width_mult, full_conv=full_conv, shallow=shallow)
    return profile_model(model, input_size)


# --------------------------------------------------------------------------- the paper's tables
@dataclass(frozen=True)
class PaperRow:
    """One row of the paper with how to rebuild it here (None for models outside this suite)."""

    table: int
    model: str
    top1: float
    mult_adds: float  # millions
    parameters: float  # millions
    width_mult: float | None = None
    input_size: int = 224
    full_conv: bool = False
    shallow: bool = False
    checked: bool = True  # the issue's 1% promise applies to this row

    def ours(self) -> Profile | None:
        if self.width_mult is None:
            return None
        return profile_backbone(self.width_mult, self.input_size, 1000, self.full_conv, self.shallow)


PAPER_IMAGENET_ROWS: tuple[PaperRow, ...] = (
    PaperRow(4, "Conv MobileNet", 71.7, 4866, 29.3, 1.0, full_conv=True),
    PaperRow(4, "MobileNet", 70.6, 569, 4.2, 1.0),
    # Table 5's rows are printed with a different rounding than the other tables (0.75 → 2.6M here but
    # 1.9M + 0.77M classifier elsewhere); they are shown, not promised.
    PaperRow(5, "0.75 MobileNet", 68.4, 325, 2.6, 0.75, checked=False),
    PaperRow(5, "Shallow MobileNet", 65.3, 307, 2.9, 1.0, shallow=True, checked=False),
    PaperRow(6, "1.0 MobileNet-224", 70.6, 569, 4.2, 1.0),
    PaperRow(6, "0.75 MobileNet-224", 68.4, 325, 2.6, 0.75),
    PaperRow(6, "0.5 MobileNet-224", 63.7, 149, 1.3, 0.5),
    PaperRow(6, "0.25 MobileNet-224", 50.6, 41, 0.5, 0.25),
    PaperRow(7, "1.0 MobileNet-224", 70.6, 569, 4.2, 1.0, 224),
    PaperRow(7, "1.0 MobileNet-192", 69.1, 418, 4.2, 1.0, 192),
    PaperRow(7, "1.0 MobileNet-160", 67.2, 290, 4.2, 1.0, 160),
    PaperRow(7, "1.0 MobileNet-128", 64.4, 186, 4.2, 1.0, 128),
    PaperRow(8, "1.0 MobileNet-224", 70.6, 569, 4.2, 1.0),
    PaperRow(8, "GoogleNet", 69.8, 1550, 6.8),
    PaperRow(8, "VGG 16", 71.5, 15300, 138),
    PaperRow(9, "0.50 MobileNet-160", 60.2, 76, 1.32, 0.5, 160),
    PaperRow(9, "SqueezeNet", 57.5, 1700, 1.25),
    PaperRow(9, "AlexNet", 57.2, 720, 60),
)


@dataclass(frozen=True)
class LayerRow:
    """A row of Table 3: one 3x3 layer, M = N = 512 at D_F = 14, then the paper's reductions."""

    model: str
    mult_adds: float
    parameters: float
    separable: bool
    width_mult: float
    feature_size: int

    def ours(self) -> Profile:
        channels = int(512 * self.width_mult)
        layer: nn.Module
        if self.separable:
            layer = SeparableBlock(channels, channels, 1, "relu", "torch", 1e-5)
        else:
            layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        x = torch.zeros(1, channels, self.feature_size, self.feature_size)
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        return Profile(count_mult_adds(layer, x), sum(count_parameters(c) for c in convs))


PAPER_TABLE3: tuple[LayerRow, ...] = (
    LayerRow("Convolution", 462, 2.36, False, 1.0, 14),
    LayerRow("Depthwise separable conv", 52.3, 0.27, True, 1.0, 14),
    LayerRow("α = 0.75", 29.6, 0.15, True, 0.75, 14),
    LayerRow("ρ = 0.714", 15.1, 0.15, True, 0.75, 10),
)


def relative_difference(ours: float, paper: float) -> float:
    return (ours - paper) / paper


def printed_decimals(value: float) -> int:
    text = repr(float(value))
    return 0 if text.endswith(".0") else len(text.split(".")[1])


def agrees_with_paper(ours: float, paper: float, tolerance: float = 0.01) -> bool:
    """Within ``tolerance`` of the paper, or equal once rounded as the paper printed it.

    The paper prints 0.25 MobileNet-224's 0.47 M parameters as "0.5": a 6% gap that is only rounding.
    """
    half_unit = 0.5 * 10 ** -printed_decimals(paper)
    return abs(ours - paper) <= max(tolerance * abs(paper), half_unit + 1e-12)


def format_paper_tables() -> str:
    """Tables 3-9 with the paper's figure, ours and the difference for mult-adds and parameters."""
    lines = [
        "Table 3: one layer, D_K=3, M=N=512, D_F=14",
        f"{'layer':<28}{'MAdds paper':>12}{'ours':>9}{'diff':>8}{'Params paper':>14}{'ours':>8}{'diff':>8}",
    ]
    for row in PAPER_TABLE3:
        ours = row.ours()
        lines.append(
            f"{row.model:<28}{row.mult_adds:>12.1f}{ours.million_mult_adds:>9.1f}"
            f"{relative_difference(ours.million_mult_adds, row.mult_adds):>+8.1%}"
            f"{row.parameters:>14.2f}{ours.million_parameters:>8.2f}"
            f"{relative_difference(ours.million_parameters, row.parameters):>+8.1%}{_agreement(ours, row)}"
        )
    table = None
    for row in PAPER_IMAGENET_ROWS:
        if row.table != table:
            table = row.table
            lines += [
                "",
                f"Table {table}: ImageNet (million mult-adds / million parameters)",
                f"{'model':<22}{'top-1':>7}{'MAdds paper':>12}{'ours':>9}{'diff':>8}"
                f"{'Params paper':>14}{'ours':>8}{'diff':>8}",
            ]
        ours = row.ours()
        head = f"{row.model:<22}{row.top1:>6.1f}%{row.mult_adds:>12.0f}"
        if ours is None:
            lines.append(f"{head}{'-':>9}{'':>8}{row.parameters:>14.2f}{'-':>8}")
            continue
        note = "" if row.checked else "  (printed with another rounding)"
        lines.append(
            f"{head}{ours.million_mult_adds:>9.0f}"
            f"{relative_difference(ours.million_mult_adds, row.mult_adds):>+8.1%}"
            f"{row.parameters:>14.2f}{ours.million_parameters:>8.2f}"
            f"{relative_difference(ours.million_parameters, row.parameters):>+8.1%}"
            f"{_agreement(ours, row)}{note}"
        )
    return "\n".join(lines)


def _agreement(ours: Profile, row: PaperRow | LayerRow) -> str:
    agree = agrees_with_paper(ours.million_mult_adds, row.mult_adds) and agrees_with_paper(
        ours.million_parameters, row.parameters
    )
    return "  ok" if agree else "  DIFFERS"


def format_profile_table(rows: list[tuple[str, Profile, tuple[float, float] | None]]) -> str:
    """A table of ``(name, ours, (paper MAdds M, paper params M) or None)`` rows."""
    lines = [f"{'model':<36}{'M mult-adds':>13}{'M params':>10}{'paper MAdds':>13}{'paper params':>14}"]
    for name, prof, paper in rows:
        paper_cols = f"{paper[0]:>13.0f}{paper[1]:>14.1f}" if paper else f"{'-':>13}{'-':>14}"
        lines.append(f"{name:<36}{prof.million_mult_adds:>13.1f}{prof.million_parameters:>10.2f}{paper_cols}")
    return "\n".join(lines)
