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
