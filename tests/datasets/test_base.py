"""The base datamodule: the seeded sampler, its resume position, and the state a checkpoint keeps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mobilenets.datasets.base import EpochSeededSampler
from mobilenets.datasets.faces import IdentityBalancedBatchSampler
from mobilenets.datasets.folder import FolderDataModule
from mobilenets.datasets.synthetic.folder import make_image_folder


def test_epoch_seeded_sampler_depends_on_seed_and_epoch_only() -> None:
    sampler = EpochSeededSampler(10, seed=3)
    epoch0 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(10))
    assert list(EpochSeededSampler(10, seed=3)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert [i for i, _ in EpochSeededSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]
    assert list(EpochSeededSampler(5, shuffle=False, seeded_keys=False)) == [0, 1, 2, 3, 4]


def test_resume_skips_the_trained_batches_of_that_epoch_only() -> None:
    full = list(EpochSeededSampler(10, seed=1, batch_size=3, epoch=2))
    resumed = EpochSeededSampler(10, seed=1, batch_size=3, epoch=2)
    resumed.resume_at(2, 2)
    assert list(resumed) == full[6:]  # same keys (index and augmentation seed) as the uninterrupted pass
    assert list(resumed) == full  # the next pass over the epoch is whole again
    other_epoch = EpochSeededSampler(10, seed=1, batch_size=3, epoch=3)
    other_epoch.resume_at(2, 2)
    assert len(list(other_epoch)) == 10


def test_pk_sampler_resumes_and_follows_the_epoch_it_is_given() -> None:
    labels = [i // 4 for i in range(40)]
    reference = IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4)
    reference.set_epoch(3)
    full = list(reference)
    resumed = IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4)
    resumed.set_epoch(3)
    resumed.resume_at(3, 2)
    assert list(resumed) == full[2:]
    assert resumed.sampler is resumed  # where Lightning looks for set_epoch


def _trainer_at(epoch: int, batches: int) -> SimpleNamespace:
    """The few trainer attributes the datamodule reads: world size and the fit loop's progress."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=batches))
    epochs = SimpleNamespace(current=SimpleNamespace(processed=epoch))
    fit_loop = SimpleNamespace(epoch_progress=epochs, epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(world_size=1, fit_loop=fit_loop)


def _indices(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


def test_state_dict_lets_a_new_datamodule_continue_the_order(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["a", "b", "c"], per_class=6, size=(40, 30))
    options = dict(input_size=32, batch_size=4, num_workers=0, val_fraction=0.0)
    straight = FolderDataModule(str(tmp_path), **options)
    straight.trainer = _trainer_at(epoch=1, batches=0)  # type: ignore[assignment]
    straight.setup("fit")
    epoch1 = _indices(straight.train_dataloader())
    assert sorted(epoch1) == sorted(set(epoch1)) and len(epoch1) == 16  # drop_last: 18 → 4 batches of 4

    interrupted = FolderDataModule(str(tmp_path), **options)
    interrupted.trainer = _trainer_at(epoch=1, batches=0)  # type: ignore[assignment]
    interrupted.setup("fit")
    interrupted.train_dataloader()
    interrupted.trainer = _trainer_at(epoch=1, batches=3)  # type: ignore[assignment]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    resumed = FolderDataModule(str(tmp_path), **options)
    resumed.load_state_dict(state)
    resumed.trainer = _trainer_at(epoch=1, batches=3)  # type: ignore[assignment]
    resumed.setup("fit")
    assert _indices(resumed.train_dataloader()) == epoch1[12:]


def test_base_options_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        FolderDataModule("x", batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        FolderDataModule("x", num_workers=-1)
