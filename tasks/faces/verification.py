"""Face verification on LFW-style pairs: the 10-fold accuracy protocol, VAL at a fixed FAR (FaceNet's
definition) and the ROC curve. Pure functions of pair scores (higher = more alike, e.g. cosine
similarity); a pair is accepted as "same person" when its score is strictly above the threshold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilenets.tasks.figures import pyplot, save_figure


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Every threshold that changes a decision: midpoints between consecutive distinct scores, plus one
    below the lowest (accept all) and one at the highest (reject all)."""
    distinct = np.unique(scores)
    if distinct.size == 0:
        return np.array([0.0])
    middles = (distinct[:-1] + distinct[1:]) / 2
    return np.concatenate([[distinct[0] - 1.0], middles, [distinct[-1]]])


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores > threshold) == same))


def best_accuracy_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold of highest accuracy on these pairs; on ties the strictest (the highest similarity),
    as FaceNet's reference ``calculate_roc`` picks it (``np.argmax`` over ascending distance thresholds
    takes the first, i.e. smallest, distance)."""
    thresholds = candidate_thresholds(scores)
    accepted = scores[None, :] > thresholds[:, None]
    accuracy = (accepted == same[None, :]).mean(axis=1)
    return float(thresholds[len(thresholds) - 1 - int(np.argmax(accuracy[::-1]))])


def val_far(scores: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    """FaceNet's VAL (true accepts / same pairs) and FAR (false accepts / different pairs)."""
    accepted = scores > threshold
    positives, negatives = same.sum(), (~same).sum()
    val = float((accepted & same).sum() / positives) if positives else 0.0
    far = float((accepted & ~same).sum() / negatives) if negatives else 0.0
    return val, far


def threshold_for_far(scores: np.ndarray, same: np.ndarray, far_target: float) -> float:
    """The lowest threshold whose false-accept rate on these pairs is at most ``far_target``."""
    negatives = np.sort(scores[~same])[::-1]
    if negatives.size == 0:
        return float(scores.min() - 1.0) if scores.size else 0.0
    allowed = int(np.floor(far_target * negatives.size + 1e-9))  # false accepts we may make
    if allowed >= negatives.size:
        return float(negatives[-1] - 1.0)
    # accept only scores strictly above the (allowed+1)-th highest negative
    return float(negatives[allowed])


@dataclass(frozen=True)
class VerificationReport:
    """The numbers of the 10-fold protocol (means over folds) and the pooled operating threshold."""

    accuracy: float
    accuracy_std: float
    val_at_far_1e3: float
    far_at_1e3: float
    val_at_far_1e4: float
    far_at_1e4: float
    threshold: float
    num_pairs: int
    num_folds: int

    def as_dict(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "val@far1e-3": self.val_at_far_1e3,
            "far@1e-3": self.far_at_1e3,
            "val@far1e-4": self.val_at_far_1e4,
            "far@1e-4": self.far_at_1e4,
            "threshold": self.threshold,
        }


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy with each fold's threshold chosen on the other folds; returns
    (accuracies, thresholds), one per fold in ascending fold order."""
    fold_ids = np.unique(folds)
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        train = ~test if fold_ids.size > 1 else test
        threshold = best_accuracy_threshold(scores[train], same[train])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(scores[test], same[test], threshold))
    return np.array(accuracies), np.array(thresholds)


def kfold_val(
    scores: np.ndarray, same: np.ndarray, folds: np.ndarray, far_target: float
) -> tuple[float, float]:
    """Mean VAL and FAR over folds, each fold's threshold set on the other folds to FAR ≤ ``far_target``."""
    fold_ids = np.unique(folds)
    vals, fars = [], []
    for fold in fold_ids:
        test = folds == fold
        train = ~test if fold_ids.size > 1 else test
        threshold = threshold_for_far(scores[train], same[train], far_target)
        val, far = val_far(scores[test], same[test], threshold)
        vals.append(val)
        fars.append(far)
    return float(np.mean(vals)), float(np.mean(fars))


def evaluate_pairs(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationReport:
    """Run the whole protocol on pair scores (one per pair), labels and fold numbers."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    if not (scores.shape == same.shape == folds.shape) or scores.ndim != 1:
        raise ValueError(
            f"scores, same and folds must be 1-D of equal length, got {scores.shape}, {same.shape}, {folds.shape}"
        )
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    accuracies, _ = kfold_accuracy(scores, same, folds)
    val3, far3 = kfold_val(scores, same, folds, 1e-3)
    val4, far4 = kfold_val(scores, same, folds, 1e-4)
    return VerificationReport(
        accuracy=float(accuracies.mean()),
        accuracy_std=float(accuracies.std()),
        val_at_far_1e3=val3,
        far_at_1e3=far3,
        val_at_far_1e4=val4,
        far_at_1e4=far4,
        threshold=best_accuracy_threshold(scores, same),
        num_pairs=int(scores.size),
        num_folds=int(np.unique(folds).size),
    )


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-accept rates, true-accept rates) over every candidate threshold, FAR ascending."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    thresholds = candidate_thresholds(scores)[::-1]
    accepted = scores[None, :] > thresholds[:, None]
    tar = (accepted & same).sum(axis=1) / max(int(same.sum()), 1)
    far = (accepted & ~same).sum(axis=1) / max(int((~same).sum()), 1)
    return far, tar


def plot_roc(path: str | Path, scores: np.ndarray, same: np.ndarray, title: str = "LFW-style pairs") -> Path:
    """Write the ROC curve (log-scaled FAR) as a PNG, atomically; returns the path."""
    plt = pyplot()
    far, tar = roc_curve(scores, same)
    figure, axis = plt.subplots(figsize=(5, 4))
    floor = 1.0 / max(int((~np.asarray(same, dtype=bool)).sum()), 1)
    axis.plot(np.maximum(far, floor / 10), tar, lw=2)
    axis.set_xscale("log")
    axis.set_xlim(floor / 10, 1.0)
    axis.set_ylim(0.0, 1.01)
    for target in (1e-3, 1e-4):
        axis.axvline(target, color="grey", ls="--", lw=0.8)
    axis.set_xlabel("false accept rate (log)")
    axis.set_ylabel("validation rate (true accepts)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
