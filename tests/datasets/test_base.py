"""The base datamodule: the seeded sampler, its resume position, and the state a checkpoint keeps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mobilenets.backbone.errors import ConfigError
from mobilenets.datasets.base import BatchesAsSamples, EpochSeededSampler
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


def test_ddp_training_shares_are_disjoint_equal_and_keep_each_samples_seed() -> None:
    alone = dict(EpochSeededSampler(10, seed=5, epoch=1))
    shares = [list(EpochSeededSampler(10, seed=5, epoch=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(i for share in shares for i, _ in share) == list(range(10))
    # a sample's augmentation seed does not depend on how many processes there are
    assert all(alone[i] == seed for share in shares for i, seed in share)
    odd = [list(EpochSeededSampler(7, seed=5, num_replicas=2, rank=r, seeded_keys=False)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 4  # equal steps for DDP: one sample is seen twice
    assert set(odd[0]) | set(odd[1]) == set(range(7))


def test_ddp_evaluation_shares_see_each_sample_once() -> None:
    shares = [
        EpochSeededSampler(7, shuffle=False, seeded_keys=False, num_replicas=2, rank=r, equal_shares=False)
        for r in (0, 1)
    ]
    assert [list(s) for s in shares] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(s) for s in shares] == [4, 3]
    with pytest.raises(ValueError, match="rank"):
        EpochSeededSampler(7, num_replicas=2, rank=2)


def test_ddp_resume_skips_each_process_own_trained_batches() -> None:
    full = list(EpochSeededSampler(12, seed=2, batch_size=2, epoch=1, num_replicas=2, rank=1))
    resumed = EpochSeededSampler(12, seed=2, batch_size=2, epoch=1, num_replicas=2, rank=1)
    resumed.resume_at(1, 2)
    assert list(resumed) == full[4:]


def test_pk_batches_of_two_processes_share_no_identity() -> None:
    labels = [i // 3 for i in range(30)]  # 10 identities of 3 images
    alone = IdentityBalancedBatchSampler(labels, 2, 2, num_batches=4, seed=1)
    ranks = [
        IdentityBalancedBatchSampler(labels, 2, 2, num_batches=4, seed=1, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    steps = list(zip(*ranks))
    assert len(steps) == 4
    for batch0, batch1 in steps:
        people0, people1 = {labels[i] for i in batch0}, {labels[i] for i in batch1}
        assert len(batch0) == len(batch1) == 4 and len(people0) == len(people1) == 2
        assert not people0 & people1
    assert [len(set(labels[i] for i in b)) for b in alone] == [2, 2, 2, 2]
    # the default epoch length divides one pass over the images between the processes
    assert len(IdentityBalancedBatchSampler(labels, 2, 2, num_replicas=2, rank=0)) == 30 // 8
    with pytest.raises(ValueError, match=r"needs at least P=2 × 2 processes = 4 identities"):
        IdentityBalancedBatchSampler([0, 0, 1, 1, 2, 2], 2, 2, num_replicas=2, rank=1)


def test_a_batch_sampler_seen_as_samples_gives_its_batches_to_the_loader() -> None:
    labels = [i // 4 for i in range(40)]
    reference = IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4)
    reference.set_epoch(2)
    expected = list(reference)
    pk = IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4)
    samples = BatchesAsSamples(pk)
    # a DistributedSampler: Lightning keeps it under DDP instead of installing its own
    assert isinstance(samples, torch.utils.data.DistributedSampler) and len(samples) == 30
    samples.set_epoch(2)
    loader = torch.utils.data.DataLoader(list(range(40)), sampler=samples, batch_size=samples.batch_size)
    assert [batch.tolist() for batch in loader] == expected
    samples.set_epoch(2)
    samples.resume_at(2, 3)
    assert [batch.tolist() for batch in loader] == expected[3:]


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


def test_more_processes_than_evaluation_images_is_a_clear_error() -> None:
    data = FolderDataModule("x", batch_size=2, num_workers=0)
    data.trainer = SimpleNamespace(world_size=3, global_rank=1)  # type: ignore[assignment]
    with pytest.raises(
        ConfigError, match="trainer: 3 processes but only 2 images in the evaluation or predict"
    ):
        data._loader([0, 1])
    assert [len(data._loader(list(range(n)))) for n in (0, 3)] == [0, 1]  # nothing to share; one each


def test_base_options_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        FolderDataModule("x", batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        FolderDataModule("x", num_workers=-1)
