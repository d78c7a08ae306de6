"""Face data: identity folders, path,identity CSVs, LFW pairs.txt parsing and the P×K sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from mobilenets.datasets.faces import (
    FaceDataError,
    FaceDataModule,
    IdentityBalancedBatchSampler,
    PairImagesDataset,
    PairsFormatError,
    parse_pairs,
    read_identity_csv,
    scan_identity_folders,
)
from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.datasets.transforms import ClassificationTransform


@pytest.fixture(scope="module")
def lfw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lfw")
    make_identity_folders(root / "images", num_identities=12, images_per_identity=(1, 4), size=40, seed=1)
    make_lfw_pairs(root / "pairs.txt", root / "images", folds=3, pairs_per_fold=2, seed=1)
    return root


def test_identity_folders_list_every_image_with_its_folder_name(lfw: Path) -> None:
    samples = scan_identity_folders(lfw / "images")
    on_disk = sorted((lfw / "images").glob("*/*.jpg"))
    assert sorted(s.path for s in samples) == on_disk
    assert all(s.identity == s.path.parent.name for s in samples)


def test_empty_identity_root_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "nobody").mkdir()
    with pytest.raises(FaceDataError, match=str(tmp_path)):
        scan_identity_folders(tmp_path)


def test_identity_csv_with_header_and_errors_with_line_numbers(lfw: Path, tmp_path: Path) -> None:
    image = next((lfw / "images").glob("*/*.jpg"))
    good = tmp_path / "faces.csv"
    good.write_text(f"path,identity\n{image},alice\n\n{image},bob\n")
    samples = read_identity_csv(good)
    assert [s.identity for s in samples] == ["alice", "bob"]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{image},alice\n{image}\n")
    with pytest.raises(FaceDataError, match=r"bad\.csv:2: expected 'path,identity'"):
        read_identity_csv(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text(f"{image},alice\nnot_there.jpg,bob\n")
    with pytest.raises(FaceDataError, match=r"missing\.csv:2: image file .*not_there\.jpg not found"):
        read_identity_csv(missing)


def test_pairs_file_parses_folds_matched_then_mismatched(lfw: Path) -> None:
    pairs = parse_pairs(lfw / "pairs.txt", lfw / "images")
    assert len(pairs) == 3 * 2 * 2
    assert Counter(p.fold for p in pairs) == {0: 4, 1: 4, 2: 4}
    for fold in range(3):
        in_fold = [p for p in pairs if p.fold == fold]
        assert [p.same for p in in_fold] == [True, True, False, False]
    for pair in pairs:
        assert (pair.path_a.parent.name == pair.path_b.parent.name) == pair.same
        assert pair.path_a.is_file() and pair.path_b.is_file()
    first = pairs[0]
    name, n1, n2 = (lfw / "pairs.txt").read_text().splitlines()[1].split("\t")
    assert first.path_a == lfw / "images" / name / f"{name}_{int(n1):04d}.jpg"
    assert first.path_b.name == f"{name}_{int(n2):04d}.jpg"
    assert first.line == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "1 2\nA 1 2\nA 1 2 3\nA 1 B 1\nA 1 B 2\n",
            r"pairs\.txt:3: fold 1 matched pair expected 'name n1 n2'",
        ),
        ("1 1\nA 1 2\nA 1 B\n", r"pairs\.txt:3: fold 1 mismatched pair expected 'name1 n1 name2 n2'"),
        ("1 1\nA one 2\nA 1 B 1\n", r"pairs\.txt:2: the image number must be an integer, got 'one'"),
        ("ten 300\n", r"pairs\.txt:1: the number of folds must be an integer"),
        ("10\n", r"pairs\.txt:1: expected '<folds> <pairs per fold>'"),
        ("2 1\nA 1 2\nA 1 B 1\n", r"pairs\.txt:3: header promises 2 folds x 1 matched \+ 1 mismatched = 4"),
        ("", r"pairs\.txt:1: empty file"),
    ],
)
def test_malformed_pairs_lines_are_errors_with_their_line_number(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(body)
    with pytest.raises(PairsFormatError, match=message):
        parse_pairs(path, tmp_path, check_files=False)


def test_pair_naming_a_missing_image_is_an_error_with_the_line(lfw: Path, tmp_path: Path) -> None:
    lines = (lfw / "pairs.txt").read_text().splitlines()
    name = lines[1].split("\t")[0]
    lines[2] = f"{name}\t1\t99"
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsFormatError, match=rf"pairs\.txt:3: image .*{name}_0099\.jpg not found"):
        parse_pairs(path, lfw / "images")


def test_pair_images_dataset_shares_images_between_pairs(lfw: Path) -> None:
    pairs = parse_pairs(lfw / "pairs.txt", lfw / "images")
    dataset = PairImagesDataset(pairs, ClassificationTransform(32, train=False))
    index_a, index_b, same, _folds = dataset.pair_table()
    assert len(dataset) == len({p for pair in pairs for p in (pair.path_a, pair.path_b)})
    for pair, a, b in zip(pairs, index_a, index_b):
        assert dataset.paths[a] == pair.path_a and dataset.paths[b] == pair.path_b
    assert same.tolist() == [p.same for p in pairs]
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["index"] == 0


def test_pk_sampler_draws_p_identities_times_k_images() -> None:
    labels = [0] * 5 + [1] * 2 + [2] * 3 + [3] * 1 + [4] * 4
    sampler = IdentityBalancedBatchSampler(
        labels, identities_per_batch=3, images_per_identity=4, num_batches=20
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 12
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        assert 3 not in counts  # a single-image identity has no positive
    seen = Counter(labels[i] for batch in batches for i in batch)
    assert set(seen) == {0, 1, 2, 4}
    assert list(sampler) != batches  # reshuffled every epoch


def test_pk_sampler_seeds_each_sample_without_changing_the_batches() -> None:
    labels = [i // 4 for i in range(40)]
    plain = list(IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4))
    seeded = list(IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4, seeded_keys=True))
    assert [[index for index, _ in batch] for batch in seeded] == plain
    again = list(IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=4, seeded_keys=True))
    assert again == seeded
    other = list(IdentityBalancedBatchSampler(labels, 3, 2, num_batches=5, seed=5, seeded_keys=True))
    assert [s for batch in other for _, s in batch] != [s for batch in seeded for _, s in batch]


def test_pk_sampler_needs_enough_identities() -> None:
    with pytest.raises(ValueError, match="at least P=3 identities with two or more images, found 2"):
        IdentityBalancedBatchSampler([0, 0, 1, 1, 2], identities_per_batch=3, images_per_identity=2)


def test_datamodule_gives_pk_training_batches_and_pair_images(lfw: Path) -> None:
    options = dict(
        train_dir=str(lfw / "images"),
        pairs_file=str(lfw / "pairs.txt"),
        pairs_dir=str(lfw / "images"),
        input_size=32,
        identities_per_batch=3,
        images_per_identity=2,
        batch_size=8,
        num_workers=0,
    )
    data = FaceDataModule(**options)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (6, 3, 32, 32)
    # the images, augmentation included, follow from the seed: another run trains on the same batch
    again = FaceDataModule(**options)
    again.setup("fit")
    assert torch.equal(next(iter(again.train_dataloader()))["image"], batch["image"])
    assert torch.unique(batch["label"]).numel() == 3
    val = next(iter(data.val_dataloader()))
    assert set(val) == {"image", "index"}
