import pytest
import torch
from torch import nn

from mobilenets.backbone.inference import (
    FoldError,
    count_batchnorms,
    fold_batchnorm,
    fold_batchnorm_,
    inference_model,
    recalibrate_batchnorm,
)
from mobilenets.backbone.mobilenet import MobileNetV1


def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that folding has something to fold."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(padding="tf", bn_eps=1e-3, activation="relu6"), dict(full_conv=True), dict(shallow=True)],
)
def test_folding_preserves_outputs_and_removes_every_batchnorm(options: dict) -> None:
    model = MobileNetV1(num_classes=7, width_mult=0.25, **options).eval()
    randomize_batchnorm(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        got = folded(x)
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    assert (got - expected).abs().max() < 1e-5
    # the original keeps its batch norms and outputs
    assert count_batchnorms(model) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.equal(model(x).detach(), expected)


def test_folding_reaches_heads_built_from_sequentials() -> None:
    head = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), head).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 16, 16)
    folded = fold_batchnorm(model)
    assert count_batchnorms(folded) == 0
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-5


def test_in_place_folding_refuses_training_mode() -> None:
    model = MobileNetV1(num_classes=3, width_mult=0.25).train()
    with pytest.raises(FoldError, match="training mode"):
        fold_batchnorm_(model)


def test_inference_model_matches_eager_in_channels_last_without_grad() -> None:
    model = MobileNetV1(num_classes=5, width_mult=0.25).eval()
    randomize_batchnorm(model)
    fast = inference_model(model)
    x = torch.randn(2, 3, 64, 64)
    got = fast(x)
    assert not got.requires_grad
    assert fast.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (got - model(x)).abs().max() < 1e-5
    nchw = inference_model(model, channels_last=False)
    assert (nchw(x) - got).abs().max() < 1e-5


def test_recalibrated_batchnorm_normalises_activations() -> None:
    model = MobileNetV1(num_classes=0, width_mult=0.25).eval()
    batches = [torch.randn(4, 3, 64, 64) * 3 + 1 for _ in range(2)]
    recalibrate_batchnorm(model, batches)
    assert not model.training and not model.stem.bn.training
    with torch.no_grad():
        stem = model.stem.bn(model.stem.conv(torch.cat(batches)))
    # exact batch statistics: each channel normalised to mean 0, variance ~1
    assert stem.mean((0, 2, 3)).abs().max() < 1e-3
    assert (stem.var((0, 2, 3)) - 1).abs().max() < 0.05
