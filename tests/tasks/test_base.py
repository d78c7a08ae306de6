import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mobilenets.tasks.base import TASK_CLASS_KEY, BaseTask, CheckpointError, no_decay_parameter_names


class TinyClassifier(BaseTask):
    """A classifier head on the backbone: the smallest task, for testing what BaseTask shares."""

    def __init__(self, num_classes: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=self.hparams.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _shared_step(self, batch, stage):
        images, labels = batch
        loss = nn.functional.cross_entropy(self.backbone(images), labels)
        self.log(f"{stage}/loss", loss)
        return loss


def tiny_loader(n: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    )
    return DataLoader(data, batch_size=4)


def fit(task: BaseTask, tmp_path, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, tiny_loader(), tiny_loader())
    return trainer


def test_depthwise_filters_norms_and_biases_get_no_weight_decay() -> None:
    task = TinyClassifier(width_mult=0.25, input_size=32)
    skip = no_decay_parameter_names(task)
    assert "backbone.blocks.block1.dw.conv.weight" in skip
    assert "backbone.blocks.block1.dw.bn.weight" in skip and "backbone.classifier.bias" in skip
    assert "backbone.blocks.block1.pw.conv.weight" not in skip and "backbone.stem.conv.weight" not in skip
    decay, no_decay = task.parameter_groups()
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))
    everything = TinyClassifier(width_mult=0.25, input_size=32, decay_depthwise_and_norm=True)
    assert len(everything.parameter_groups()) == 1


@pytest.mark.parametrize(
    ("scheduler", "warmup", "check"),
    [
        ("cosine", 0.0, lambda lrs: lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.02),
        (
            "cosine",
            1.0,
            lambda lrs: lrs[0] == pytest.approx(0.001) and max(lrs) == pytest.approx(0.1, rel=0.05),
        ),
        (
            "step",
            0.0,
            lambda lrs: lrs[:2] == [pytest.approx(0.1)] * 2 and lrs[2:] == [pytest.approx(0.01)] * 2,
        ),
        ("none", 0.0, lambda lrs: lrs == [pytest.approx(0.1)] * 4),
    ],
)
def test_schedules(scheduler: str, warmup: float, check, tmp_path) -> None:
    task = TinyClassifier(
        width_mult=0.25,
        input_size=32,
        optimizer="sgd",
        lr=0.1,
        scheduler=scheduler,
        warmup_epochs=warmup,
        step_epochs=1,
    )
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(
        max_epochs=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[Record()]
    )
    trainer.fit(task, tiny_loader(), tiny_loader())
    assert len(seen) == 4 and check(seen), seen


@pytest.mark.parametrize("name", ["rmsprop", "sgd", "adamw"])
def test_optimizers(name: str, tmp_path) -> None:
    task = TinyClassifier(width_mult=0.25, input_size=32, optimizer=name)
    fit(task, tmp_path, epochs=1)
    optimizer = task.trainer.optimizers[0]
    assert type(optimizer).__name__.lower() == name


def test_linear_probe_then_fine_tune(tmp_path) -> None:
    task = TinyClassifier(width_mult=0.25, input_size=32, freeze_backbone_epochs=1, optimizer="sgd", lr=0.05)
    states: list[bool] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == 0:
                states.append(module.backbone.stem.conv.weight.requires_grad)

    stem_before = task.backbone.stem.conv.weight.detach().clone()
    head_before = task.backbone.classifier.weight.detach().clone()
    pl.Trainer(
        max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[Record()]
    ).fit(task, tiny_loader(), tiny_loader())
    assert torch.equal(stem_before, task.backbone.stem.conv.weight)
    assert not torch.equal(head_before, task.backbone.classifier.weight)
    task2 = TinyClassifier(width_mult=0.25, input_size=32, freeze_backbone_epochs=1, optimizer="sgd", lr=0.05)
    before = task2.backbone.stem.conv.weight.detach().clone()
    pl.Trainer(
        max_epochs=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[Record()]
    ).fit(task2, tiny_loader(), tiny_loader())
    assert states == [False, False, True]
    assert not torch.equal(before, task2.backbone.stem.conv.weight)


def test_reload_a_task_from_its_checkpoint(tmp_path) -> None:
    task = TinyClassifier(width_mult=0.25, input_size=32, num_classes=3)
    trainer = fit(task, tmp_path, epochs=1)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    reloaded = BaseTask.load_task(path)
    assert isinstance(reloaded, TinyClassifier) and not reloaded.training
    x = torch.randn(2, 3, 32, 32)
    task.eval()
    assert torch.allclose(reloaded.backbone(x), task.backbone(x))


def test_checkpoint_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint file not found"):
        BaseTask.load_task(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.ckpt: cannot read checkpoint"):
        BaseTask.load_task(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.ckpt: not a checkpoint of a mobilenets task"):
        BaseTask.load_task(foreign)
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="plain.pth: expected a Lightning checkpoint"):
        BaseTask.load_task(plain)


def test_bad_task_options() -> None:
    with pytest.raises(ValueError, match="input_size must be at least 32 px, got 16"):
        TinyClassifier(input_size=16)
    with pytest.raises(ValueError, match="freeze_backbone_epochs must be >= 0"):
        TinyClassifier(freeze_backbone_epochs=-1)


class MeteredClassifier(TinyClassifier):
    metric_stages = ("train", "val")

    def configure_metrics(self):
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy

        return MetricCollection({"top1": MulticlassAccuracy(3)})

    def _shared_step(self, batch, stage):
        images, labels = batch
        logits = self.backbone(images)
        self.log_metrics(stage, logits, labels, len(images))
        return nn.functional.cross_entropy(logits, labels)


def test_metric_collections_per_stage_are_logged(tmp_path) -> None:
    task = MeteredClassifier(width_mult=0.25, input_size=32)
    assert "train" in task.stage_metrics and "val" in task.stage_metrics and "test" not in task.stage_metrics
    assert task.stage_metrics["train"] is not task.stage_metrics["val"]
    trainer = fit(task, tmp_path, epochs=1)
    assert {"train/top1", "val/top1"} <= set(trainer.callback_metrics)
    with pytest.raises(KeyError):
        task.stage_metrics["test"]


@pytest.mark.parametrize(
    ("old_path", "task_class"),
    [
        ("mobilenets.tasks.embedding.FaceEmbedder", "FaceEmbedder"),
        ("mobilenets.tasks.detection.SSDDetection", "SSDDetection"),
    ],
)
def test_a_checkpoint_written_before_the_move_still_loads(tmp_path, old_path: str, task_class: str) -> None:
    """Checkpoints name their task class; those written before ``tasks/`` was split name the old module."""
    from mobilenets.tasks.detection import SSDDetection
    from mobilenets.tasks.faces import FaceEmbedder

    cls = {"FaceEmbedder": FaceEmbedder, "SSDDetection": SSDDetection}[task_class]
    options = {"num_classes": 3} if cls is SSDDetection else {"embedding_size": 16}
    task = cls(width_mult=0.25, input_size=64, **options)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    checkpoint[TASK_CLASS_KEY] = old_path
    torch.save(checkpoint, tmp_path / "old.ckpt")
    reloaded = BaseTask.load_task(tmp_path / "old.ckpt")
    assert type(reloaded) is cls
    torch.testing.assert_close(reloaded.state_dict(), task.state_dict(), equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------ batch-norm statistics during a fit
def _norm_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in module.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


def shuffled_loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    )
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def _fit_recording_validation_stats(task: BaseTask, tmp_path, train: DataLoader, epochs: int) -> list:
    """Fit; returns the batch-norm statistics at the start of each validation (sanity check excluded)."""
    seen: list[dict[str, torch.Tensor]] = []

    class Record(pl.Callback):
        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
            if not trainer.sanity_checking and batch_idx == 0:
                seen.append(_norm_stats(module))

    pl.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[Record()],
    ).fit(task, train, tiny_loader())
    return seen


@pytest.mark.parametrize("precise", [True, False])
def test_precise_bn_gives_validation_the_exact_statistics_of_training_batches(
    precise: bool, tmp_path
) -> None:
    from mobilenets.backbone.inference import recalibrate_batchnorm

    torch.manual_seed(0)
    task = TinyClassifier(
        width_mult=0.25, input_size=32, optimizer="sgd", lr=0.05, precise_bn_batches=2 * precise
    )
    train = tiny_loader()  # two batches, not shuffled
    (seen,) = _fit_recording_validation_stats(task, tmp_path, train, epochs=1)
    reference = TinyClassifier(width_mult=0.25, input_size=32)
    reference.load_state_dict(task.state_dict())  # the weights validation ran with
    recalibrate_batchnorm(reference.eval(), [images for images, _ in train])
    exact = _norm_stats(reference)
    matches = all(torch.allclose(seen[name], exact[name], rtol=1e-5, atol=1e-6) for name in exact)
    assert matches == precise  # without precise BN validation sees the lagging running averages


def test_precise_bn_leaves_the_training_run_unchanged(tmp_path) -> None:
    """The extra passes over a shuffled loader do not move the random stream the training draws from."""
    states = []
    for batches in (0, 2):
        torch.manual_seed(0)
        task = TinyClassifier(
            width_mult=0.25, input_size=32, optimizer="sgd", lr=0.05, precise_bn_batches=batches
        )
        seen = _fit_recording_validation_stats(task, tmp_path, shuffled_loader(), epochs=2)
        assert len(seen) == 2
        states.append(task.state_dict())
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for (name, without), with_precise in zip(states[0].items(), states[1].values()):
        if not name.endswith(statistics):
            assert torch.equal(without, with_precise), name
    assert any(
        not torch.equal(states[0][name], states[1][name])
        for name in states[0]
        if name.endswith("running_var")
    )


def test_folded_batchnorm_of_official_weights_is_reestimated_before_the_first_step(tmp_path, caplog) -> None:
    import copy
    import logging

    from mobilenets.backbone.inference import folded_batchnorm_names

    options = dict(width_mult=0.25, input_size=32, activation="relu6", padding="tf", num_classes=3)
    task = TinyClassifier(
        weights="official:0.25_128", folded_bn_batches=2, optimizer="sgd", lr=0.01, **options
    )
    names = folded_batchnorm_names(task.backbone)
    assert len(names) == 27
    untouched = copy.deepcopy(task).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = untouched.backbone(x)
    checked: list[bool] = []

    class BeforeFirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step > 0 or checked:
                return
            assert not folded_batchnorm_names(module.backbone)  # measured and unmarked
            for name in names:
                bn = module.backbone.get_submodule(name)
                assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
                assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
            module.eval()
            with torch.no_grad():
                got = module.backbone(x)
            module.train()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # eval mode unchanged
            checked.append(True)

    with caplog.at_level(logging.INFO, logger="mobilenets.tasks.batchnorm"):
        pl.Trainer(
            max_steps=2,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[BeforeFirstStep()],
        ).fit(task, tiny_loader())
    assert checked == [True]
    assert "re-estimated the statistics of 27 batch-norm layers with folded weights on 8 training images" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("task_class", "options", "output_options"),
    [
        ("mobilenets.tasks.classification.ImageClassifier", {"num_classes": 3}, ("predictions_file",)),
        ("mobilenets.tasks.attributes.AttributeModel", {"num_attributes": 3}, ("predictions_file",)),
        (
            "mobilenets.tasks.faces.embedding.FaceEmbedder",
            {"embedding_size": 8},
            ("plot_dir", "embeddings_file"),
        ),
        ("mobilenets.tasks.geolocation.GeoClassifier", {"num_cells": 4}, ("predictions_dir",)),
        ("mobilenets.tasks.detection.ssd.SSDDetection", {"num_classes": 3}, ("predictions_dir",)),
        (
            "mobilenets.tasks.detection.faster_rcnn.FasterRCNNDetection",
            {"num_classes": 3},
            ("predictions_dir",),
        ),
    ],
)
def test_output_locations_are_kept_out_of_checkpoints(
    task_class: str, options: dict, output_options: tuple[str, ...], tmp_path
) -> None:
    import importlib

    module_name, _, class_name = task_class.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert set(cls.output_options) == set(output_options)
    places = {name: str(tmp_path / name) for name in output_options}
    if "embeddings_file" in places:
        places["embeddings_file"] += ".csv"
    task = cls(width_mult=0.25, input_size=64, **options, **places)
    assert all(task.hparams[name] == value for name, value in places.items())  # the task uses them
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    assert not set(output_options) & set(checkpoint["hyper_parameters"])
    assert checkpoint["hyper_parameters"]["width_mult"] == 0.25
    torch.save(checkpoint, tmp_path / "task.ckpt")
    reloaded = BaseTask.load_task(tmp_path / "task.ckpt")
    assert all(reloaded.hparams[name] is None for name in output_options)


def test_precise_bn_leaves_frozen_batch_norms_alone(tmp_path) -> None:
    torch.manual_seed(0)
    task = TinyClassifier(width_mult=0.25, input_size=32, freeze_backbone_epochs=1, precise_bn_batches=2)
    before = _norm_stats(task)
    (seen,) = _fit_recording_validation_stats(task, tmp_path, tiny_loader(), epochs=1)
    assert all(torch.equal(seen[name], before[name]) for name in before)  # linear probe: body frozen
    task = TinyClassifier(width_mult=0.25, input_size=32, precise_bn_batches=2)
    (seen,) = _fit_recording_validation_stats(task, tmp_path, tiny_loader(), epochs=1)
    assert not any(torch.equal(seen[name], before[name]) for name in before)
