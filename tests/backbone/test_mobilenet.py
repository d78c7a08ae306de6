import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilenets.backbone.mobilenet import (
    BLOCK_SPECS,
    Conv2dSame,
    MobileNetConfigError,
    MobileNetV1,
    SeparableBlock,
    scaled_channels,
)


@pytest.mark.parametrize("width_mult", [0.25, 0.5, 0.75, 1.0, 1.3])
def test_channels_follow_the_tf_rule(width_mult: float) -> None:
    model = MobileNetV1(num_classes=10, width_mult=width_mult)
    expected = [max(int(c * width_mult), 8) for c, _ in BLOCK_SPECS]
    assert [tap.channels for tap in model.feature_info[1:]] == expected
    assert model.feature_info[0].channels == max(int(32 * width_mult), 8)
    assert model.num_features == expected[-1]


def test_tiny_width_keeps_at_least_eight_channels() -> None:
    model = MobileNetV1(num_classes=3, width_mult=0.05)
    assert min(tap.channels for tap in model.feature_info) == 8
    assert scaled_channels(64, 0.05) == 8


@pytest.mark.parametrize("size", [32, 64, 97, 128])
def test_taps_report_true_channels_and_strides(size: int) -> None:
    model = MobileNetV1(num_classes=5, width_mult=0.25).eval()
    x = torch.randn(2, 3, size, size)
    maps = model.forward_taps(x, model.tap_names)
    assert list(maps) == model.tap_names
    for tap in model.feature_info:
        fmap = maps[tap.name]
        assert fmap.shape[1] == tap.channels
        assert fmap.shape[-1] == -(-size // tap.stride)  # ceil(size / stride)
    assert model.tap("block11").stride == 16 and model.tap("block13").stride == 32
    assert torch.allclose(maps["block13"], model.forward_features(x))
    assert model(x).shape == (2, 5)


def test_forward_taps_keeps_the_requested_order_and_stops_early() -> None:
    model = MobileNetV1(num_classes=0, width_mult=0.25).eval()
    x = torch.randn(1, 3, 64, 64)
    maps = model.forward_taps(x, ["block13", "block11"])
    assert list(maps) == ["block13", "block11"]
    with pytest.raises(KeyError, match="block14"):
        model.forward_taps(x, ["block14"])


def test_headless_and_reset_classifier() -> None:
    model = MobileNetV1(num_classes=0, width_mult=0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert torch.allclose(model(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_freeze_first_blocks_stops_gradients_and_keeps_bn_statistics() -> None:
    model = MobileNetV1(num_classes=4, width_mult=0.25)
    model.freeze(3)
    frozen = [model.stem, model.blocks.block1, model.blocks.block2, model.blocks.block3]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.blocks.block4.parameters())
    model.train()
    assert not model.stem.bn.training and model.blocks.block4.pw.bn.training
    before = model.stem.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(before, model.stem.bn.running_mean)
    assert model.blocks.block4.pw.conv.weight.grad is not None
    model.unfreeze()
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and model.stem.bn.training
    with pytest.raises(MobileNetConfigError, match="can freeze 0..13 blocks"):
        model.freeze(14)


def test_ablations_change_the_structure() -> None:
    shallow = MobileNetV1(num_classes=10, width_mult=0.25, shallow=True)
    assert shallow.tap_names == ["stem", *[f"block{i}" for i in (1, 2, 3, 4, 5, 6, 12, 13)]]
    assert shallow(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    full = MobileNetV1(num_classes=10, width_mult=0.25, full_conv=True)
    convs = [m for m in full.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.groups == 1 and c.kernel_size == (3, 3) for c in convs)
    assert full(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_activation_option() -> None:
    relu6 = MobileNetV1(num_classes=2, width_mult=0.25, activation="relu6")
    assert isinstance(relu6.stem.act, nn.ReLU6)
    assert isinstance(MobileNetV1(num_classes=2, width_mult=0.25).stem.act, nn.ReLU)


def test_tf_same_padding_pads_right_and_bottom_for_even_inputs() -> None:
    conv = Conv2dSame(3, 4, 3, stride=2, bias=False)
    x = torch.randn(1, 3, 64, 64)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    odd = torch.randn(1, 3, 65, 65)
    assert torch.allclose(conv(odd), F.conv2d(F.pad(odd, [1, 1, 1, 1]), conv.weight, stride=2), atol=1e-6)
    symmetric = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
    symmetric.weight.data.copy_(conv.weight.data)
    assert not torch.allclose(conv(x), symmetric(x))
    tf_model = MobileNetV1(num_classes=0, width_mult=0.25, padding="tf", bn_eps=1e-3).eval()
    assert tf_model.stem.bn.eps == 1e-3
    assert tf_model(torch.randn(1, 3, 96, 96)).shape == (1, tf_model.num_features)


def test_separable_block_is_depthwise_then_pointwise() -> None:
    block = SeparableBlock(16, 32, 2, "relu", "torch", 1e-5)
    assert block.dw.conv.groups == 16 and block.dw.conv.kernel_size == (3, 3)
    assert block.pw.conv.kernel_size == (1, 1) and block.pw.conv.out_channels == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width_mult": 0}, r"width_mult \(α\) must be a finite number > 0, got 0"),
        ({"width_mult": -0.5}, "must be a finite number > 0"),
        ({"width_mult": float("nan")}, "must be a finite number > 0"),
        ({"activation": "gelu"}, "activation must be 'relu' or 'relu6', got 'gelu'"),
        ({"padding": "same"}, "padding must be 'torch' or 'tf', got 'same'"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(MobileNetConfigError, match=message):
        MobileNetV1(**kwargs)


def test_too_small_input_is_a_clear_error() -> None:
    model = MobileNetV1(num_classes=2, width_mult=0.25)
    with pytest.raises(ValueError, match="input of 31x40 px is too small: MobileNet needs at least 32 px"):
        model(torch.randn(1, 3, 31, 40))
    with pytest.raises(ValueError, match="expected an image batch of shape"):
        model(torch.randn(3, 64, 64))


def test_initialisation_keeps_activations_alive_through_depthwise_blocks() -> None:
    model = MobileNetV1(num_classes=0, width_mult=0.5).eval()
    depthwise = model.blocks.block5.dw.conv.weight
    assert abs(float(depthwise.std()) - (2.0 / 9) ** 0.5) < 0.1
    features = model.forward_features(torch.randn(4, 3, 64, 64))
    assert float(features.std()) > 0.02  # a fan-out init leaves ~1e-17 here
