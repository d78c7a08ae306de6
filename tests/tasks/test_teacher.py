"""The shared teacher loader (TorchScript, ONNX, mobilenets checkpoint) and its on-disk output cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mobilenets.tasks.teacher import Teacher, TeacherError, cached_teacher_outputs


class TinyNet(nn.Module):
    def __init__(self, outputs: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(7):
        path = tmp_path / "imgs" / f"{index:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def make_batch(paths: Sequence[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_torchscript_teacher_matches_module(tmp_path: Path) -> None:
    net = TinyNet().eval()
    path = tmp_path / "teacher.pt"
    torch.jit.script(net).save(str(path))
    teacher = Teacher.load(path, expected_outputs=5)
    x = torch.randn(3, 3, 16, 16)
    assert teacher.kind == "torchscript"
    assert len(teacher.checksum) == 64
    torch.testing.assert_close(teacher(x), net(x))
    with pytest.raises(TeacherError, match=r"teacher\.pt.*5 outputs.*expected 7"):
        Teacher.load(path, expected_outputs=7)(x)


def test_onnx_teacher_matches_module_and_reads_input_size(tmp_path: Path) -> None:
    net = TinyNet().eval()
    path = tmp_path / "teacher.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 16, 16),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    teacher = Teacher.load(path)
    assert teacher.kind == "onnx"
    assert teacher.input_size == 16
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(teacher(x), net(x), atol=1e-5, rtol=1e-4)


def test_bad_teacher_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match=r"missing\.pt: teacher file not found"):
        Teacher.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(TeacherError, match=r"junk\.onnx: cannot load as ONNX"):
        Teacher.load(junk)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(TeacherError, match=r"model\.bin: unknown teacher format"):
        Teacher.load(other)


def _counting_teacher(path: Path) -> tuple[Teacher, list[int]]:
    teacher = Teacher.load(path)
    calls: list[int] = []
    forward = teacher._forward

    def counted(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return forward(batch)

    teacher._forward = counted
    return teacher, calls


def test_cache_reused_when_unchanged_and_rebuilt_when_teacher_changes(
    tmp_path: Path, images: list[Path]
) -> None:
    teacher_file = tmp_path / "teacher.pt"
    net = TinyNet().eval()
    torch.jit.script(net).save(str(teacher_file))
    cache_dir = tmp_path / "cache"

    teacher, calls = _counting_teacher(teacher_file)
    first = cached_teacher_outputs(teacher, images, "px20", make_batch, cache_dir, batch_size=3)
    assert first.built and sum(calls) == len(images) and len(calls) == 3
    expected = net(make_batch(images)).detach().numpy()
    np.testing.assert_allclose(first.outputs, expected, rtol=1e-5, atol=1e-6)
    assert isinstance(first.outputs, np.memmap)
    assert first.index_of(images[4]) == 4
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]  # no temp files left
    mtime = first.array_file.stat().st_mtime_ns

    # Nothing changed: the teacher is not run again and the file is untouched.
    teacher, calls = _counting_teacher(teacher_file)
    again = cached_teacher_outputs(teacher, images, "px20", make_batch, cache_dir, batch_size=3)
    assert not again.built and calls == []
    assert again.array_file == first.array_file and again.array_file.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.outputs, first.outputs)

    # Another preprocessing key or activation: rebuilt.
    teacher, calls = _counting_teacher(teacher_file)
    sig = cached_teacher_outputs(teacher, images, "px20", make_batch, cache_dir, activation="sigmoid")
    assert sig.built and sum(calls) == len(images)
    np.testing.assert_allclose(sig.outputs, 1 / (1 + np.exp(-expected)), rtol=1e-5)

    # A retrained teacher (new file content): never the stale cache.
    torch.manual_seed(1)
    new_net = TinyNet().eval()
    torch.jit.script(new_net).save(str(teacher_file))
    teacher, calls = _counting_teacher(teacher_file)
    rebuilt = cached_teacher_outputs(teacher, images, "px20", make_batch, cache_dir)
    assert rebuilt.built and sum(calls) == len(images)
    assert rebuilt.array_file != first.array_file
    np.testing.assert_allclose(
        rebuilt.outputs, new_net(make_batch(images)).detach().numpy(), rtol=1e-5, atol=1e-6
    )
    metadata = json.loads(rebuilt.index_file.read_text())
    assert metadata["teacher_sha256"] == teacher.checksum
    assert metadata["paths"] == [str(p) for p in images]


def test_half_written_cache_is_not_used(tmp_path: Path, images: list[Path]) -> None:
    teacher_file = tmp_path / "teacher.pt"
    torch.jit.script(TinyNet().eval()).save(str(teacher_file))
    cache_dir = tmp_path / "cache"
    teacher = Teacher.load(teacher_file)
    cache = cached_teacher_outputs(teacher, images, "k", make_batch, cache_dir)
    # A crash between the two renames leaves an array without its index: it must be rebuilt.
    cache.index_file.unlink()
    teacher, calls = _counting_teacher(teacher_file)
    rebuilt = cached_teacher_outputs(teacher, images, "k", make_batch, cache_dir)
    assert rebuilt.built and sum(calls) == len(images)

    # A failing teacher leaves no temp files and no cache behind.
    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    teacher._forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        cached_teacher_outputs(teacher, images, "other", make_batch, cache_dir)
    assert len(list(cache_dir.iterdir())) == 2


def test_checkpoint_teacher_runs_the_tasks_export_module(tmp_path: Path) -> None:
    from mobilenets.tasks.attributes import AttributeModel
    from mobilenets.tasks.base import TASK_CLASS_KEY

    task = AttributeModel(width_mult=0.25, input_size=40, num_attributes=6).eval()
    path = tmp_path / "task.ckpt"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": dict(task.hparams),
            TASK_CLASS_KEY: "mobilenets.tasks.attributes.AttributeModel",
        },
        path,
    )
    teacher = Teacher.load(path, expected_outputs=6)
    assert teacher.kind == "checkpoint" and teacher.input_size == 40 and teacher.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), task(x))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(TeacherError, match=r"plain\.ckpt: not a checkpoint of a mobilenets task"):
        Teacher.load(plain)


def test_teacher_inputs_follow_the_option_then_the_file_then_the_student(images: list[Path]) -> None:
    """The one teacher-input piece both distillation tasks use: size and normalisation, cache key, batch."""
    from mobilenets.datasets.images import load_rgb
    from mobilenets.datasets.transforms import ClassificationTransform
    from mobilenets.tasks.attributes import AttributeModel
    from mobilenets.tasks.teacher import TeacherInputs

    student = AttributeModel(num_attributes=5, width_mult=0.25, input_size=40)
    bare = Teacher(lambda x: x, Path("t.pt"), "0" * 64)
    described = Teacher(lambda x: x, Path("t.onnx"), "0" * 64, input_size=24, mean=(0.4,) * 3, std=(0.2,) * 3)
    assert TeacherInputs.of(bare, None, student) == TeacherInputs(40, (0.5,) * 3, (0.5,) * 3)
    assert TeacherInputs.of(described, None, student) == TeacherInputs(24, (0.4,) * 3, (0.2,) * 3)
    assert TeacherInputs.of(described, 32, student).size == 32
    keys = {TeacherInputs(24, (0.4,) * 3, (0.2,) * 3).key, TeacherInputs(32, (0.4,) * 3, (0.2,) * 3).key}
    keys.add(TeacherInputs(24, (0.5,) * 3, (0.2,) * 3).key)
    assert len(keys) == 3  # another size or normalisation never reuses a cache
    inputs = TeacherInputs.of(described, 16, student)
    batch = inputs.batch()(images[:3])
    transform = ClassificationTransform(16, train=False, mean=(0.4,) * 3, std=(0.2,) * 3)
    assert batch.shape == (3, 3, 16, 16)
    torch.testing.assert_close(batch[1], transform(load_rgb(images[1])))
