"""Pretrained weights: timm and Keras files reproduce their source model's logits; bad files fail clearly."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.weights import (
    PretrainedWeightsError,
    WeightFileNotFoundError,
    filter_keras_h5,
    filter_lightning_checkpoint,
    filter_timm_state_dict,
    find_backbone_prefix,
    load_pretrained,
)

TIMM_OPTIONS = dict(activation="relu6", padding="torch", bn_eps=1e-5)
KERAS_OPTIONS = dict(activation="relu6", padding="tf", bn_eps=1e-3)
LOGGER = "mobilenets.backbone.weights"


#: The version the released ``mobilenet_*_tf.h5`` files were written with (Keras 2, TensorFlow backend).
RELEASED_KERAS_VERSION = "2.1.3"


def randomise_batch_norm_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random affine parameters and running statistics in every batch norm, matched to the activations.

    The running statistics are measured on random images (then perturbed), so that the signal keeps its
    scale through all 27 layers instead of being drowned by the shifts: a mapping that mixes up
    gamma/beta/mean/var, flips a kernel or forgets the running stats changes the logits, and different
    images give different logits. The scales are wide enough that some activations pass 6, so ReLU and
    ReLU6 give different outputs too.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) * 2.0 + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=generator))
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average: one batch sets the exact statistics
        was_training = model.training
        model.train()
        model(torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1)
        model.train(was_training)
        for norm in norms:
            norm.momentum = 0.1
            n = norm.num_features
            norm.running_mean.add_(torch.randn(n, generator=generator) * 0.1 * norm.running_var.sqrt())
            norm.running_var.mul_(torch.rand(n, generator=generator) + 0.5)
    return model


def random_timm_mobilenet(name: str = "mobilenetv1_100", num_classes: int = 1000) -> nn.Module:
    """A randomly initialised timm MobileNetV1 with random batch-norm statistics, in eval mode."""
    import timm

    generator = torch.Generator().manual_seed(1)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.randn(num_classes, generator=generator) * 0.1)
    return randomise_batch_norm_(model, generator).eval()


def import_keras_on_torch() -> Any:
    """Keras 3 on the PyTorch backend (the backend must be chosen before keras is first imported)."""
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras was already imported with the {keras.backend.backend()!r} backend")
    return keras


def random_keras_mobilenet(alpha: float = 0.25, size: int = 128, seed: int = 2) -> Any:
    """``keras.applications.MobileNet`` without softmax, random kernels and random batch-norm statistics."""
    keras = import_keras_on_torch()
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNet(
        weights=None, alpha=alpha, input_shape=(size, size, 3), classifier_activation=None
    )
    # batch-norm statistics measured on random images, then perturbed (see randomise_batch_norm_): the
    # application is a chain of layers, so one eager pass sets each layer from the already-set ones
    x = keras.ops.convert_to_tensor(rng.uniform(-1, 1, (4, size, size, 3)).astype("float32"))
    for layer in model.layers[1:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            values = np.asarray(x.detach().cpu())
            mean, var = values.mean(axis=(0, 1, 2)), values.var(axis=(0, 1, 2))
            layer.set_weights(
                [
                    rng.uniform(0.5, 2.5, n).astype("float32"),
                    rng.normal(0, 1.0, n).astype("float32"),
                    (mean + rng.normal(0, 0.1, n) * np.sqrt(var)).astype("float32"),
                    (var * rng.uniform(0.5, 1.5, n)).astype("float32"),
                ]
            )
        elif layer.name == "conv_preds":
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype("float32")])
        x = layer(x, training=False)
    return model


def _keras2_weight_names(layer: Any) -> list[str]:
    """Weight names as Keras 2 wrote them: ``conv_dw_1/depthwise_kernel:0``, ``conv1_bn/gamma:0``."""
    names = []
    for weight in layer.trainable_weights + layer.non_trainable_weights:
        short = weight.path.rsplit("/", 1)[-1]
        if type(layer).__name__ == "DepthwiseConv2D" and short == "kernel":
            short = "depthwise_kernel"
        names.append(f"{layer.name}/{short}:0")
    return names


def write_released_keras_h5(model: Any, path: Path) -> Path:
    """Write ``model``'s weights in the layout of the released ``mobilenet_*_tf.h5`` files.

    That is Keras 2's weights-only HDF5 (``save_weights``): root attributes ``layer_names``,
    ``backend``, ``keras_version``; one group per layer (weightless layers included) whose
    ``weight_names`` attribute lists names like ``conv_dw_1/depthwise_kernel:0``, each stored as a dataset
    at that path inside the layer group (so ``conv_dw_1/conv_dw_1/depthwise_kernel:0``).
    """
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = [layer.name.encode("utf8") for layer in model.layers]
        h5.attrs["backend"] = b"tensorflow"
        h5.attrs["keras_version"] = RELEASED_KERAS_VERSION.encode("utf8")
        for layer in model.layers:
            group = h5.create_group(layer.name)
            names = _keras2_weight_names(layer)
            group.attrs["weight_names"] = [name.encode("utf8") for name in names]
            values = [np.asarray(w.numpy()) for w in layer.trainable_weights + layer.non_trainable_weights]
            for name, value in zip(names, values):
                group.create_dataset(name, data=value)
    return path


def keras_logits(model: Any, images_nchw: torch.Tensor) -> torch.Tensor:
    """The Keras model's (pre-softmax) outputs for a PyTorch NCHW batch."""
    channels_last = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
    out = model(channels_last, training=False)
    return torch.as_tensor(np.asarray(out.detach().cpu() if hasattr(out, "detach") else out))


def truncate_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """A copy of ``src`` cut after ``fraction`` of its bytes: what an interrupted download leaves."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random timm mobilenetv1_100 saved as .safetensors and .pth, with its logits on 64 px images."""
    root = tmp_path_factory.mktemp("timm")
    model = random_timm_mobilenet("mobilenetv1_100")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    save_file(model.state_dict(), str(root / "mobilenetv1_100.safetensors"))
    torch.save(model.state_dict(), root / "mobilenetv1_100.pth")
    return {
        "safetensors": root / "mobilenetv1_100.safetensors",
        "pth": root / "mobilenetv1_100.pth",
        "images": images,
        "logits": _logits(model, images),
        "features": model.forward_features(images).detach(),
    }


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_weights_reproduce_timm_logits(timm_files: dict[str, Any], suffix: str) -> None:
    ours = MobileNetV1(num_classes=1000, **TIMM_OPTIONS)
    load_pretrained(ours, timm_files[suffix])
    assert _max_diff(_logits(ours, timm_files["images"]), timm_files["logits"]) < 1e-4


def test_timm_125_weights_reproduce_timm_logits(tmp_path: Path) -> None:
    model = random_timm_mobilenet("mobilenetv1_125", num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "mobilenetv1_125.safetensors"))
    images = torch.randn(1, 3, 64, 64)
    ours = MobileNetV1(num_classes=10, width_mult=1.25, **TIMM_OPTIONS)
    load_pretrained(ours, tmp_path / "mobilenetv1_125.safetensors")
    assert _max_diff(_logits(ours, images), _logits(model, images)) < 1e-4


def test_timm_key_mapping_covers_every_tensor(timm_files: dict[str, Any]) -> None:
    state_dict = torch.load(timm_files["pth"], weights_only=True)
    ours = MobileNetV1(**TIMM_OPTIONS)
    mapped = filter_timm_state_dict(state_dict, ours)
    assert set(mapped) == set(ours.state_dict())
    assert torch.equal(mapped["blocks.block7.dw.conv.weight"], state_dict["blocks.3.1.conv_dw.weight"])
    assert torch.equal(mapped["blocks.block13.pw.bn.running_var"], state_dict["blocks.4.1.bn2.running_var"])
    # a DataParallel-wrapped state dict maps the same way
    wrapped = {f"module.{key}": value for key, value in state_dict.items()}
    assert set(filter_timm_state_dict(wrapped, ours)) == set(mapped)


def test_timm_weights_into_relu_backbone_warn_and_differ(
    timm_files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ours = MobileNetV1(activation="relu")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_pretrained(ours, timm_files["safetensors"])
    assert "activation='relu'" in caplog.text and "relu6" in caplog.text
    # the generated BN shifts push activations past 6, so the wrong activation is visible in the logits
    assert _max_diff(_logits(ours, timm_files["images"]), timm_files["logits"]) > 1e-2


def test_classifier_of_another_size_is_dropped_with_a_log_line(
    timm_files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ours = MobileNetV1(num_classes=10, **TIMM_OPTIONS)
    classifier_before = ours.classifier.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_pretrained(ours, timm_files["safetensors"])
    assert "dropping the file's 1000-class classifier" in caplog.text and "10 classes" in caplog.text
    assert torch.equal(ours.classifier.weight, classifier_before)
    features = ours.eval().forward_features(timm_files["images"])
    assert _max_diff(features, timm_files["features"]) < 1e-4


def test_headless_backbone_drops_the_classifier(
    timm_files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ours = MobileNetV1(num_classes=0, **TIMM_OPTIONS)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_pretrained(ours, timm_files["pth"])
    assert "headless" in caplog.text
    features = ours.eval().forward_features(timm_files["images"])
    assert _max_diff(features, timm_files["features"]) < 1e-4


def test_shallow_backbone_skips_the_removed_blocks(
    timm_files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ours = MobileNetV1(shallow=True, **TIMM_OPTIONS)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_pretrained(ours, timm_files["safetensors"])
    assert "shallow backbone" in caplog.text
    reference = torch.load(timm_files["pth"], weights_only=True)
    assert torch.equal(ours.blocks.block12.dw.conv.weight, reference["blocks.4.0.conv_dw.weight"])


# ------------------------------------------------------------------------------------------ Keras
@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random Keras MobileNet α=0.25 at 128 px in the three h5 layouts, with its pre-softmax logits."""
    root = tmp_path_factory.mktemp("keras")
    model = random_keras_mobilenet(alpha=0.25, size=128)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1
    released = write_released_keras_h5(model, root / "mobilenet_2_5_128_tf.h5")
    model.save(root / "full_model_legacy.h5")  # Keras 3 writes .h5 in the legacy full-model layout
    model.save_weights(root / "keras3.weights.h5")
    model.save(root / "keras3.keras")
    # the MobileNet nested as one layer of a bigger model: one h5 group holding every weight
    keras = import_keras_on_torch()
    inputs = keras.Input((128, 128, 3))
    keras.Model(inputs, model(inputs)).save(root / "nested.h5")
    return {
        "released": released,
        "full_model": root / "full_model_legacy.h5",
        "keras3": root / "keras3.weights.h5",
        "keras3_archive": root / "keras3.keras",
        "nested": root / "nested.h5",
        "images": images,
        "logits": keras_logits(model, images),
    }


@pytest.mark.parametrize("layout", ["released", "full_model", "keras3", "keras3_archive", "nested"])
def test_keras_weights_reproduce_keras_logits(
    keras_files: dict[str, Any], layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    ours = MobileNetV1(num_classes=1000, width_mult=0.25, **KERAS_OPTIONS)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_pretrained(ours, keras_files[layout])
    assert "will not reproduce" not in caplog.text
    assert _max_diff(_logits(ours, keras_files["images"]), keras_files["logits"]) < 1e-4


def test_released_keras_layout_is_what_the_release_files_hold(keras_files: dict[str, Any]) -> None:
    import h5py

    with h5py.File(keras_files["released"], "r") as h5:
        assert "conv_dw_1/conv_dw_1/depthwise_kernel:0" in h5
        assert h5["conv_preds/conv_preds/kernel:0"].shape == (1, 1, 256, 1000)
        mapped = filter_keras_h5(h5, MobileNetV1(width_mult=0.25))
    assert mapped["blocks.block1.dw.conv.weight"].shape == (8, 1, 3, 3)
    assert mapped["blocks.block1.pw.conv.weight"].shape == (16, 8, 1, 1)
    assert mapped["classifier.weight"].shape == (1000, 256)
    assert "blocks.block13.pw.bn.running_var" in mapped


def test_keras_weights_into_a_torch_padded_backbone_warn(
    keras_files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ours = MobileNetV1(width_mult=0.25)  # padding="torch", relu, eps 1e-5: none of Keras' options
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_pretrained(ours, keras_files["released"])
    for option in ("padding='torch'", "activation='relu'", "bn_eps=1e-05"):
        assert option in caplog.text
    assert _max_diff(_logits(ours, keras_files["images"]), keras_files["logits"]) > 1e-3


def test_keras_weights_of_another_alpha_name_the_key_and_shapes(keras_files: dict[str, Any]) -> None:
    ours = MobileNetV1(width_mult=0.5, **KERAS_OPTIONS)
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(ours, keras_files["released"])
    message = str(error.value)
    assert str(keras_files["released"]) in message
    assert "'stem.conv.weight'" in message and "conv1/kernel" in message
    assert "(8, 3, 3, 3)" in message and "(16, 3, 3, 3)" in message


# -------------------------------------------------------------------------------------- Lightning
def _fit_one_step_and_save(task: Any, path: Path) -> None:
    import pytorch_lightning as pl

    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, loader)
    trainer.save_checkpoint(path)


def test_lightning_checkpoint_loads_into_a_backbone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import pytorch_lightning as pl

    class TinyTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = MobileNetV1(num_classes=0, width_mult=0.25)  # not called "backbone"
            self.head = nn.Linear(self.encoder.num_features, 4)

    task = TinyTask()
    randomise_batch_norm_(task.encoder)
    # what Trainer.save_checkpoint writes, less the loop and optimizer states (the next test saves a real one)
    checkpoint = {"state_dict": task.state_dict(), "pytorch-lightning_version": pl.__version__, "epoch": 0}
    torch.save(checkpoint, tmp_path / "tiny.ckpt")
    ours = MobileNetV1(num_classes=7, width_mult=0.25)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_pretrained(ours, tmp_path / "tiny.ckpt")
    assert "lightning layout" in caplog.text and "no classifier" in caplog.text
    images = torch.randn(2, 3, 64, 64)
    expected = task.encoder.eval().forward_features(images)
    assert _max_diff(ours.eval().forward_features(images), expected) < 1e-5


def test_base_task_checkpoint_loads_through_the_weights_option(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mobilenets.tasks.base import BaseTask

    class ClassifierTask(BaseTask):
        def configure_models(self) -> None:
            self.backbone = self.build_backbone(num_classes=4)

        def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
            images, labels = batch
            return nn.functional.cross_entropy(self.backbone(images), labels)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self._shared_step(batch, "train")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    task = ClassifierTask(width_mult=0.25, input_size=32)
    _fit_one_step_and_save(task, tmp_path / "task.ckpt")
    # a headless task built on that checkpoint: the 4-class classifier is dropped, the body is loaded
    with caplog.at_level(logging.INFO, logger=LOGGER):
        headless = BaseTask(width_mult=0.25, input_size=32, weights=str(tmp_path / "task.ckpt"))
    assert "dropping the file's 4-class classifier" in caplog.text
    images = torch.randn(2, 3, 32, 32)
    expected = task.backbone.eval().forward_features(images)
    assert _max_diff(headless.backbone.eval().forward_features(images), expected) < 1e-5


def test_backbone_prefix_is_found_under_any_attribute() -> None:
    state = {"model.encoder.stem.conv.weight": torch.zeros(1), "model.head.weight": torch.zeros(1)}
    assert find_backbone_prefix(state) == "model.encoder."
    two = {"ema.backbone.stem.conv.weight": torch.zeros(1), "backbone.stem.conv.weight": torch.ones(1)}
    assert find_backbone_prefix(two) == "backbone."
    assert filter_lightning_checkpoint({"state_dict": two}, MobileNetV1()) == {
        "stem.conv.weight": torch.ones(1)
    }
    with pytest.raises(ValueError, match="several MobileNet backbones"):
        find_backbone_prefix({"a.stem.conv.weight": 0, "b.stem.conv.weight": 0})
    with pytest.raises(ValueError, match="no MobileNet v1 backbone found"):
        find_backbone_prefix({"conv1.weight": 0})


def test_own_backbone_state_dict_round_trips(tmp_path: Path) -> None:
    source = randomise_batch_norm_(MobileNetV1(num_classes=5, width_mult=0.25, full_conv=True))
    save_file(source.state_dict(), str(tmp_path / "own.safetensors"))
    ours = MobileNetV1(num_classes=5, width_mult=0.25, full_conv=True)
    load_pretrained(ours, tmp_path / "own.safetensors")
    images = torch.randn(1, 3, 32, 32)
    assert _max_diff(_logits(ours, images), _logits(source, images)) < 1e-6


# -------------------------------------------------------------------------------------- bad input
def test_wrong_architecture_names_the_first_key_and_both_shapes(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(MobileNetV1(), tmp_path / "resnet18.pth")
    message = str(error.value)
    assert str(tmp_path / "resnet18.pth") in message
    assert "'conv1.weight'" in message and "(64, 3, 7, 7)" in message
    assert "'stem.conv.weight'" in message and "(32, 3, 3, 3)" in message


def test_alpha_mismatch_names_the_first_key_and_leaves_the_model_untouched(
    timm_files: dict[str, Any],
) -> None:
    ours = MobileNetV1(width_mult=0.25, **TIMM_OPTIONS)
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(ours, timm_files["safetensors"])
    message = str(error.value)
    assert str(timm_files["safetensors"]) in message
    assert "'stem.conv.weight'" in message and "'conv_stem.weight'" in message
    assert "(32, 3, 3, 3)" in message and "(8, 3, 3, 3)" in message
    assert all(torch.equal(before[key], value) for key, value in ours.state_dict().items())


def test_separable_weights_into_full_conv_backbone_are_reported(timm_files: dict[str, Any]) -> None:
    with pytest.raises(
        PretrainedWeightsError,
        match=r"have no place in this backbone.*'blocks\.0\.0\.conv_dw\.weight'.*full_conv ablation",
    ):
        load_pretrained(MobileNetV1(full_conv=True, **TIMM_OPTIONS), timm_files["pth"])


def test_file_lacking_backbone_tensors_is_reported(timm_files: dict[str, Any], tmp_path: Path) -> None:
    state = torch.load(timm_files["pth"], weights_only=True)
    del state["blocks.2.1.conv_pw.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(
        PretrainedWeightsError, match=r"partial\.pth.*lacks 1 tensors.*block5\.pw\.conv\.weight"
    ):
        load_pretrained(MobileNetV1(**TIMM_OPTIONS), tmp_path / "partial.pth")


@pytest.mark.parametrize("kind", ["safetensors", "pth", "h5"])
def test_truncated_file_gives_a_clear_error_naming_it(
    timm_files: dict[str, Any], keras_files: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    source = {
        "safetensors": timm_files["safetensors"],
        "pth": timm_files["pth"],
        "h5": keras_files["released"],
    }
    broken = truncate_copy(source[kind], tmp_path / f"broken.{kind}", 0.6)
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(MobileNetV1(width_mult=0.25, **KERAS_OPTIONS), broken)
    message = str(error.value)
    assert str(broken) in message and "cannot read" in message
    assert "truncated" in message


def test_non_weight_files_give_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(PretrainedWeightsError, match=r"notes\.pth: cannot read weights"):
        load_pretrained(MobileNetV1(), text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(PretrainedWeightsError, match=r"empty\.safetensors: the weight file is empty"):
        load_pretrained(MobileNetV1(), empty)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(PretrainedWeightsError, match=r"tensor\.pth: expected a state dict"):
        load_pretrained(MobileNetV1(), tensor)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    # timm's training checkpoints keep their argparse arguments next to the state dict
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(PretrainedWeightsError, match=r"pickled\.pth: cannot read weights \(it holds Python"):
        load_pretrained(MobileNetV1(), path)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "mobilenet_1_0_224_tf.h5"
    with pytest.raises(
        WeightFileNotFoundError, match=r"nowhere/mobilenet_1_0_224_tf\.h5: weight file not found"
    ):
        load_pretrained(MobileNetV1(), missing)
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        load_pretrained(MobileNetV1(), missing)
