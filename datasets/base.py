"""The base every datamodule shares: batch size and workers, one way to build loaders, the predict folder,
the normalisation, and shuffling that a resumed run replays exactly.

Resumable shuffling: the training order (and, for datasets that take ``(index, seed)`` keys, every sample's
augmentation) is a function of the seed and the epoch alone, and the datamodule's ``state_dict`` (which
Lightning writes into every checkpoint) records the epoch and how many batches of it were trained on. A run
resumed from a checkpoint therefore sees exactly the batches the uninterrupted run saw after that point,
whatever the number of workers.

Under DDP every process draws the same global order and takes its own share of it (position ``rank`` of
every ``world size``), so the processes train on disjoint samples and a sample's augmentation seed does not
depend on how many there are. The samplers are ``DistributedSampler`` subclasses, which Lightning leaves in
place instead of installing its own (that would lose the seeded keys and the resume position, and cannot
go inside a custom batch sampler). Evaluation and predict shares are not padded: every image is evaluated
exactly once, so a metric gathered over the processes is the single-process one.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from mobilenets.backbone.errors import ConfigError
from mobilenets.datasets.transforms import MINUS_ONE_ONE

#: A sample index, or (index, seed) as yielded by ``EpochSeededSampler(seeded_keys=True)``.
SampleKey = int | tuple[int, int]


class KeyedConcatDataset(ConcatDataset):
    """``ConcatDataset`` whose items may also be asked for by ``(index, seed)`` keys: the part gets its own
    index with the seed."""

    def __getitem__(self, key: SampleKey) -> Any:
        if not isinstance(key, tuple):
            return super().__getitem__(key)
        index, seed = key
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[part - 1] if part else 0
        return self.datasets[part][(index - start, seed)]


class EpochSeededSampler(DistributedSampler):
    """Orders ``length`` samples from ``(seed, epoch)``; yields ``(index, sample seed)`` keys (or plain indices
    with ``seeded_keys=False``).

    Lightning calls ``set_epoch`` before each epoch, so the order and every sample's seed are a function of the
    seed and the epoch. ``resume_at(epoch, batches)`` makes the next pass over that epoch skip the batches a
    checkpointed run had already trained on.

    With ``num_replicas`` > 1 (DDP) process ``rank`` takes positions ``rank, rank + num_replicas, ...`` of the
    global order. ``equal_shares`` (training) repeats the first samples of the order so that every process
    gets as many (DDP's gradient exchange needs the same number of steps everywhere); without it
    (evaluation, predict) each sample is yielded by exactly one process and the shares differ by at most one.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        seeded_keys: bool = True,
        batch_size: int = 1,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        equal_shares: bool = True,
    ) -> None:
        # DistributedSampler's own checks of num_replicas and rank; it only reads the dataset's length
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.length = length
        self.seeded_keys = seeded_keys
        self.batch_size = batch_size
        self.epoch = epoch
        self.equal_shares = equal_shares
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches of ``epoch`` on the next pass (if that pass is of ``epoch``)."""
        self._resume = (epoch, batches)

    def __len__(self) -> int:
        replicas = self.num_replicas
        if replicas == 1:
            return self.length
        if self.equal_shares:
            return -(-self.length // replicas)
        return len(range(self.rank, self.length, replicas))

    def __iter__(self) -> Iterator[SampleKey]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        sample_seeds = rng.integers(0, 2**31 - 1, size=self.length)
        if self.num_replicas > 1:
            if self.equal_shares and self.length % self.num_replicas:
                padding = self.num_replicas - self.length % self.num_replicas
                order = np.concatenate([order, np.resize(order, padding)])
            order = order[self.rank :: self.num_replicas]
        start = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None  # one pass only: the next epoch starts from its beginning
            if epoch == self.epoch:
                start = min(batches * self.batch_size, len(order))
        order = order[start:]
        if not self.seeded_keys:
            return iter(order.tolist())
        return iter(zip(order.tolist(), sample_seeds[order].tolist()))


class BatchesAsSamples(DistributedSampler):
    """A batch sampler of fixed-size batches seen as a sampler of their samples, one batch after another.

    A DataLoader with ``sampler=BatchesAsSamples(s), batch_size=s.batch_size`` yields ``s``'s batches. Being a
    ``DistributedSampler``, it keeps Lightning from injecting its own sampler under DDP, which a custom batch
    sampler (the P×K sampler of the faces) cannot take; ``s`` does its own sharding. ``set_epoch`` and
    ``resume_at`` go to ``s``.
    """

    def __init__(self, batch_sampler: Any) -> None:
        # no super().__init__: the sharding, the seed and the epoch are batch_sampler's
        self.batch_sampler = batch_sampler
        self.batch_size = int(batch_sampler.batch_size)

    @property
    def epoch(self) -> int:  # type: ignore[override]
        return int(self.batch_sampler.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        self.batch_sampler.resume_at(epoch, batches)

    def __len__(self) -> int:
        return len(self.batch_sampler) * self.batch_size

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batch_sampler:
            if len(batch) != self.batch_size:
                raise RuntimeError(
                    f"{type(self.batch_sampler).__name__} gave a batch of {len(batch)}, expected {self.batch_size}"
                )
            yield from batch


class BaseDataModule(pl.LightningDataModule):
    """What every datamodule of the suite shares.

    Args:
        input_size: the model's input resolution ρ (linked from the model's ``input_size`` by the CLI).
        batch_size: images per batch (per process under DDP).
        num_workers: loader processes (0 loads in the main process).
        mean: normalisation mean (linked from the model by the CLI; default: [-1, 1] scaling, what the
            ImageNet weights expect).
        std: normalisation std.
        predict_dir: folder of images to predict on (searched recursively, sorted).
        seed: seed of the shuffling (and of the augmentation where the dataset takes seeded keys).
        pin_memory: page-locked batches for fast host-to-GPU copies (only when CUDA is available).

    Subclasses build their datasets and return ``self._loader(dataset, train=...)`` from the
    ``*_dataloader`` hooks; a training loader built with a custom batch sampler passes it as
    ``batch_sampler``: its batches have a fixed ``batch_size``, it offers ``set_epoch`` and ``resume_at`` like
    ``EpochSeededSampler``, and under DDP it yields this process's share (``self.replicas()`` says which).
    """

    #: whether the training dataset takes ``(index, seed)`` keys, so each sample's augmentation follows the
    #: sampler
    seeded_keys: bool = False
    #: how samples are put together into a batch (None: PyTorch's default collate)
    collate_fn: Callable[[list[Any]], Any] | None = None

    def __init__(
        self,
        input_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        mean: tuple[float, float, float] = MINUS_ONE_ONE[0],
        std: tuple[float, float, float] = MINUS_ONE_ONE[1],
        predict_dir: str | None = None,
        seed: int = 0,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.input_size = input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.predict_dir = predict_dir
        self.seed = seed
        self.pin_memory = pin_memory
        self._train_sampler: Any = None
        self._resume: tuple[int, int] | None = None

    # ----------------------------------------------------------------- loaders
    def _fit_epoch(self) -> int:
        """The epoch the trainer is in (0 outside fit): the first pass's iterator is made before Lightning
        calls ``set_epoch``, and with workers it draws indices at once, so a resumed run's sampler must
        start at the right epoch."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def replicas(self) -> tuple[int, int]:
        """(number of processes, this process's rank): (1, 0) outside DDP."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, dataset: Dataset, train: bool = False, batch_sampler: Any = None) -> DataLoader:
        """The one way loaders are built: the resumable sampler (training) or the sequential order, each
        process taking its share under DDP."""
        common: dict[str, Any] = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )
        if batch_sampler is not None:
            if train:
                self._adopt_train_sampler(batch_sampler)
            return DataLoader(
                dataset,
                sampler=BatchesAsSamples(batch_sampler),
                batch_size=batch_sampler.batch_size,
                drop_last=False,
                **common,
            )
        replicas, rank = self.replicas()
        count = len(dataset)  # type: ignore[arg-type]
        if 0 < count < replicas:
            # a process without an image would skip the evaluation, and the others would wait for it forever
            kind = "training" if train else "evaluation or predict"
            raise ConfigError(
                f"trainer: {replicas} processes but only {count} images in the {kind} set; "
                f"use at most {count} devices"
            )
        sampler = EpochSeededSampler(
            count,
            seed=self.seed,
            shuffle=train,
            seeded_keys=self.seeded_keys and train,  # evaluation does not augment
            batch_size=self.batch_size,
            num_replicas=replicas,
            rank=rank,
            equal_shares=train,
        )
        if train:
            self._adopt_train_sampler(sampler)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and len(sampler) > self.batch_size,
            **common,
        )

    def _adopt_train_sampler(self, sampler: Any) -> None:
        sampler.set_epoch(self._fit_epoch())
        if self._resume is not None:
            sampler.resume_at(*self._resume)
            self._resume = None
        self._train_sampler = sampler

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The training order's position: the epoch and the batches of it already trained on."""
        sampler = self._train_sampler
        if sampler is None or self.trainer is None:
            return {}
        batches = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return {"epoch": int(sampler.epoch), "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
