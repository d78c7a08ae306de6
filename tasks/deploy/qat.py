"""Preparing a network for int8 with ONNX Runtime's scheme simulated in PyTorch (``fake_quantized``): bias
correction (``correct_bias``, ``mobilenets export --int8 --bias-correction``) and quantisation-aware
fine-tuning (``qat_finetune``, ``--qat-epochs N``), each on the calibration images, with no labels.

Post-training int8 of MobileNet v1 loses most at small widths: at 0.25-128 with Google's weights, top-1
agreement with float is 0.84 on real photo crops. Neither the calibration method (min-max, percentile,
entropy: activations are clipped to ReLU6's range anyway) nor keeping layers in float helps much: with 20 of
the 27 convolutions in float agreement is still 0.91. Two things do. Google's weights come from an int8 file,
and ONNX Runtime's max-based scales round them a second time; that costs more than all the activations'
rounding, and re-quantising them on their own grid (``grid_weight_scales``) removes it: 0.84 -> 0.92.
What remains is mostly a shift: rounding ReLU6's small activations (one step is 0.024, and a third of the
last layers' activations lie below it) moves each channel's mean, and the shifts add up through the layers.
Cancelling them in the biases, layer by layer (``correct_bias``), gives 0.96, against 0.92 for Google's own
uint8 file and 0.977 for the float model fed ±0.5 grey levels of noise (``benchmarks/int8_agreement.py``).
Fine-tuning moves the weights off their grid, so it helps only weights that never were int8.

The scheme is that of ``quantize_onnx``: weights per output channel, symmetric, in [-127, 127] (8-bit) or
[-64, 64] (7-bit, ONNX Runtime's ``reduce_range``); the input of every convolution per tensor, asymmetric
uint8 over the min-max of the calibration images (the range ONNX Runtime's calibration finds for the same
tensor); the layers that produce outputs (``output_layers``) stay in float. The fine-tuning loss is the
distance to the float network's outputs (plus, for logits, the KL divergence of the softmax).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

#: Adam's learning rate. Measured at 0.25-128 on real photo crops (top-1 agreement of int8 with float on
#: 300 crops of 3 photos the fine-tuning never saw): no QAT 0.84; 3 epochs at 3e-5 0.87; 10 at 1e-4 0.93;
#: 30 at 1e-4 0.89 (it starts to fit the calibration photos).
DEFAULT_QAT_LR = 1e-4
DEFAULT_QAT_BATCH = 32
#: Calibration images bias correction measures its means on (evenly spaced among them). At 0.25-128 on real
#: photo crops, 32, 64, 128 and 256 images give the same agreement (0.92-0.93) and mean KL (0.0065-0.0074),
#: in 2, 3, 5 and 13 s.
BIAS_CORRECTION_IMAGES = 64


#: How far from an integer multiple of a grid's step a weight may lie and still count as on the grid (float32
#: rounding of a dequantised, batch-norm-folded weight is ~1e-5 steps).
GRID_TOLERANCE = 1e-3


def weight_bound(bits: int) -> int:
    """The largest integer magnitude of a symmetric int8 weight of ``bits``: 127 for 8 bits, 64 for 7 (ONNX
    Runtime's ``reduce_range``)."""
    if bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {bits!r}")
    return 127 if bits == 8 else 64


def _smallest_gap(magnitudes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Smallest step between sorted ``magnitudes`` along the last axis (from 0 up), ignoring steps of at
    most ``noise``; inf where there is none."""
    gaps = torch.diff(magnitudes, dim=-1, prepend=torch.zeros_like(magnitudes[..., :1]))
    return torch.where(gaps > noise, gaps, torch.full_like(gaps, float("inf"))).amin(-1)


def grid_weight_scales(weight: torch.Tensor | np.ndarray, bound: int) -> torch.Tensor | None:
    """Per-output-channel scales that re-quantise a weight losslessly where it already lies on a grid, else
    None.

    Weights read from an int8 file (Google's official ``_quant.tflite`` MobileNets, the built-in
    ``official:`` weights) are integer multiples of one step per tensor, or per channel (per-channel files,
    or once batch norm re-estimated on them is folded in). Max-based scales (max |w| / bound) would round them
    a second time onto another grid: at 0.25-128 that second rounding costs more than all the activations'
    (mean KL from float 0.055 against 0.004). Each channel takes the tensor's step, else its own, where its
    weights are integer multiples of it within [-bound, bound], so it is exact; the rest take their
    max-based scale."""
    w = torch.from_numpy(np.array(weight, np.float64)) if isinstance(weight, np.ndarray) else weight.double()
    w = w.detach().flatten(1)
    largest = w.abs().amax(1)
    noise = 1e-6 * largest  # float32 rounding of folded weights that were equal
    tensor_step = _smallest_gap(torch.unique(w.abs()), noise.max())
    channel_steps = _smallest_gap(w.abs().sort(1).values, noise[:, None])
    scales = (largest / bound).clamp_min(1e-12)
    exact = torch.zeros(len(w), dtype=torch.bool)
    for step in (tensor_step.expand(len(w)), channel_steps):
        ratio = w / step[:, None]
        on_grid = (ratio - ratio.round()).abs().amax(1) <= GRID_TOLERANCE
        fits = step.isfinite() & on_grid & ((largest / step).round() <= bound) & ~exact
        scales = torch.where(fits, step, scales)
        exact |= fits
    return scales.float() if bool(exact.any()) else None


class _PerChannelWeightFakeQuant(nn.Module):
    """Symmetric per-output-channel fake quantisation of a weight (straight-through gradient), over max |w| /
    ``bound`` per channel, or over fixed ``scales``."""

    def __init__(self, bound: int, scales: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bound = bound
        self.scales = scales

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        reduce = tuple(range(1, weight.dim()))
        scale = self.scales
        if scale is None:
            scale = (weight.detach().abs().amax(dim=reduce) / self.bound).clamp_min(1e-12)
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -self.bound, self.bound)


def _uint8_params(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of uint8 over [min(low, 0), max(high, 0)], as ONNX Runtime computes them."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    return scale, round(-low / scale)


def input_ranges(
    module: nn.Module, layers: Sequence[nn.Module], images: torch.Tensor, batch_size: int = DEFAULT_QAT_BATCH
) -> list[tuple[float, float]]:
    """(min, max) of each layer's input over ``images``: the range min-max calibration gives it."""
    lows = [float("inf")] * len(layers)
    highs = [float("-inf")] * len(layers)

    def observe(index: int) -> Callable:
        def hook(_: nn.Module, args: tuple) -> None:
            lows[index] = min(lows[index], float(args[0].min()))
            highs[index] = max(highs[index], float(args[0].max()))

        return hook

    handles = [layer.register_forward_pre_hook(observe(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                module(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return list(zip(lows, highs))


def _outputs(value: object) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value)  # type: ignore[arg-type]


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], logits: bool) -> torch.Tensor:
    """Mean squared distance to the teacher's outputs, each relative to its own mean square, plus (logits)
    the KL divergence of the softmax, which weighs the close top classes whose order agreement counts."""
    loss = sum(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8) for s, t in zip(student, teacher))
    if logits:
        loss = loss + F.kl_div(
            student[0].log_softmax(1), teacher[0].log_softmax(1), log_target=True, reduction="batchmean"
        )
    return loss  # type: ignore[return-value]


@contextlib.contextmanager
def fake_quantized(
    teacher: nn.Module,
    student: nn.Module,
    images: torch.Tensor,
    weight_bits: int,
    kept: Sequence[nn.Module] = (),
    batch_size: int = DEFAULT_QAT_BATCH,
    grid_weights: bool = True,
) -> Iterator[list[tuple[nn.Conv2d, nn.Conv2d]]]:
    """Within the block, every convolution of ``student`` (a copy of ``teacher``) but the ``kept`` ones of
    ``teacher`` computes what ONNX Runtime's int8 export computes: its weight rounded per output channel and
    its input per tensor over the range min-max calibration on ``images`` gives ``teacher``'s same layer.
    With ``grid_weights``, a weight that lies on a grid is rounded on it (``grid_weight_scales``), as
    ``quantize_onnx`` rounds it; fine-tuning, which moves the weights off any grid, turns it off.
    Yields (teacher's, student's) fake-quantised convolutions in order; leaves no fake quantisation behind."""
    bound = weight_bound(weight_bits)
    kept_ids = {id(m) for m in kept}
    pairs = [
        (t, s)
        for t, s in zip(teacher.modules(), student.modules())
        if isinstance(t, nn.Conv2d) and id(t) not in kept_ids
    ]
    layers = [s for _, s in pairs]
    ranges = input_ranges(teacher, [t for t, _ in pairs], images, batch_size)
    handles = []
    try:
        for layer, (low, high) in zip(layers, ranges):
            scales = grid_weight_scales(layer.weight, bound) if grid_weights else None
            parametrize.register_parametrization(layer, "weight", _PerChannelWeightFakeQuant(bound, scales))
            scale, zero = _uint8_params(low, high)
            handles.append(
                layer.register_forward_pre_hook(
                    lambda _, args, s=scale, z=zero: (
                        torch.fake_quantize_per_tensor_affine(args[0], s, z, 0, 255),
                    )
                )
            )
        yield pairs
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def qat_finetune(
    folded: nn.Module,
    images: np.ndarray,
    epochs: int,
    weight_bits: int = 8,
    kept: Sequence[nn.Module] = (),
    logits: bool = True,
    lr: float = DEFAULT_QAT_LR,
    batch_size: int = DEFAULT_QAT_BATCH,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """A copy of ``folded`` (batch norm folded, eval mode) fine-tuned for ``epochs`` passes over ``images``
    (and their horizontal flips) through int8 fake quantisation, towards ``folded``'s own outputs.

    The returned module is a plain float network (no fake quantisation left in it) whose weights int8
    quantisation then rounds with less loss; ``folded`` is not changed.
    """
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits!r}")
    teacher = folded.eval()
    student = copy.deepcopy(folded).eval()  # eval: no dropout, and no batch norm is left to update
    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        targets = [_outputs(teacher(chunk)) for chunk in data.split(batch_size)]
        flipped = [_outputs(teacher(chunk.flip(-1))) for chunk in data.split(batch_size)]
    parameters = [p for p in student.parameters() if p.is_floating_point()]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    steps = epochs * 2 * len(targets)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    fake = fake_quantized(teacher, student, data, weight_bits, kept, batch_size, grid_weights=False)
    with fake, torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(2 * len(targets), generator=generator).tolist()
            total = 0.0
            for index in order:
                chunk_index, flip = divmod(index, 2)
                chunk = data[chunk_index * batch_size : (chunk_index + 1) * batch_size]
                target = (flipped if flip else targets)[chunk_index]
                optimizer.zero_grad()
                loss = distillation_loss(_outputs(student(chunk.flip(-1) if flip else chunk)), target, logits)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
            if log is not None:
                log(
                    f"quantisation-aware fine-tuning: epoch {epoch + 1}/{epochs}, loss {total / len(order):.4f}"
                )
    student.requires_grad_(False)
    return student.eval()


class _Reached(Exception):
    """Raised by a forward hook to stop the forward pass at the layer it measured."""


def _mean_outputs(
    network: nn.Module, layers: Sequence[nn.Module], images: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Per-channel mean of each of ``layers``' outputs over ``images`` (a layer applied more than once per
    forward counts its first application); the network is run only as far as the last of them."""
    totals: list[torch.Tensor | float] = [0.0] * len(layers)
    counts = [0] * len(layers)
    seen: set[int] = set()

    def observe(index: int) -> Callable:
        def hook(_: nn.Module, __: tuple, output: torch.Tensor) -> None:
            if index in seen:
                return
            seen.add(index)
            totals[index] = totals[index] + output.double().sum((0, 2, 3))
            counts[index] += output.shape[0] * output.shape[2] * output.shape[3]
            if index == len(layers) - 1:
                raise _Reached

        return hook

    handles = [layer.register_forward_hook(observe(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                seen.clear()
                with contextlib.suppress(_Reached):
                    network(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.as_tensor(total / max(count, 1)).float() for total, count in zip(totals, counts)]


def correct_bias(
    folded: nn.Module,
    images: np.ndarray,
    weight_bits: int = 8,
    kept: Sequence[nn.Module] = (),
    batch_size: int = DEFAULT_QAT_BATCH,
    max_images: int = BIAS_CORRECTION_IMAGES,
    reference: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """A copy of ``folded`` whose convolution biases cancel the mean shift int8 rounding adds to their
    outputs (empirical bias correction, Finkelstein et al. 2019; Nagel et al. 2019).

    Layer by layer from the input, the per-channel mean of each convolution's output over ``images`` is
    measured with every layer up to it fake-quantised (as ``fake_quantized``, earlier corrections included)
    and in the float ``reference`` (default ``folded``; the network before fine-tuning when ``folded`` is
    quantisation-aware fine-tuned: its own float outputs have moved away); the difference is taken off its
    bias. At most ``max_images`` of ``images`` are used.
    Rounding ReLU6 activations to 8 bits pulls them towards zero (at 0.25-128 over a third of the last
    layers' activations lie below half a step), and the shift adds up through the layers. With the weights
    exact (``grid_weight_scales``), correcting it takes the mean KL divergence from float at 0.25-128 on real
    photo crops from 0.0057 to 0.0041.
    """
    teacher = folded.eval()
    student = copy.deepcopy(folded).eval()
    if len(images) > max_images:
        images = images[np.linspace(0, len(images) - 1, max_images).astype(int)]
    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    reference = teacher if reference is None else reference.eval()
    with fake_quantized(teacher, student, data, weight_bits, kept, batch_size) as pairs:
        position = {id(m): i for i, m in enumerate(teacher.modules())}
        targets = list(reference.modules())
        reference_layers = [targets[position[id(t)]] for t, _ in pairs]
        float_means = _mean_outputs(reference, reference_layers, data, batch_size)
        for index, ((_, layer), float_mean) in enumerate(zip(pairs, float_means)):
            (int8_mean,) = _mean_outputs(student, [layer], data, batch_size)
            with torch.no_grad():
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(layer.out_channels))
                layer.bias -= int8_mean - float_mean
            if log is not None and (index + 1) % 10 == 0:
                log(f"int8 bias correction: {index + 1}/{len(pairs)} layers")
    student.requires_grad_(False)
    return student
