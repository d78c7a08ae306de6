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
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


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
