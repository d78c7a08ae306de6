"""Face-identity data: identity folders (VGGFace2 / CASIA-WebFace / LFW layout) or a ``path,identity`` CSV,
LFW's ``pairs.txt``, an identity-balanced P×K batch sampler and the datamodule of the embedding task.

Images are expected to be aligned face crops; detection and alignment happen before this module.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.base import BaseDataModule, SampleKey
from mobilenets.datasets.image_list import ImageListDataset
from mobilenets.datasets.images import check_images, images_in_folder, is_image_file, list_images, load_rgb
from mobilenets.datasets.transforms import MINUS_ONE_ONE, ClassificationTransform

log = logging.getLogger(__name__)


class FaceDataError(MobilenetsError, ValueError):
    """A face dataset file or folder that does not match the expected layout; names the file and line."""


class PairsFormatError(FaceDataError):
    """A malformed LFW ``pairs.txt``; the message names the file and the line number."""


@dataclass(frozen=True)
class FaceSample:
    """One face image and the identity it shows."""

    path: Path
    identity: str


# --------------------------------------------------------------------------- galleries and training sets
def scan_identity_folders(root: str | Path) -> list[FaceSample]:
    """Samples of ``root/<identity>/<image>`` (LFW, VGGFace2, CASIA-WebFace layouts), sorted by path.

    Images lying directly under ``root`` (not in an identity folder) are ignored with a warning.
    Raises ``FaceDataError`` naming ``root`` when it is missing or holds no identity folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FaceDataError(f"{root}: identity folder root not found (expected <root>/<identity>/<image>)")
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        log.warning("%s: ignoring %d images outside identity folders (e.g. %s)", root, len(loose), loose[0])
    samples = [
        FaceSample(path, folder.name)
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for path in list_images(folder)
    ]
    if not samples:
        raise FaceDataError(
            f"{root}: no images found in identity folders (expected <root>/<identity>/<image>)"
        )
    return samples


def read_identity_csv(csv_path: str | Path, image_root: str | Path | None = None) -> list[FaceSample]:
    """Samples of a ``path,identity`` CSV (an optional header row ``path,identity`` is skipped).

    Relative paths are resolved against ``image_root`` (default: the CSV's folder). A row without exactly
    two non-empty fields, or naming a missing file, raises ``FaceDataError`` with its line number.
    """
    csv_path = Path(csv_path)
    base = Path(image_root) if image_root is not None else csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first path
    except FileNotFoundError as error:
        raise FaceDataError(f"{csv_path}: identity CSV not found") from error
    samples: list[FaceSample] = []
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not field.strip() for field in row):
            continue
        if line_number == 1 and [f.strip().lower() for f in row] == ["path", "identity"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise FaceDataError(
                f"{csv_path}:{line_number}: expected 'path,identity' (two non-empty fields), got {row!r}"
            )
        path = Path(row[0].strip())
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise FaceDataError(f"{csv_path}:{line_number}: image file {path} not found")
        samples.append(FaceSample(path, row[1].strip()))
    if not samples:
        raise FaceDataError(f"{csv_path}: the identity CSV lists no images")
    return samples


def load_face_samples(root: str | Path | None = None, csv_path: str | Path | None = None) -> list[FaceSample]:
    """Identity folders under ``root`` or the rows of ``csv_path`` (exactly one of the two)."""
    if (root is None) == (csv_path is None):
        raise FaceDataError("give either an identity folder root or a path,identity CSV (exactly one)")
    return scan_identity_folders(root) if root is not None else read_identity_csv(csv_path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- LFW pairs.txt
@dataclass(frozen=True)
class FacePair:
    """One verification pair of ``pairs.txt``: two images, whether they show one person, and the fold."""

    path_a: Path
    path_b: Path
    same: bool
    fold: int
    line: int


def lfw_image_path(images_root: Path, name: str, number: int, ext: str = "jpg") -> Path:
    """LFW's file naming: ``<root>/<Name>/<Name>_<0001>.jpg``."""
    return images_root / name / f"{name}_{number:04d}.{ext.lstrip('.')}"


def _parse_number(token: str, pairs_path: Path, line_number: int, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise PairsFormatError(
            f"{pairs_path}:{line_number}: {what} must be an integer, got {token!r}"
        ) from None
    if value < 1:
        raise PairsFormatError(f"{pairs_path}:{line_number}: {what} must be >= 1, got {value}")
    return value


def parse_pairs(
    pairs_path: str | Path, images_root: str | Path, ext: str = "jpg", check_files: bool = True
) -> list[FacePair]:
    """Parse LFW's ``pairs.txt``.

    The first line is ``<folds> <pairs per fold>``; then, per fold, ``n`` matched lines ``name n1 n2``
    followed by ``n`` mismatched lines ``name1 n1 name2 n2`` (tab- or space-separated). Any deviation,
    and (with ``check_files``) a pair naming a missing image, raises ``PairsFormatError`` with the line.
    """
    pairs_path = Path(pairs_path)
    images_root = Path(images_root)
    try:
        lines = pairs_path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of the header
    except FileNotFoundError as error:
        raise PairsFormatError(f"{pairs_path}: pairs file not found") from error
    numbered = [(i, line.split()) for i, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise PairsFormatError(
            f"{pairs_path}:1: empty file; expected a first line '<folds> <pairs per fold>'"
        )
    header_line, header = numbered[0]
    if len(header) != 2:
        raise PairsFormatError(
            f"{pairs_path}:{header_line}: expected '<folds> <pairs per fold>', got {' '.join(header)!r}"
        )
    folds = _parse_number(header[0], pairs_path, header_line, "the number of folds")
    per_fold = _parse_number(header[1], pairs_path, header_line, "the number of pairs per fold")
    body = numbered[1:]
    expected = folds * 2 * per_fold
    if len(body) != expected:
        last = body[-1][0] if body else header_line
        raise PairsFormatError(
            f"{pairs_path}:{last}: header promises {folds} folds x {per_fold} matched + {per_fold} "
            f"mismatched = {expected} pair lines, found {len(body)}"
        )
    pairs: list[FacePair] = []
    for position, (line_number, fields) in enumerate(body):
        fold, within = divmod(position, 2 * per_fold)
        same = within < per_fold
        if same:
            if len(fields) != 3:
                raise PairsFormatError(
                    f"{pairs_path}:{line_number}: fold {fold + 1} matched pair expected 'name n1 n2', "
                    f"got {' '.join(fields)!r}"
                )
            name_a, name_b = fields[0], fields[0]
            number_a = _parse_number(fields[1], pairs_path, line_number, "the image number")
            number_b = _parse_number(fields[2], pairs_path, line_number, "the image number")
        else:
            if len(fields) != 4:
                raise PairsFormatError(
                    f"{pairs_path}:{line_number}: fold {fold + 1} mismatched pair expected "
                    f"'name1 n1 name2 n2', got {' '.join(fields)!r}"
                )
            name_a, name_b = fields[0], fields[2]
            number_a = _parse_number(fields[1], pairs_path, line_number, "the image number")
            number_b = _parse_number(fields[3], pairs_path, line_number, "the image number")
        path_a = lfw_image_path(images_root, name_a, number_a, ext)
        path_b = lfw_image_path(images_root, name_b, number_b, ext)
        if check_files:
            for path in (path_a, path_b):
                if not path.is_file():
                    raise PairsFormatError(f"{pairs_path}:{line_number}: image {path} not found")
        pairs.append(FacePair(path_a, path_b, same, fold, line_number))
    return pairs


def write_pairs(path: str | Path, folds: Sequence[tuple[list[tuple], list[tuple]]]) -> None:
    """Write an LFW-style ``pairs.txt``: ``folds`` holds, per fold, (matched, mismatched) tuples of
    ``(name, n1, n2)`` and ``(name1, n1, name2, n2)``; every fold must have the same count of each."""
    path = Path(path)
    per_fold = len(folds[0][0])
    lines = [f"{len(folds)}\t{per_fold}"]
    for matched, mismatched in folds:
        if len(matched) != per_fold or len(mismatched) != per_fold:
            raise ValueError(f"every fold needs {per_fold} matched and {per_fold} mismatched pairs")
        lines += ["\t".join(map(str, row)) for row in matched]
        lines += ["\t".join(map(str, row)) for row in mismatched]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- torch datasets
class FaceImageDataset(Dataset):
    """Face images with integer identity labels; items are ``{"image", "label", "index"}``."""

    def __init__(self, samples: Sequence[FaceSample], transform: ClassificationTransform) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.identities = sorted({s.identity for s in self.samples})
        label_of = {name: i for i, name in enumerate(self.identities)}
        self.labels = [label_of[s.identity] for s in self.samples]

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor | int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = load_rgb(self.samples[index].path, min_size=self.transform.decode_size)
        image_tensor = self.transform(image, np.random.default_rng(seed))
        return {"image": image_tensor, "label": self.labels[index], "index": index}


class PairImagesDataset(Dataset):
    """The distinct images of a list of pairs, plus the pair table that refers to them by index.

    Items are ``{"image", "index"}``; ``pair_table()`` gives (index_a, index_b, same, fold) arrays, which
    is all the 10-fold evaluation needs once every image has an embedding.
    """

    def __init__(self, pairs: Sequence[FacePair], transform: ClassificationTransform) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        position: dict[Path, int] = {}
        for pair in self.pairs:
            for path in (pair.path_a, pair.path_b):
                position.setdefault(path, len(position))
        self.image_paths = list(position)
        self.index_a = np.array([position[p.path_a] for p in self.pairs], dtype=np.int64)
        self.index_b = np.array([position[p.path_b] for p in self.pairs], dtype=np.int64)
        self.same = np.array([p.same for p in self.pairs], dtype=bool)
        self.folds = np.array([p.fold for p in self.pairs], dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        return self.image_paths

    def pair_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.index_a, self.index_b, self.same, self.folds

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = load_rgb(self.image_paths[index], min_size=self.transform.decode_size)
        return {"image": self.transform(image), "index": index}


# --------------------------------------------------------------------------- P×K sampler
class IdentityBalancedBatchSampler(Sampler[list[int]]):
    """Batches of P identities × K images each (FaceNet's online triplet mining needs positives in-batch).

    Only identities with at least two images can be drawn; one with fewer than K images is sampled with
    replacement. Each epoch reshuffles with ``seed + epoch`` (Lightning sets the epoch; iterating again
    without it moves on to the next one). An epoch has ``num_batches`` batches per process (default: about
    one pass over the images by all processes together). ``resume_at`` skips the batches a checkpointed run
    had trained on, as ``EpochSeededSampler``.

    Under DDP (``num_replicas`` > 1) every process draws the same sequence of steps; a step picks
    ``num_replicas`` × P distinct identities and process ``rank`` takes the ``rank``-th P of them, so the
    processes' simultaneous batches share no identity (and no image). With one process the batches are
    those of a single-process run.

    With ``seeded_keys`` a batch holds ``(index, sample seed)`` keys, as ``EpochSeededSampler`` yields them,
    so every image's augmentation is a function of the seed and the epoch too (it was drawn from fresh OS
    entropy without it, and the same run gave a different model each time).
    """

    def __init__(
        self,
        labels: Sequence[int],
        identities_per_batch: int,
        images_per_identity: int,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        seeded_keys: bool = False,
    ) -> None:
        if identities_per_batch < 2:
            raise ValueError(
                f"identities_per_batch (P) must be >= 2 to have negatives, got {identities_per_batch}"
            )
        if images_per_identity < 2:
            raise ValueError(
                f"images_per_identity (K) must be >= 2 to have positives, got {images_per_identity}"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        by_label: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            by_label.setdefault(int(label), []).append(index)
        self.members = {label: idx for label, idx in by_label.items() if len(idx) >= 2}
        needed = identities_per_batch * num_replicas
        if len(self.members) < needed:
            across = f" × {num_replicas} processes = {needed}" if num_replicas > 1 else ""
            raise ValueError(
                f"P×K sampling needs at least P={identities_per_batch}{across} identities with "
                f"two or more images, found {len(self.members)} (of {len(by_label)} identities)"
            )
        self.p = identities_per_batch
        self.k = images_per_identity
        self.batch_size = self.p * self.k
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_batches = num_batches or max(1, len(labels) // (self.batch_size * num_replicas))
        self.seed = seed
        self.seeded_keys = seeded_keys
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    @property
    def sampler(self) -> IdentityBalancedBatchSampler:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler`` before every epoch
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches of ``epoch`` on the next pass (if that pass is of ``epoch``)."""
        self._resume = (epoch, batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None
        rng = np.random.default_rng(self.seed + epoch)
        # a stream of its own, so the batches are the same with or without sample seeds
        seed_rng = np.random.default_rng([self.seed, epoch, 1])
        labels = np.array(sorted(self.members))
        for number in range(self.num_batches):
            # every process draws the whole step, so the random stream stays the same everywhere
            step = rng.choice(labels, size=self.p * self.num_replicas, replace=False)
            batches: list[list[int]] = []
            for first in range(0, len(step), self.p):
                batch: list[int] = []
                for label in step[first : first + self.p]:
                    members = self.members[int(label)]
                    replace = len(members) < self.k
                    batch += [int(i) for i in rng.choice(members, size=self.k, replace=replace)]
                batches.append(batch)
            seeds = seed_rng.integers(0, 2**31 - 1, size=(len(batches), self.batch_size)).tolist()
            if number < skip:  # skipped batches are still drawn: the later ones must not change
                continue
            if self.seeded_keys:
                yield list(zip(batches[self.rank], seeds[self.rank]))
            else:
                yield batches[self.rank]


# --------------------------------------------------------------------------- datamodule
class FaceDataModule(BaseDataModule):
    """Training faces (identity folders or CSV), LFW-style verification pairs for validation/test, and a
    folder of faces to embed for ``predict``.

    Args:
        train_dir: identity folders ``<train_dir>/<identity>/<image>`` (or use ``train_csv``).
        train_csv: a ``path,identity`` CSV instead of folders.
        pairs_file: LFW ``pairs.txt`` evaluated every validation epoch (10-fold protocol).
        pairs_dir: the LFW-layout folder the pairs refer to.
        test_pairs_file: pairs for ``test`` (default: ``pairs_file``).
        test_pairs_dir: their image folder (default: ``pairs_dir``).
        image_ext: extension of the pair images (LFW: ``jpg``).
        input_size: the model's input resolution.
        sampler: ``pk`` (P identities × K images, for the triplet loss) or ``shuffle`` (distillation).
        identities_per_batch: P of the P×K sampler.
        images_per_identity: K of the P×K sampler.
        batch_size: batch size of ``shuffle`` training and of evaluation.
        batches_per_epoch: training batches per epoch and process (default: about one pass over the images by
            all processes together).
        train_scale: the random-resized-crop scale range of training (aligned crops: keep it mild).
        num_workers: data-loading processes.
        skip_corrupt: skip undecodable training images (counted and logged) instead of failing.
        seed: seed of the P×K sampler and of the shuffling.
        predict_dir: a folder of aligned face images (searched recursively, sorted) that ``predict`` embeds;
            predicting needs neither the training faces nor the pairs.
        mean, std: the model's normalisation.
    """

    #: FaceImageDataset draws each sample's augmentation from the seed in its key (the ``shuffle`` sampler)
    seeded_keys = True

    def __init__(
        self,
        train_dir: str | None = None,
        train_csv: str | None = None,
        pairs_file: str | None = None,
        pairs_dir: str | None = None,
        test_pairs_file: str | None = None,
        test_pairs_dir: str | None = None,
        image_ext: str = "jpg",
        input_size: int = 160,
        sampler: Literal["pk", "shuffle"] = "pk",
        identities_per_batch: int = 16,
        images_per_identity: int = 4,
        batch_size: int = 64,
        batches_per_epoch: int | None = None,
        train_scale: tuple[float, float] = (0.7, 1.0),
        num_workers: int = 2,
        skip_corrupt: bool = False,
        seed: int = 0,
        predict_dir: str | None = None,
        mean: tuple[float, float, float] = MINUS_ONE_ONE[0],
        std: tuple[float, float, float] = MINUS_ONE_ONE[1],
    ) -> None:
        super().__init__(input_size, batch_size, num_workers, mean, std, predict_dir, seed)
        self.save_hyperparameters()
        self.train_dataset: FaceImageDataset | None = None
        self.val_dataset: PairImagesDataset | None = None
        self.test_dataset: PairImagesDataset | None = None
        self.predict_dataset: ImageListDataset | None = None

    def _pairs_dataset(self, pairs_file: str | None, pairs_dir: str | None) -> PairImagesDataset | None:
        if pairs_file is None:
            return None
        if pairs_dir is None:
            raise FaceDataError(f"{pairs_file}: pairs_dir (the folder of the pair images) is not set")
        pairs = parse_pairs(pairs_file, pairs_dir, self.hparams.image_ext)
        return PairImagesDataset(pairs, self._eval_transform())

    def _eval_transform(self) -> ClassificationTransform:
        return ClassificationTransform(self.input_size, train=False, mean=self.mean, std=self.std)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self.train_dataset is None:
            if hp.train_dir is None and hp.train_csv is None:
                raise FaceDataError("fitting needs train_dir (identity folders) or train_csv")
            samples = load_face_samples(hp.train_dir, hp.train_csv)
            kept, _ = check_images([s.path for s in samples], hp.skip_corrupt, "training faces")
            samples = [samples[i] for i in kept]
            transform = ClassificationTransform(
                self.input_size, train=True, mean=self.mean, std=self.std, scale=tuple(hp.train_scale)
            )
            self.train_dataset = FaceImageDataset(samples, transform)
        if stage in ("fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._pairs_dataset(hp.pairs_file, hp.pairs_dir)
        if stage == "test" and self.test_dataset is None:
            self.test_dataset = self._pairs_dataset(
                hp.test_pairs_file or hp.pairs_file, hp.test_pairs_dir or hp.pairs_dir
            )
            if self.test_dataset is None:
                raise FaceDataError("testing needs pairs_file (or test_pairs_file) and its pairs_dir")
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = self._predict_images()

    def _predict_images(self) -> ImageListDataset:
        hp = self.hparams
        if not self.predict_dir:
            raise FaceDataError(
                "predict needs predict_dir (data.init_args.predict_dir: a folder of face images)"
            )
        paths = images_in_folder(self.predict_dir, "predict_dir", FaceDataError)
        # the pair images' eval preprocessing (resize, centre crop): faces are embedded as they are evaluated
        return ImageListDataset(paths, None, self._eval_transform(), skip_corrupt=hp.skip_corrupt)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        if hp.sampler == "pk":
            replicas, rank = self.replicas()
            sampler = IdentityBalancedBatchSampler(
                self.train_dataset.labels,
                hp.identities_per_batch,
                hp.images_per_identity,
                hp.batches_per_epoch,
                self.seed,
                num_replicas=replicas,
                rank=rank,
                seeded_keys=self.seeded_keys,
            )
            return self._loader(self.train_dataset, train=True, batch_sampler=sampler)
        # the base drops a last partial batch (batch-norm statistics), unless that would leave no batch at all
        return self._loader(self.train_dataset, train=True)

    def _eval_loader(self, dataset: PairImagesDataset | None) -> DataLoader | list:
        if dataset is None:
            return []
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            self.setup("predict")
        return self._loader(self.predict_dataset)
