"""The base every datamodule shares: batch size and workers, one way to build loaders, the predict folder,
the normalisation, and shuffling that a resumed run replays exactly.

Resumable shuffling: the training order (and, for datasets that take ``(index, seed)`` keys, every sample's
augmentation) is a function of the seed and the epoch alone, and the datamodule's ``state_dict`` (which
Lightning writes into every checkpoint) records the epoch and how many batches of it were trained on. A run
resumed from a checkpoint therefore sees exactly the batches the uninterrupted run saw after that point,
whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mobilenets.datasets.transforms import MINUS_ONE_ONE

#: A sample index, or (index, seed) as yielded by ``EpochSeededSampler(seeded_keys=True)``.
SampleKey = int | tuple[int, int]


class EpochSeededSampler(Sampler):
    """Orders ``length`` samples from ``(seed, epoch)``; yields ``(index, sample seed)`` keys (or plain indices
    with ``seeded_keys=False``).

    Lightning calls ``set_epoch`` before each epoch, so the order and every sample's seed are a function of the
    seed and the epoch. ``resume_at(epoch, batches)`` makes the next pass over that epoch skip the batches a
    checkpointed run had already trained on.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        seeded_keys: bool = True,
        batch_size: int = 1,
        epoch: int = 0,
    ) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.seeded_keys = seeded_keys
        self.batch_size = batch_size
        self.epoch = epoch
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches of ``epoch`` on the next pass (if that pass is of ``epoch``)."""
        self._resume = (epoch, batches)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[SampleKey]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        sample_seeds = rng.integers(0, 2**31 - 1, size=self.length)
        start = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None  # one pass only: the next epoch starts from its beginning
            if epoch == self.epoch:
                start = min(batches * self.batch_size, self.length)
        order = order[start:]
        if not self.seeded_keys:
            return iter(order.tolist())
        return iter(zip(order.tolist(), sample_seeds[order].tolist()))


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
    ``batch_sampler`` (it must offer ``set_epoch`` and ``resume_at`` like ``EpochSeededSampler``).
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

    def _loader(self, dataset: Dataset, train: bool = False, batch_sampler: Any = None) -> DataLoader:
        """The one way loaders are built: the resumable sampler (training) or the sequential order."""
        common: dict[str, Any] = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if batch_sampler is not None:
            if train:
                self._adopt_train_sampler(batch_sampler)
            return DataLoader(dataset, batch_sampler=batch_sampler, **common)
        sampler = None
        if not distributed:  # under DDP Lightning installs a DistributedSampler (seeded, per epoch)
            sampler = EpochSeededSampler(
                len(dataset),  # type: ignore[arg-type]
                seed=self.seed,
                shuffle=train,
                seeded_keys=self.seeded_keys and train,  # evaluation does not augment
                batch_size=self.batch_size,
            )
            if train:
                self._adopt_train_sampler(sampler)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train if sampler is None else None,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,  # type: ignore[arg-type]
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
