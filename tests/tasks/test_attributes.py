"""Face attributes (Table 12): the label-trained teacher, the distilled student, its cached teacher,
the metrics and reports, and the two-command CLI path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from mobilenets.backbone.profile import agrees_with_paper
from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.celeba import CelebADataModule
from mobilenets.datasets.synthetic.celeba import make_celeba
from mobilenets.tasks.attributes import PAPER_TABLE12, AttributeMeanAP, AttributeModel
from mobilenets.tasks.cli.lightning import lightning_cli
from mobilenets.tasks.cli.profile import instantiate_model_from_config
from mobilenets.tasks.teacher import TeacherCache


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("celeba")
    make_celeba(root, 48, size=(40, 48), fractions=(0.5, 0.25))
    return root


class ColourTeacher(nn.Module):
    """A fixed, confident teacher: 40 logits from the mean colour of the image's four quadrants."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, 40)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(40, 12, generator=generator) * 3)
            self.fc.bias.copy_(torch.randn(40, generator=generator) * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def _trainer(root: Path, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _datamodule(root: Path, batch_size: int = 8) -> CelebADataModule:
    return CelebADataModule(str(root), input_size=32, batch_size=batch_size, num_workers=0)


def test_mean_ap_skips_attributes_without_positives() -> None:
    metric = AttributeMeanAP(3)
    preds = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.8, 0.3, 0.4], [0.3, 0.7, 0.1]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    metric.update(preds, target)
    per_attribute = metric.per_attribute()
    assert per_attribute[:2].tolist() == [1.0, 1.0] and torch.isnan(per_attribute[2])
    assert metric.compute().item() == 1.0  # not (1 + 1 + 0) / 3


@pytest.mark.parametrize("label_weight", [0.0, 0.3])
def test_student_loss_mixes_teacher_and_labels(tmp_path: Path, label_weight: float) -> None:
    model = AttributeModel(width_mult=0.25, input_size=32, teacher="teacher.pt", label_weight=label_weight)
    model.train()
    probs = np.random.default_rng(0).uniform(0.05, 0.95, (6, 40)).astype(np.float32)
    model._teacher_cache = TeacherCache(probs, [tmp_path / f"{i}.jpg" for i in range(6)], tmp_path, tmp_path)
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "labels": torch.randint(0, 2, (4, 40)).float(),
        "labeled": torch.tensor([True, False, True, False]),
        "index": torch.tensor([5, 0, 2, 3]),
    }
    torch.manual_seed(1)
    loss = model._shared_step(batch, "train")
    torch.manual_seed(1)
    logits = model(batch["image"])
    distill = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(probs[[5, 0, 2, 3]]))
    labels = F.binary_cross_entropy_with_logits(logits[[0, 2]], batch["labels"][[0, 2]])
    torch.testing.assert_close(loss, (1 - label_weight) * distill + label_weight * labels)
    loss.backward()
    assert model.backbone.classifier.weight.grad is not None


def test_table12_configs_and_the_paper_rounding() -> None:
    for (width, size), (_, paper_madds, paper_params) in PAPER_TABLE12.items():
        alpha = {1.0: "1.0", 0.5: "0.5", 0.25: "0.25"}[width]
        model = instantiate_model_from_config(CONFIG_DIR / f"attributes_distill_{alpha}_{size}.yaml")
        assert isinstance(model, AttributeModel)
        assert model.hparams.weight_decay == 0.0 and model.hparams.label_weight == 0.0
        assert model.paper_figures() == (paper_madds, paper_params)
        profile = model.profile()
        assert agrees_with_paper(profile.million_parameters, paper_params)
        madds_gap = (profile.million_mult_adds - paper_madds) / paper_madds
        if width == 0.25:
            # The paper's 0.25 rows (45 M, 15 M) do not follow its own Table 6 (41 M for 0.25-224); we
            # report the difference instead of bending the model.
            assert -0.15 < madds_gap < -0.05, (size, profile)
        else:  # 0.5-128 is 48.7 M, printed 48: 1.4% off
            assert abs(madds_gap) < 0.015, (width, size, profile)
        table = model.format_table12(0.5)
        assert f"{paper_madds:.0f}" in table and "difference" in table
    teacher = instantiate_model_from_config(CONFIG_DIR / "attributes_teacher.yaml")
    assert teacher.paper_figures() is None and teacher.hparams.teacher is None
    assert 1500 < teacher.profile().million_mult_adds < 1700  # sized like the paper's 1600 M baseline


@pytest.mark.slow
def test_distilled_student_moves_toward_the_teacher(celeba_root: Path, tmp_path: Path) -> None:
    teacher_file = tmp_path / "teacher.pt"
    torch.jit.script(ColourTeacher().eval()).save(str(teacher_file))
    student = AttributeModel(
        width_mult=0.25,
        input_size=32,
        teacher=str(teacher_file),
        teacher_input_size=32,
        teacher_cache_dir=str(tmp_path / "cache"),
        optimizer="adamw",
        lr=1e-2,
        weight_decay=0.0,
        scheduler="none",
    )
    dm = _datamodule(celeba_root)
    trainer = _trainer(tmp_path, epochs=5)
    before = trainer.validate(student, datamodule=dm, verbose=False)[0]["val/emulation_ce"]
    cache_files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cache_files) == 2 and cache_files[0].startswith("teacher-")
    trainer.fit(student, datamodule=dm)
    after = trainer.validate(student, datamodule=dm, verbose=False)[0]["val/emulation_ce"]
    # An untrained student (logits ~ 0) sits at ln 2 whatever the teacher says; the floor is the teacher's
    # own entropy. After 5 epochs the student must have moved well off ln 2 toward the teacher.
    probs = np.clip(np.load(next((tmp_path / "cache").glob("*.npy"))), 1e-7, 1 - 1e-7)
    teacher_entropy = float(np.mean(-(probs * np.log(probs) + (1 - probs) * np.log(1 - probs))))
    assert before == pytest.approx(np.log(2), abs=0.02)
    assert before - after > 0.05 and after > teacher_entropy, (before, after, teacher_entropy)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache_files  # reused, not rebuilt


def test_cached_online_and_onnx_teachers_agree(celeba_root: Path, tmp_path: Path) -> None:
    net = ColourTeacher().eval()
    script_file, onnx_file = tmp_path / "teacher.pt", tmp_path / "teacher.onnx"
    torch.jit.script(net).save(str(script_file))
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 32, 32),),
        str(onnx_file),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    torch.manual_seed(0)
    student = AttributeModel(width_mult=0.25, input_size=32, teacher_cache_dir=str(tmp_path / "cache"))
    state = student.state_dict()
    results = {}
    for name, teacher, mode in [
        ("cached", script_file, "cached"),
        ("online", script_file, "online"),
        ("onnx", onnx_file, "cached"),
    ]:
        model = AttributeModel(
            width_mult=0.25,
            input_size=32,
            teacher=str(teacher),
            teacher_mode=mode,
            teacher_input_size=32 if teacher.suffix == ".pt" else None,  # ONNX says 32 itself
            teacher_cache_dir=str(tmp_path / "cache"),
        )
        model.load_state_dict(state)
        results[name] = _trainer(tmp_path).validate(
            model, datamodule=_datamodule(celeba_root), verbose=False
        )[0]
    assert results["cached"]["val/emulation_ce"] == pytest.approx(
        results["online"]["val/emulation_ce"], rel=1e-5
    )
    assert results["onnx"]["val/emulation_ce"] == pytest.approx(
        results["cached"]["val/emulation_ce"], rel=1e-4
    )
    assert results["cached"]["val/mAP"] == pytest.approx(results["onnx"]["val/mAP"])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # TorchScript and ONNX files differ


def test_wrong_teacher_output_size_is_reported(celeba_root: Path, tmp_path: Path) -> None:
    small = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 7)).eval()
    teacher_file = tmp_path / "seven.pt"
    torch.jit.script(small).save(str(teacher_file))
    model = AttributeModel(width_mult=0.25, input_size=32, teacher=str(teacher_file), teacher_input_size=32)
    with pytest.raises(ValueError, match=r"seven\.pt: teacher gives 7 outputs per image, expected 40"):
        _trainer(tmp_path).validate(model, datamodule=_datamodule(celeba_root), verbose=False)


@pytest.mark.slow
def test_two_commands_labels_to_distilled_student(
    celeba_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ["--data.root", str(celeba_root), "--model.input_size", "32"]
    tiny += ["--data.num_workers", "0", "--data.batch_size", "8", "--trainer.max_epochs", "2"]
    tiny += ["--trainer.enable_progress_bar", "false"]
    teacher_args = [
        "--config",
        str(CONFIG_DIR / "attributes_teacher.yaml"),
        "--model.width_mult",
        "0.25",
        *tiny,
    ]
    teacher_cli = lightning_cli(
        ["fit", *teacher_args, "--trainer.default_root_dir", str(tmp_path / "teacher")]
    )
    teacher_ckpt = teacher_cli.trainer.checkpoint_callback.best_model_path
    assert teacher_ckpt.endswith(".ckpt") and Path(teacher_ckpt).is_file()
    assert teacher_cli.model.attribute_names[20] == "Male"

    student_args = [
        "--config",
        str(CONFIG_DIR / "attributes_distill_0.25_128.yaml"),
        "--model.teacher",
        teacher_ckpt,
    ]
    student_args += [*tiny, "--trainer.default_root_dir", str(tmp_path / "student")]
    student_cli = lightning_cli(["fit", *student_args])
    cache = sorted((tmp_path / "student" / "teacher_cache").glob("*.npy"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime_ns
    metrics = student_cli.trainer.callback_metrics
    assert 0.0 < float(metrics["val/mAP"]) <= 1.0 and float(metrics["val/emulation_ce"]) > 0
    student_ckpt = student_cli.trainer.checkpoint_callback.best_model_path

    capsys.readouterr()
    lightning_cli(["test", *student_args, "--ckpt_path", student_ckpt])
    printed = capsys.readouterr().out
    assert "Table 12" in printed and "0.25 MobileNet-32 (distilled)" in printed
    assert cache[0].stat().st_mtime_ns == mtime  # the test run reused the cache
    (report,) = (tmp_path / "student").rglob("attribute_ap.csv")  # in the test run's log dir
    rows = list(csv.DictReader(report.open()))
    assert [r["attribute"] for r in rows][:2] == ["5_o_Clock_Shadow", "Arched_Eyebrows"] and len(rows) == 40
    assert report.with_suffix(".png").stat().st_size > 1000
    aps = [float(r["average_precision"]) for r in rows if r["average_precision"]]
    assert np.mean(aps) == pytest.approx(float(printed.split("(distilled)")[1].split("%")[0]) / 100, abs=1e-3)


@pytest.mark.parametrize("quick", [False, True])
def test_demo_configs_override_data_and_sizes_not_the_shipped_recipe(tmp_path: Path, quick: bool) -> None:
    """The demo's student distils with the shipped 0.25-128 recipe (pure distillation, its optimiser), only
    on the demo's data, at a smaller input than its teacher, both without random crops."""
    import yaml

    from mobilenets.tasks.cli.demo.attributes import attribute_configs

    teacher, student = attribute_configs(tmp_path, tmp_path / "celeba", tmp_path / "unlabeled", quick)
    shipped = yaml.safe_load((CONFIG_DIR / "attributes_distill_0.25_128.yaml").read_text())
    options = student["model"]["init_args"]
    for key in (
        "label_weight",
        "teacher_mode",
        "optimizer",
        "lr",
        "weight_decay",
        "scheduler",
        "warmup_epochs",
    ):
        assert options[key] == shipped["model"]["init_args"][key], key
    assert options["input_size"] < teacher["model"]["init_args"]["input_size"]
    assert (
        teacher["data"]["init_args"]["augment"] is False and student["data"]["init_args"]["augment"] is False
    )
    assert student["data"]["init_args"]["unlabeled_dirs"] == [str(tmp_path / "unlabeled")]


@pytest.mark.slow
def test_demo_step_quick(tmp_path: Path) -> None:
    from mobilenets.tasks.cli.demo.attributes import run_demo

    rows = run_demo(tmp_path, quick=True)
    assert [r.task for r in rows] == ["attributes"] * 3
    assert rows[0].metric.startswith("teacher 0.25 MobileNet-56") and rows[1].metric.startswith(
        "student 0.25"
    )
    chance = float(rows[0].baseline.split("%")[0])
    assert rows[1].baseline == rows[0].baseline and 20.0 < chance < 50.0  # the test set's share of positives
    # fine-tuned from ImageNet features for a few dozen steps: both well above chance (measured: teacher
    # +29, student +22 points)
    for row in rows[:2]:
        assert chance + 10.0 < float(row.value.split("%")[0]) <= 100.0
    assert float(rows[2].value) > 0  # the student's emulation cross-entropy on the test partition
    assert len(list((tmp_path / "teacher_cache").glob("*.npy"))) == 1
