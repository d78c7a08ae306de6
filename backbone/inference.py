"""Inference mode: batch norm folded into the convolutions, channels_last memory, no autograd.

At inference a batch norm is a fixed per-channel affine map, so it folds into the convolution before it::

    scale = γ / sqrt(running_var + ε)
    W' = W · scale        (per output channel)
    b' = (b − running_mean) · scale + β

which removes one full pass over every feature map (half of the memory traffic of a MobileNet layer).
The ReLU that follows is left to the runtime: oneDNN (channels_last), ONNX Runtime and torch.compile fuse
it into the convolution themselves; in eager mode an in-place ReLU costs one cheap pass.

``fold_batchnorm`` works on any module tree in which a convolution is followed by its batch norm inside an
``nn.Sequential`` (every ``ConvBNAct`` of the backbone, and the heads built the same way), so the task
heads fold too without knowing their internals.

Weights that come folded (Google's TFLite MobileNets) go the other way: ``reestimate_folded_batchnorm``
gives their stand-in batch norms real statistics measured on training images, without changing the
eval-mode outputs.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Attribute ``load_pretrained`` sets on a backbone: the names of its batch norms that hold folded
#: statistics (weight √(1+ε), bias = the folded bias, running mean 0, running var 1), i.e. that only add
#: a bias in eval mode and would normalise with meaningless statistics in training mode.
FOLDED_BATCHNORM_ATTR = "folded_batchnorm"


class FoldError(ValueError):
    """A model that cannot be folded (e.g. in training mode, where batch norm uses batch statistics)."""


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (``conv`` gains a bias)."""
    if bn.running_mean is None or bn.running_var is None:
        raise FoldError(f"{bn}: batch norm without running statistics cannot be folded")
    if conv.out_channels != bn.num_features:
        raise FoldError(f"{conv} feeds {bn}: {conv.out_channels} channels vs {bn.num_features} features")
    with torch.no_grad():
        weight = conv.weight.double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (bias - bn.running_mean.double()) * scale + shift
        conv.weight = nn.Parameter(new_weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold, in place, every ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential``.

    Each folded batch norm becomes an ``nn.Identity``. Returns how many were folded.
    """
    folded = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                if bn.training:
                    raise FoldError(
                        f"batch norm {second!r} is in training mode; call model.eval() before folding"
                    )
                _fold_pair(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with its batch norms folded into the preceding convolutions.

    The original is left untouched. Outputs match the original's eval-mode outputs to float rounding.
    """
    folded = copy.deepcopy(model).eval()
    fold_batchnorm_(folded)
    return folded


def count_batchnorms(model: nn.Module) -> int:
    """How many batch-norm layers remain in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class InferenceModel(nn.Module):
    """A folded, frozen model that runs under ``torch.inference_mode`` with channels_last inputs.

    Built by ``inference_model``; call it like the original model.
    """

    def __init__(self, model: nn.Module, channels_last: bool = True) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x)


def inference_model(model: nn.Module, channels_last: bool = True) -> InferenceModel:
    """A copy of ``model`` for fast CPU inference: batch norm folded, eval mode, no gradients, and
    (by default) weights and inputs in channels_last layout, which oneDNN's depthwise and 1x1
    convolutions run fastest in."""
    folded = fold_batchnorm(model)
    folded.requires_grad_(False)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return InferenceModel(folded, channels_last).eval()


def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Set every batch norm's running statistics to the exact mean/variance over ``batches``.

    Gives a randomly initialised network the activation scales of a trained one (its default statistics
    let activations shrink layer after layer into denormal floats, which no runtime handles at full speed).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for norm, (momentum, training) in zip(norms, saved):
        norm.momentum = momentum
        norm.train(training)


@dataclass(frozen=True)
class ReestimatedNorm:
    """What ``reestimate_folded_batchnorm`` measured and set in one batch norm (per-channel tensors).

    ``mean``/``var`` are the statistics of the convolution's output over ``samples`` values per channel,
    now the running statistics; ``weight``/``bias`` the new γ and β.
    """

    name: str
    samples: int
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def folded_batchnorm_names(model: nn.Module) -> list[str]:
    """The batch norms of ``model`` (or of any module inside it) that ``load_pretrained`` marked folded."""
    names: list[str] = []
    for prefix, module in model.named_modules():
        for name in getattr(module, FOLDED_BATCHNORM_ATTR, ()):
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


def _batch_images(batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The images of a batch: a tensor, or the first item of a data loader's (images, targets, ...)."""
    return batch if isinstance(batch, torch.Tensor) else batch[0]


class _ChannelMoments:
    """Count, sum and sum of squares per channel (dimension 1) of the tensors a batch norm receives."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | float = 0.0
        self.squares: torch.Tensor | float = 0.0

    def add(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double()  # float64: sums over millions of values
        dims = [d for d in range(x.dim()) if d != 1]
        self.count += x.numel() // x.shape[1]
        self.sum = self.sum + x.sum(dims)
        self.squares = self.squares + (x * x).sum(dims)

    def mean_var(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        mean = torch.as_tensor(self.sum) / self.count
        var = (torch.as_tensor(self.squares) / self.count - mean * mean).clamp_min(0.0)
        return self.count, mean, var


def reestimate_folded_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    names: Sequence[str] | None = None,
) -> dict[str, ReestimatedNorm]:
    """Give batch norms that carry folded weights real statistics, keeping eval-mode outputs unchanged.

    A folded batch norm only adds a bias in eval mode; in training mode it would normalise with batch
    statistics and change the network completely. One eval-mode pass over ``batches`` (tensors, or
    ``(images, ...)`` tuples) measures the per-channel mean m and variance v of each such layer's input
    (its convolution's output); then with the layer's old eval map ``y = a·x + c`` the new parameters are
    γ = a·√(v+ε), β = c + a·m, running mean m and running var v: the same map in eval mode, and training
    mode now normalises by statistics close to the batches'. One pass suffices because eval outputs, hence
    the inputs of every later layer, do not change.

    ``names`` defaults to ``folded_batchnorm_names(model)``; they are unmarked afterwards. Returns what was
    set, by name.
    """
    names = list(folded_batchnorm_names(model) if names is None else names)
    if not names:
        raise ValueError(
            "no batch norm carries folded statistics: load a TFLite file with load_pretrained first, "
            "or pass names"
        )
    norms: dict[str, nn.modules.batchnorm._BatchNorm] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            raise ValueError(f"{name}: expected an affine batch norm, got {type(module).__name__}")
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"{name}: the batch norm keeps no running statistics")
        norms[name] = module

    moments = {name: _ChannelMoments() for name in norms}
    handles = [module.register_forward_pre_hook(moments[name].add) for name, module in norms.items()]
    was_training = model.training
    device = next(iter(model.parameters())).device
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(_batch_images(batch).to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    empty = [name for name, seen in moments.items() if not seen.count]
    if empty:  # checked before changing any layer
        raise ValueError(f"no values reached the batch norms {empty[:3]} (empty batches?)")
    report: dict[str, ReestimatedNorm] = {}
    with torch.no_grad():
        for name, norm in norms.items():
            count, mean, var = moments[name].mean_var()
            # the layer's current eval map y = a·x + c, whatever its statistics were
            a = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            c = norm.bias.double() - norm.running_mean.double() * a
            weight = a * torch.sqrt(var + norm.eps)
            bias = c + a * mean
            for target, value in (
                (norm.weight, weight),
                (norm.bias, bias),
                (norm.running_mean, mean),
                (norm.running_var, var),
            ):
                target.copy_(value.to(target.dtype))
            report[name] = ReestimatedNorm(
                name, count, mean.float(), var.float(), weight.float(), bias.float()
            )
    for prefix, module in model.named_modules():
        marked = getattr(module, FOLDED_BATCHNORM_ATTR, None)
        if marked:
            done = {n.removeprefix(f"{prefix}.") for n in report if not prefix or n.startswith(f"{prefix}.")}
            setattr(module, FOLDED_BATCHNORM_ATTR, tuple(n for n in marked if n not in done))
    return report
