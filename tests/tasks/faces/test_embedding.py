"""Face embeddings: the 10-fold verification protocol, VAL/FAR, the semi-hard miner, the losses, and
fit/test runs of the FaceEmbedder through the CLI (triplet) and with a TorchScript teacher (distill)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mobilenets.datasets.synthetic.faces import make_identity_folders, make_lfw_pairs
from mobilenets.tasks.base import read_checkpoint
from mobilenets.tasks.faces.embedding import (
    FaceEmbedder,
    distillation_loss,
    semi_hard_triplets,
    triplet_loss,
)
from mobilenets.tasks.faces.verification import (
    best_accuracy_threshold,
    evaluate_pairs,
    kfold_accuracy,
    kfold_val,
    roc_curve,
    threshold_for_far,
)

# Two folds of four pairs, worked by hand in the test below.
SCORES = np.array([0.9, 0.6, 0.5, 0.2, 0.8, 0.3, 0.4, 0.1])
SAME = np.array([True, True, False, False, True, True, False, False])
FOLDS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_kfold_accuracy_matches_the_hand_computed_case() -> None:
    # Fold 0 is judged with fold 1's best threshold: candidates -0.9, 0.2, 0.35, 0.6, 0.8 give accuracies
    # 2/4, 3/4, 2/4, 3/4, 2/4 on fold 1, a tie of 0.2 and 0.6: the strictest, 0.6, as FaceNet's reference
    # picks it; on fold 0 it accepts 0.9 (right) and rejects 0.6 (wrong), 0.5 and 0.2 (right): 3/4. Fold 1
    # with fold 0's best (0.55, 4/4 there): accepts 0.8 (right), rejects 0.3 (wrong), 0.4 and 0.1: 3/4.
    accuracies, thresholds = kfold_accuracy(SCORES, SAME, FOLDS)
    np.testing.assert_allclose(thresholds, [0.6, 0.55])
    np.testing.assert_allclose(accuracies, [0.75, 0.75])


def facenet_calculate_roc_accepts(distances: np.ndarray, same: np.ndarray, train: np.ndarray) -> np.ndarray:
    """FaceNet's ``calculate_roc`` (facenet/src/facenet.py) for one fold: squared L2 distances, thresholds
    ``np.arange(0, 4, 0.01)``, a pair accepted when its distance is below; ``np.argmax`` takes the first
    (smallest, strictest) threshold of best training accuracy. Returns which pairs it accepts."""
    thresholds = np.arange(0, 4, 0.01)
    accuracy = [np.mean((distances[train] < t) == same[train]) for t in thresholds]
    return distances < thresholds[int(np.argmax(accuracy))]


def test_ties_pick_the_strictest_threshold_like_facenets_reference() -> None:
    # cosines 0.9, 0.7, 0.5, 0.3 of same, different, same, different: accepting the first only and accepting
    # the first three are both 3/4 right. The reference takes the strictest; the most permissive choice
    # would accept the held-out different pair at 0.65 too.
    train_scores = np.array([0.9, 0.7, 0.5, 0.3])
    train_same = np.array([True, False, True, False])
    threshold = best_accuracy_threshold(train_scores, train_same)
    assert threshold == pytest.approx(0.8)
    scores = np.concatenate([train_scores, [0.95, 0.65, 0.2]])
    same = np.concatenate([train_same, [True, False, False]])
    train = np.arange(scores.size) < train_scores.size
    reference = facenet_calculate_roc_accepts(2 - 2 * scores, same, train)  # unit vectors: |a-b|² = 2 - 2cos
    np.testing.assert_array_equal(scores > threshold, reference)


def test_kfold_val_at_far_matches_the_hand_computed_case() -> None:
    # Two negatives per fold: FAR ≤ 1e-3 allows no false accept, so each fold's threshold is the other
    # fold's highest negative: fold 0 uses 0.4 (accepts 0.9, 0.6 and the negative 0.5: VAL 1, FAR 1/2),
    # fold 1 uses 0.5 (accepts 0.8 only: VAL 1/2, FAR 0).
    val, far = kfold_val(SCORES, SAME, FOLDS, 1e-3)
    assert val == pytest.approx(0.75) and far == pytest.approx(0.25)
    assert threshold_for_far(SCORES[:4], SAME[:4], 0.5) == pytest.approx(0.2)  # one of two may pass
    report = evaluate_pairs(SCORES, SAME, FOLDS)
    assert report.accuracy == pytest.approx(0.75) and report.accuracy_std == pytest.approx(0.0)
    assert report.val_at_far_1e4 == pytest.approx(0.75) and report.num_folds == 2
    # pooled over both folds (the threshold stored for search), 0.55 misjudges only the positive 0.3
    assert report.threshold == pytest.approx(0.55)
    assert best_accuracy_threshold(SCORES, SAME) == pytest.approx(0.55)
    assert np.mean((report.threshold < SCORES) == SAME) == pytest.approx(7 / 8)


def test_roc_curve_runs_from_reject_all_to_accept_all() -> None:
    far, tar = roc_curve(SCORES, SAME)
    assert (far[0], tar[0]) == (0.0, 0.0) and (far[-1], tar[-1]) == (1.0, 1.0)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)


def test_semi_hard_miner_on_a_constructed_batch() -> None:
    # 1-d embeddings 0, 1, 1.5, 5 with identities A, A, B, B (squared distances in brackets):
    # a=0,p=1 [1]: negatives 2 [2.25] and 3 [25] are both semi-hard, the closest is 2.
    # a=1,p=0 [1]: negative 2 [0.25] is harder than the positive, 3 [16] is semi-hard → 3.
    # a=2,p=3 [12.25]: both negatives are closer (0 [2.25], 1 [0.25]): fall back to the farthest, 0.
    # a=3,p=2 [12.25]: 0 [25] and 1 [16] are semi-hard, the closest is 1.
    embeddings = torch.tensor([[0.0], [1.0], [1.5], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    anchors, positives, negatives = semi_hard_triplets(embeddings, labels)
    triplets = set(zip(anchors.tolist(), positives.tolist(), negatives.tolist()))
    assert triplets == {(0, 1, 2), (1, 0, 3), (2, 3, 0), (3, 2, 1)}
    loss, active = triplet_loss(embeddings, labels, margin=0.2)
    # only (2, 3, 0) violates the margin: 12.25 - 2.25 + 0.2 = 10.2, averaged over 4 triplets
    assert loss.item() == pytest.approx(10.2 / 4) and active.item() == pytest.approx(0.25)


def test_triplet_loss_needs_positives_and_negatives() -> None:
    with pytest.raises(ValueError, match="no anchor-positive pair"):
        triplet_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), 0.2)


def test_distillation_loss_is_the_summed_squared_difference() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert distillation_loss(student, teacher).item() == pytest.approx(1.0)  # (2 + 0) / 2


def test_embedder_outputs_unit_vectors_and_reports_its_paper_row() -> None:
    model = FaceEmbedder(width_mult=0.25, input_size=32, embedding_size=16).eval()
    embeddings = model(torch.randn(3, 3, 32, 32))
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    assert model.paper_figures() is None
    assert model.export_metadata()["embedding_size"] == "16"
    paper = FaceEmbedder(width_mult=1.0, input_size=160, loss="distill", teacher="t.pt")
    assert paper.paper_figures() == (286, 4.9)
    assert abs(paper.profile().million_mult_adds - 286) / 286 < 0.02


# --------------------------------------------------------------------------- end-to-end runs
@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_identity_folders(root / "train", num_identities=6, images_per_identity=4, size=36, seed=2)
    make_identity_folders(
        root / "lfw", num_identities=6, images_per_identity=3, size=36, seed=3, prefix="Test"
    )
    make_lfw_pairs(root / "lfw" / "pairs.txt", root / "lfw", folds=3, pairs_per_fold=2, seed=3)
    return root


def _config(faces: Path, run_dir: Path, model: dict) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "default_root_dir": str(run_dir),
            "accelerator": "cpu",
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir / "ckpt")},
                }
            ],
        },
        "model": {
            "class_path": "mobilenets.tasks.faces.embedding.FaceEmbedder",
            "init_args": {
                "width_mult": 0.25,
                "input_size": 32,
                "embedding_size": 16,
                "optimizer": "adamw",
                "lr": 0.003,
                **model,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.faces.FaceDataModule",
            "init_args": {
                "train_dir": str(faces / "train"),
                "pairs_file": str(faces / "lfw" / "pairs.txt"),
                "pairs_dir": str(faces / "lfw"),
                "identities_per_batch": 3,
                "images_per_identity": 2,
                "batch_size": 8,
                "batches_per_epoch": 2,
                "num_workers": 0,
            },
        },
    }


@pytest.mark.slow
def test_triplet_fit_and_test_through_the_cli(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from mobilenets.tasks.cli import main

    config = _config(faces, tmp_path / "run", {"loss": "triplet", "plot_dir": str(tmp_path / "plots")})
    config_file = tmp_path / "faces.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(config_file)]) == 0
    checkpoint_file = next((tmp_path / "run" / "ckpt").glob("*.ckpt"))
    checkpoint = read_checkpoint(checkpoint_file)
    threshold = checkpoint["state_dict"]["threshold"]
    assert torch.isfinite(threshold)  # chosen on the validation pairs and saved for the index
    capsys.readouterr()
    assert main(["test", "--config", str(config_file), "--ckpt_path", str(checkpoint_file)]) == 0
    printed = capsys.readouterr().out
    assert "1e-4 Accuracy" in printed and "Million Mult-Adds" in printed
    assert "paper 1.0 MobileNet-160" in printed and "ours 0.25 MobileNet-32 (triplet)" in printed
    assert (tmp_path / "plots" / "faces_roc.png").stat().st_size > 1000
    report = json.loads((tmp_path / "plots" / "faces_report.json").read_text())
    assert report["num_pairs"] == 12 and report["num_folds"] == 3
    # 3 folds of 4 pairs: each fold scores k/4, the 10-fold accuracy is their mean k/12, and the table says so
    assert report["accuracy"] * 12 == pytest.approx(round(report["accuracy"] * 12), abs=1e-9)
    assert f"10-fold accuracy {100 * report['accuracy']:.1f}% ± {100 * report['accuracy_std']:.1f}" in printed


class _Teacher(torch.nn.Module):
    """A fixed 'teacher': mean colour and a coarse layout projected to 16 dimensions."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(3 * 4 * 4, 16, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        return pooled @ self.projection


@pytest.mark.slow
def test_distillation_from_a_torchscript_teacher_caches_its_embeddings(faces: Path, tmp_path: Path) -> None:
    from mobilenets.tasks.cli.lightning import lightning_cli

    teacher_file = tmp_path / "teacher.pt"
    torch.jit.script(_Teacher()).save(str(teacher_file))
    model = {"loss": "distill", "teacher": str(teacher_file), "teacher_cache_dir": str(tmp_path / "cache")}
    config = _config(faces, tmp_path / "run", model)
    config["data"]["init_args"]["sampler"] = "shuffle"
    cli = lightning_cli({"subcommand": "fit", "fit": config})
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1
    outputs = np.load(cached[0])
    assert outputs.shape == (24, 16)
    targets = cli.model._teacher_targets
    torch.testing.assert_close(targets.norm(dim=1), torch.ones(24))  # normalised like FaceNet's
    assert np.isfinite(cli.trainer.callback_metrics["train/loss"].item())
    # a second fit reuses the cache (same teacher checksum and preprocessing)
    mtime = cached[0].stat().st_mtime_ns
    lightning_cli(
        {"subcommand": "fit", "fit": _config(faces, tmp_path / "run2", model) | {"data": config["data"]}}
    )
    assert cached[0].stat().st_mtime_ns == mtime


def test_distillation_without_a_teacher_is_a_clear_error(faces: Path, tmp_path: Path) -> None:
    from mobilenets.tasks.cli.lightning import lightning_cli

    config = _config(faces, tmp_path / "run", {"loss": "distill"})
    with pytest.raises(ValueError, match="loss: distill needs a teacher file"):
        lightning_cli({"subcommand": "fit", "fit": config})


@pytest.mark.slow
def test_demo_step_quick_learns_from_the_official_weights(tmp_path: Path) -> None:
    from mobilenets.tasks.cli.demo.faces import PROBES, run_demo

    rows = {row.metric: row for row in run_demo(tmp_path, quick=True)}
    accuracy = next(row for metric, row in rows.items() if metric.startswith("10-fold accuracy"))
    assert accuracy.baseline == "50.0% (chance)"
    # held-out people, fine-tuned for a few dozen steps from ImageNet features: clearly above chance
    assert float(accuracy.value.rstrip("%")) >= 75.0
    probes = next(row for metric, row in rows.items() if metric.startswith("held-out probes identified"))
    found, total = map(int, probes.value.split("/"))
    assert total == PROBES and found >= 2  # chance: about 1 in 4
    assert (tmp_path / "index").is_dir() and (tmp_path / "plots" / "faces_roc.png").stat().st_size > 1000
