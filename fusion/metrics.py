"""Detection metrics (nuScenes-style mAP / NDS) and BEV map-segmentation IoU, in plain numpy.

Why nuScenes-style: a BEV detector's boxes are judged by where they stand on the ground, so a
prediction matches a ground-truth box of its class when their 2-D centre distance (x, y) is below a
threshold (0.5, 1, 2, 4 m), not by box IoU. AP is averaged over those thresholds and over classes
(mAP). The quality of the matches is measured separately by true-positive errors: translation (ATE),
scale (ASE) and orientation (AOE).

Why our NDS differs from nuScenes NDS: our synthetic data has no velocities and no attributes, so
AVE and AAE do not exist. Here NDS = (5 * mAP + sum over ATE, ASE, AOE of (1 - min(1, error))) / 8,
i.e. the nuScenes weighting (mAP counts as much as five TP metrics) over the three TP metrics we have.
It lies in [0, 1] like nuScenes NDS but is NOT numerically comparable with published nuScenes numbers.

Protocol choices (all written by us, no nuscenes-devkit):
- A match needs distance < threshold (strict, as in the devkit's `accumulate`).
- Precision is read at the 101 recall levels 0, 0.01, ..., 1 by linear interpolation of the raw
  precision/recall curve (np.interp), exactly as the devkit's `accumulate`; levels above the highest
  recall reached get precision 0.
- AP ignores recall <= 0.1 and precision <= 0.1, as the devkit's `calc_ap`.
- TP errors use the matches made at 2 m. A class's error is the cumulative mean error of the matches
  (in score order) read at each recall level in (0.1, max recall], then averaged over those levels, as in
  the devkit's `calc_tp` (we read the step curve where the devkit interpolates linearly). A class whose
  recall never exceeds 0.1 (e.g. no true positive at all) gets error 1.0.
- A class with no ground truth anywhere has AP and errors NaN and is left out of every mean (the devkit
  would count it as AP 0). If no class has ground truth, mAP and NDS are NaN.
- Segmentation is multi-label as in BEVFusion: each class is its own binary mask, predicted where
  prob >= threshold; IoU is accumulated over the whole split (sum of intersections / sum of unions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_DIST_THRESHOLDS",
    "SegmentationMeter",
    "center_distance",
    "detection_metrics",
    "orientation_error",
    "scale_error",
]

DEFAULT_DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TP_DIST_THRESHOLD = 2.0  # matches used for ATE / ASE / AOE, as in nuScenes
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
NUM_RECALL_LEVELS = 101  # recall levels 0, 0.01, ..., 1
TP_ERROR_NAMES = ("ATE", "ASE", "AOE")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors go through `.detach().cpu().numpy()`."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------------
# Box errors (vectorised over matching rows of two (N, 7) arrays [x, y, z, l, w, h, yaw])
# ---------------------------------------------------------------------------------------------------


def center_distance(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """2-D (x, y) distance between box centres, (N,)."""
    return np.hypot(pred[:, 0] - gt[:, 0], pred[:, 1] - gt[:, 1])


def scale_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """1 - IoU of the two boxes once centres and yaw are aligned (so only l, w, h matter), (N,)."""
    intersection = np.prod(np.minimum(pred[:, 3:6], gt[:, 3:6]), axis=1)
    union = np.prod(pred[:, 3:6], axis=1) + np.prod(gt[:, 3:6], axis=1) - intersection
    return 1.0 - intersection / union


def orientation_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Smallest absolute yaw difference, wrapped into [0, pi], (N,)."""
    diff = pred[:, 6] - gt[:, 6]
    return np.abs((diff + np.pi) % (2.0 * np.pi) - np.pi)


# ---------------------------------------------------------------------------------------------------
# Input cleaning
# ---------------------------------------------------------------------------------------------------


def _clean_sample(sample: Mapping[str, Any], with_scores: bool) -> dict[str, np.ndarray]:
    """Numpy arrays of one sample, with rows whose label is < 0 (padding) dropped."""
    boxes = _to_numpy(sample["boxes"]).astype(np.float64).reshape(-1, 7)
    labels = _to_numpy(sample["labels"]).astype(np.int64).reshape(-1)
    keep = labels >= 0
    out = {"boxes": boxes[keep], "labels": labels[keep]}
    if with_scores:
        out["scores"] = _to_numpy(sample["scores"]).astype(np.float64).reshape(-1)[keep]
    return out


def _top_k(sample: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The k highest-scoring predictions of a sample (stable: ties keep their input order)."""
    order = np.argsort(-sample["scores"], kind="stable")[:k]
    return {key: value[order] for key, value in sample.items()}


# ---------------------------------------------------------------------------------------------------
# One class: pool predictions over samples, match greedily, build the precision curve
# ---------------------------------------------------------------------------------------------------


@dataclass
class _ClassDetections:
    """All predictions of one class (sorted by score, descending) and its ground truth, pooled over samples."""

    boxes: np.ndarray  # (N, 7) predictions in score order
    gt_boxes: np.ndarray  # (M, 7) ground truth of every sample, concatenated
    candidates: list[np.ndarray]  # per prediction: indices into gt_boxes of the GT in its sample
    distances: list[np.ndarray]  # per prediction: centre distance to each of those candidates

    @property
    def num_gt(self) -> int:
        return len(self.gt_boxes)


def _collect_class(
    predictions: list[dict[str, np.ndarray]], ground_truths: list[dict[str, np.ndarray]], label: int
) -> _ClassDetections:
    """Gather one class's predictions and ground truth from every sample."""
    scores, boxes, gt_boxes = [np.zeros(0)], [np.zeros((0, 7))], [np.zeros((0, 7))]
    candidates: list[np.ndarray] = []
    distances: list[np.ndarray] = []
    num_gt = 0
    for pred, gt in zip(predictions, ground_truths, strict=True):
        sample_gt = gt["boxes"][gt["labels"] == label]
        sample_pred = pred["boxes"][pred["labels"] == label]
        gt_index = np.arange(num_gt, num_gt + len(sample_gt))
        num_gt += len(sample_gt)
        gt_boxes.append(sample_gt)
        # (K, G) centre distances between this sample's predictions and ground truth.
        dist = np.hypot(
            sample_pred[:, None, 0] - sample_gt[None, :, 0], sample_pred[:, None, 1] - sample_gt[None, :, 1]
        )
        scores.append(pred["scores"][pred["labels"] == label])
        boxes.append(sample_pred)
        candidates.extend([gt_index] * len(sample_pred))
        distances.extend(list(dist))
    order = np.argsort(-np.concatenate(scores), kind="stable")
    return _ClassDetections(
        boxes=np.concatenate(boxes)[order],
        gt_boxes=np.concatenate(gt_boxes),
        candidates=[candidates[i] for i in order],
        distances=[distances[i] for i in order],
    )


def _greedy_match(det: _ClassDetections, threshold: float) -> np.ndarray:
    """For each prediction in score order, the index of the GT it matches, or -1 for a false positive.

    Each prediction takes the nearest still-unmatched GT of its sample if that distance is < threshold.
    """
    matched = np.full(len(det.boxes), -1, dtype=np.int64)
    taken = np.zeros(det.num_gt, dtype=bool)
    for i, (candidates, distances) in enumerate(zip(det.candidates, det.distances, strict=True)):
        if candidates.size == 0:
            continue
        free_distances = np.where(taken[candidates], np.inf, distances)
        nearest = int(np.argmin(free_distances))
        if free_distances[nearest] < threshold:
            matched[i] = candidates[nearest]
            taken[candidates[nearest]] = True
    return matched


def _tp_needed_per_recall_level(num_gt: int) -> np.ndarray:
    """Number of true positives needed to reach each recall level k/100: ceil(k * num_gt / 100), (101,).

    Integer arithmetic, so recall levels are compared exactly (no floating-point ties).
    """
    levels = np.arange(NUM_RECALL_LEVELS, dtype=np.int64)
    return -(-levels * num_gt // (NUM_RECALL_LEVELS - 1))


def _interpolated_precision(is_tp: np.ndarray, num_gt: int) -> np.ndarray:
    """Precision at the 101 recall levels exactly as the devkit's `accumulate`: np.interp of the raw curve.

    Below the first recall reached it reads the first precision; above the highest recall it is 0.
    """
    if is_tp.size == 0:
        return np.zeros(NUM_RECALL_LEVELS)
    tp_cum = np.cumsum(is_tp)
    precision = tp_cum / np.arange(1, len(is_tp) + 1)
    recall = tp_cum / num_gt
    return np.interp(np.linspace(0.0, 1.0, NUM_RECALL_LEVELS), recall, precision, right=0.0)


def _average_precision(precision: np.ndarray) -> float:
    """nuScenes `calc_ap`: mean precision over recall > MIN_RECALL, above MIN_PRECISION, rescaled to [0, 1]."""
    prec = precision[round(100 * MIN_RECALL) + 1 :] - MIN_PRECISION
    prec[prec < 0] = 0.0
    return float(np.mean(prec)) / (1.0 - MIN_PRECISION)


def _error_over_recall(errors: np.ndarray, num_gt: int) -> float:
    """nuScenes `calc_tp`: cumulative mean of TP errors read at recall levels in (MIN_RECALL, max recall].

    `errors` are those of the true positives in score order. 1.0 if no such recall level is reached.
    """
    needed = _tp_needed_per_recall_level(num_gt)[round(100 * MIN_RECALL) + 1 :]
    needed = needed[needed <= len(errors)]
    if needed.size == 0:
        return 1.0
    cumulative_mean = np.cumsum(errors) / np.arange(1, len(errors) + 1)
    return float(np.mean(cumulative_mean[needed - 1]))


def _tp_errors(det: _ClassDetections, matched: np.ndarray) -> dict[str, float]:
    """ATE, ASE, AOE of one class from its matches (see `_error_over_recall`)."""
    is_tp = matched >= 0
    pred, gt = det.boxes[is_tp], det.gt_boxes[matched[is_tp]]
    return {
        "ATE": _error_over_recall(center_distance(pred, gt), det.num_gt),
        "ASE": _error_over_recall(scale_error(pred, gt), det.num_gt),
        "AOE": _error_over_recall(orientation_error(pred, gt), det.num_gt),
    }


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# ---------------------------------------------------------------------------------------------------
# Public entry point for detection
# ---------------------------------------------------------------------------------------------------


def detection_metrics(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    dist_thresholds: Sequence[float] = DEFAULT_DIST_THRESHOLDS,
    max_boxes_per_sample: int = 500,
) -> dict[str, Any]:
    """nuScenes-style detection metrics over a split (see the module docstring for the protocol).

    predictions: one dict per sample with `boxes` (K, 7) [x, y, z, l, w, h, yaw], `scores` (K,), `labels` (K,).
    ground_truths: one dict per sample (same order) with `boxes` (G, 7) and `labels` (G,).
    Rows with label < 0 are ignored; only the `max_boxes_per_sample` best-scoring predictions of a sample count.
    A match needs centre distance strictly below the threshold. Classes without any GT get NaN and are
    excluded from mAP, mATE, mASE, mAOE and NDS. NDS = (5 mAP + sum(1 - min(1, mTP error))) / 8 over
    ATE, ASE, AOE only: not comparable with nuScenes NDS (no velocity, no attributes).

    Returns `mAP`, `NDS`, `mATE`, `mASE`, `mAOE` (floats), `ap` (class -> threshold -> AP),
    `class_ap` (class -> AP averaged over thresholds) and `tp_errors` (class -> {ATE, ASE, AOE}).
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} prediction samples but {len(ground_truths)} ground-truth samples")
    preds = [_top_k(_clean_sample(p, with_scores=True), max_boxes_per_sample) for p in predictions]
    gts = [_clean_sample(g, with_scores=False) for g in ground_truths]
    thresholds = [float(t) for t in dist_thresholds]

    ap: dict[str, dict[float, float]] = {}
    class_ap: dict[str, float] = {}
    tp_errors: dict[str, dict[str, float]] = {}
    for label, name in enumerate(class_names):
        det = _collect_class(preds, gts, label)
        if det.num_gt == 0:
            ap[name] = {t: math.nan for t in thresholds}
            class_ap[name] = math.nan
            tp_errors[name] = {key: math.nan for key in TP_ERROR_NAMES}
            continue
        ap[name] = {
            t: _average_precision(_interpolated_precision(_greedy_match(det, t) >= 0, det.num_gt)) for t in thresholds
        }
        class_ap[name] = _mean_or_nan(list(ap[name].values()))
        tp_errors[name] = _tp_errors(det, _greedy_match(det, TP_DIST_THRESHOLD))

    evaluated = [name for name in class_names if not math.isnan(class_ap[name])]
    mean_ap = _mean_or_nan([class_ap[name] for name in evaluated])
    mean_errors = {key: _mean_or_nan([tp_errors[name][key] for name in evaluated]) for key in TP_ERROR_NAMES}
    tp_scores = sum(1.0 - min(1.0, error) for error in mean_errors.values())
    nds = (5.0 * mean_ap + tp_scores) / (5.0 + len(TP_ERROR_NAMES))
    return {
        "mAP": mean_ap,
        "NDS": float(nds),
        "mATE": mean_errors["ATE"],
        "mASE": mean_errors["ASE"],
        "mAOE": mean_errors["AOE"],
        "ap": ap,
        "class_ap": class_ap,
        "tp_errors": tp_errors,
    }


# ---------------------------------------------------------------------------------------------------
# BEV map segmentation
# ---------------------------------------------------------------------------------------------------


class SegmentationMeter:
    """Accumulates per-class intersection and union of multi-label BEV masks over a split.

    Each class is an independent binary mask (as in BEVFusion): a cell is predicted positive where
    prob >= threshold. IoU = total intersection / total union over all updates; a class whose union is 0
    everywhere gets NaN and is left out of mIoU.
    """

    def __init__(self, class_names: Sequence[str], threshold: float = 0.5) -> None:
        self.class_names = list(class_names)
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.intersection = np.zeros(len(self.class_names), dtype=np.int64)
        self.union = np.zeros(len(self.class_names), dtype=np.int64)

    def update(self, probs: Any, targets: Any) -> None:
        """Add a batch: `probs` in [0, 1] and `targets` in {0, 1}, both (B, C, H, W), numpy or torch."""
        probs, targets = _to_numpy(probs), _to_numpy(targets)
        if probs.shape != targets.shape or probs.ndim != 4 or probs.shape[1] != len(self.class_names):
            raise ValueError(
                f"expected probs and targets of shape (B, {len(self.class_names)}, H, W), "
                f"got {probs.shape} and {targets.shape}"
            )
        pred = probs >= self.threshold
        true = targets > 0.5
        self.intersection += np.sum(pred & true, axis=(0, 2, 3))
        self.union += np.sum(pred | true, axis=(0, 2, 3))

    def compute(self) -> dict[str, Any]:
        """`iou` (class -> IoU, NaN where union is 0) and `mIoU` (mean over the other classes)."""
        iou = {
            name: float(inter / union) if union > 0 else math.nan
            for name, inter, union in zip(self.class_names, self.intersection, self.union, strict=True)
        }
        return {"iou": iou, "mIoU": _mean_or_nan([v for v in iou.values() if not math.isnan(v)])}
