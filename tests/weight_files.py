"""Generators of small weight files in the real third-party layouts (timm state dicts, Keras h5)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
