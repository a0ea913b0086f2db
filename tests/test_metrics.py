"""Tests for fusion.metrics: nuScenes-style detection metrics and BEV segmentation IoU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fusion.metrics import SegmentationMeter, detection_metrics

CLASSES = ["car", "pedestrian", "cyclist"]


def _box(x: float, y: float, yaw: float = 0.0, dims: tuple[float, float, float] = (4.0, 2.0, 1.5)) -> list[float]:
    return [x, y, 0.8, *dims, yaw]


def _gt(boxes: list[list[float]], labels: list[int]) -> dict[str, np.ndarray]:
    return {"boxes": np.array(boxes, dtype=np.float64).reshape(-1, 7), "labels": np.array(labels, dtype=np.int64)}


def _pred(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, np.ndarray]:
    out = _gt(boxes, labels)
    out["scores"] = np.array(scores, dtype=np.float64)
    return out


def _scene() -> list[dict[str, np.ndarray]]:
    """Three samples, three classes, boxes 10 m apart (farther than every threshold)."""
    return [
        _gt([_box(0, 0), _box(10, 0, 0.3), _box(20, 5, dims=(0.6, 0.6, 1.8))], [0, 0, 1]),
        _gt([_box(-10, 3, 1.0, dims=(1.8, 0.6, 1.5)), _box(5, -10)], [2, 0]),
        _gt([_box(0, 20, -2.0, dims=(0.6, 0.6, 1.8)), _box(15, 15, 2.5, dims=(1.8, 0.6, 1.5))], [1, 2]),
    ]


def _perfect(gts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [{**g, "scores": np.ones(len(g["labels"]))} for g in gts]


def _shifted(gts: list[dict[str, np.ndarray]], dx: float) -> list[dict[str, np.ndarray]]:
    preds = _perfect(gts)
    for p in preds:
        p["boxes"] = p["boxes"].copy()
        p["boxes"][:, 0] += dx
    return preds


def test_perfect_detections_score_one() -> None:
    gts = _scene()
    m = detection_metrics(_perfect(gts), gts, CLASSES)
    assert m["mAP"] == pytest.approx(1.0)
    assert m["NDS"] == pytest.approx(1.0)
    for key in ("mATE", "mASE", "mAOE"):
        assert m[key] == pytest.approx(0.0, abs=1e-12)
    for name in CLASSES:
        assert all(v == pytest.approx(1.0) for v in m["ap"][name].values())
        assert set(m["ap"][name]) == {0.5, 1.0, 2.0, 4.0}
    json.dumps(m)  # plain Python floats throughout
    assert isinstance(m["mAP"], float) and isinstance(m["class_ap"]["car"], float)


def test_three_metre_offset_only_matches_at_four_metres() -> None:
    gts = [_gt([_box(0, 0), _box(20, 0)], [0, 0]), _gt([_box(-20, 5)], [0])]
    m = detection_metrics(_shifted(gts, 3.0), gts, ["car"])
    assert m["ap"]["car"] == {0.5: 0.0, 1.0: 0.0, 2.0: 0.0, 4.0: pytest.approx(1.0)}
    assert m["mAP"] == pytest.approx(0.25)
    # TP errors use the 2 m matches, of which there are none: every error is 1.
    assert m["tp_errors"]["car"] == {"ATE": 1.0, "ASE": 1.0, "AOE": 1.0}
    assert m["NDS"] == pytest.approx(5 * 0.25 / 8)


def test_small_offset_gives_translation_error() -> None:
    gts = [_gt([_box(0, 0), _box(20, 0)], [0, 0])]
    m = detection_metrics(_shifted(gts, 0.3), gts, ["car"])
    assert m["ap"]["car"][0.5] == pytest.approx(1.0)
    assert m["mATE"] == pytest.approx(0.3)
    # Threshold is strict: a distance of exactly 0.5 m does not match at 0.5 m.
    m = detection_metrics(_shifted(gts, 0.5), gts, ["car"])
    assert m["ap"]["car"][0.5] == 0.0 and m["ap"]["car"][1.0] == pytest.approx(1.0)


def test_empty_predictions() -> None:
    gts = _scene()
    empty = [_pred([], [], []) for _ in gts]
    m = detection_metrics(empty, gts, CLASSES)
    assert m["mAP"] == 0.0
    assert m["mATE"] == m["mASE"] == m["mAOE"] == 1.0
    assert m["NDS"] == 0.0


def test_duplicates_lower_precision_but_beat_missing_half() -> None:
    gts = [_gt([_box(10.0 * i, 0) for i in range(4)], [0] * 4)]
    # Each GT predicted twice; the duplicate scores just below its original, so TP and FP interleave.
    boxes = [_box(10.0 * i, 0) for i in range(4) for _ in range(2)]
    scores = [s for i in range(4) for s in (1.0 - 0.1 * i, 0.95 - 0.1 * i)]
    dup = detection_metrics([_pred(boxes, [0] * 8, scores)], gts, ["car"])
    half = detection_metrics([_pred(boxes[:4:2], [0, 0], [1.0, 0.9])], gts, ["car"])
    dup_ap, half_ap = dup["class_ap"]["car"], half["class_ap"]["car"]
    assert 0.0 < dup_ap < 1.0
    # Half the GT missed: precision 1 up to recall 0.5, then 0 -> 40 levels (0.11..0.50) of 0.9, / 90 / 0.9.
    assert half_ap == pytest.approx(40 * 0.9 / 90 / 0.9)
    assert dup_ap > half_ap
    assert dup["mATE"] == pytest.approx(0.0)  # duplicates are false positives, not bad matches


def test_hand_computed_ap() -> None:
    # 2 GT; predictions in score order: TP, FP, TP.
    gts = [_gt([_box(0, 0), _box(20, 0)], [0, 0])]
    preds = [_pred([_box(0, 0), _box(-20, 0), _box(20, 0)], [0, 0, 0], [0.9, 0.8, 0.7])]
    # Raw curve (recall, precision): (0.5, 1), (0.5, 1/2), (1, 2/3). np.interp as the devkit:
    # levels 0.11..0.49 (39) read 1; level 0.50 reads 1/2 (the last point at recall 0.5);
    # levels 0.51..1.00 (50) lie on the line from 1/2 to 2/3: p = 1/2 + (r - 1/2) / 3.
    # Sum of (p - 0.1) = 39 * 0.9 + 0.4 + (50 * 0.4 + (1/3) * 12.75) = 59.75; AP = 59.75 / 90 / 0.9 = 239/324.
    expected = 239 / 324
    m = detection_metrics(preds, gts, ["car"])
    for threshold in (0.5, 1.0, 2.0, 4.0):
        assert m["ap"]["car"][threshold] == pytest.approx(expected, abs=1e-12)


def test_class_without_gt_is_excluded() -> None:
    gts = [_gt([_box(0, 0)], [0])]
    preds = [_pred([_box(0, 0), _box(5, 5)], [0, 1], [1.0, 0.9])]  # a pedestrian FP, but no pedestrian GT
    m = detection_metrics(preds, gts, ["car", "pedestrian"])
    assert math.isnan(m["class_ap"]["pedestrian"])
    assert all(math.isnan(v) for v in m["tp_errors"]["pedestrian"].values())
    assert m["mAP"] == pytest.approx(1.0)
    assert m["NDS"] == pytest.approx(1.0)


def test_orientation_error() -> None:
    gts = [_gt([_box(0, 0, yaw=0.4), _box(20, 0, yaw=-2.9)], [0, 0])]
    quarter = detection_metrics(_rotated(gts, math.pi / 2), gts, ["car"])
    assert quarter["mAOE"] == pytest.approx(math.pi / 2)
    full = detection_metrics(_rotated(gts, 2 * math.pi), gts, ["car"])
    assert full["mAOE"] == pytest.approx(0.0, abs=1e-9)
    # NDS caps each error at 1: AOE = pi/2 contributes 0.
    assert quarter["NDS"] == pytest.approx((5 + 1 + 1 + 0) / 8)


def _rotated(gts: list[dict[str, np.ndarray]], dyaw: float) -> list[dict[str, np.ndarray]]:
    preds = _perfect(gts)
    for p in preds:
        p["boxes"] = p["boxes"].copy()
        p["boxes"][:, 6] += dyaw
    return preds


def test_scale_error() -> None:
    gts = [_gt([_box(0, 0), _box(20, 0, dims=(0.6, 0.8, 1.8))], [0, 0])]
    preds = _perfect(gts)
    preds[0]["boxes"] = preds[0]["boxes"].copy()
    preds[0]["boxes"][:, 3:6] *= 2.0
    m = detection_metrics(preds, gts, ["car"])
    assert m["mASE"] == pytest.approx(1 - 1 / 8)
    assert m["mATE"] == pytest.approx(0.0)


def test_padding_and_top_k() -> None:
    gts = [_gt([_box(0, 0), _box(0, 0)], [0, -1])]  # the -1 row is padding
    preds = [_pred([_box(0, 0), _box(30, 0), _box(0, 0)], [0, 0, -1], [0.5, 0.9, 1.0])]
    assert detection_metrics(preds, gts, ["car"])["class_ap"]["car"] < 1.0  # FP at 30 m outranks the TP
    # Keep only the best box per sample: the FP. The TP is dropped -> AP 0.
    assert detection_metrics(preds, gts, ["car"], max_boxes_per_sample=1)["mAP"] == 0.0


def test_mismatched_sample_counts_raise() -> None:
    with pytest.raises(ValueError):
        detection_metrics([], _scene(), CLASSES)


# ---------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------


def test_segmentation_known_iou() -> None:
    meter = SegmentationMeter(["drivable", "lane"])
    probs = np.zeros((1, 2, 2, 2))
    targets = np.zeros((1, 2, 2, 2))
    probs[0, 0] = [[0.9, 0.8], [0.7, 0.1]]  # predicted: 3 cells (threshold 0.5)
    targets[0, 0] = [[1, 1], [0, 0]]  # true: 2 cells, both predicted -> intersection 2, union 3
    probs[0, 1] = [[0.6, 0.2], [0.2, 0.2]]
    targets[0, 1] = [[0, 1], [0, 0]]  # no overlap -> IoU 0
    meter.update(probs, targets)
    out = meter.compute()
    assert out["iou"] == {"drivable": pytest.approx(2 / 3), "lane": 0.0}
    assert out["mIoU"] == pytest.approx(1 / 3)


def test_segmentation_two_of_four_overlap() -> None:
    meter = SegmentationMeter(["road"])
    probs = np.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    targets = np.array([0, 1, 1, 0]).reshape(1, 1, 2, 2)
    meter.update(probs, targets)  # intersection 1, union 3
    assert meter.compute()["iou"]["road"] == pytest.approx(1 / 3)


def test_segmentation_accumulates_like_one_batch() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((4, 3, 8, 8))
    targets = (rng.random((4, 3, 8, 8)) > 0.6).astype(np.float32)
    split = SegmentationMeter(CLASSES)
    split.update(probs[:1], targets[:1])
    split.update(probs[1:], targets[1:])
    whole = SegmentationMeter(CLASSES)
    whole.update(probs, targets)
    assert split.compute() == whole.compute()
    # Accumulated IoU is total intersection over total union, not a mean of per-batch IoUs.
    pred, true = probs >= 0.5, targets > 0.5
    expected = (pred & true).sum(axis=(0, 2, 3)) / (pred | true).sum(axis=(0, 2, 3))
    assert [whole.compute()["iou"][c] for c in CLASSES] == pytest.approx(expected.tolist())


def test_segmentation_empty_class_excluded() -> None:
    meter = SegmentationMeter(["road", "crossing"])
    probs = np.zeros((2, 2, 3, 3))
    targets = np.zeros((2, 2, 3, 3))
    probs[:, 0, 0, 0] = 0.9
    targets[:, 0, 0, 0] = 1
    meter.update(probs, targets)
    out = meter.compute()
    assert math.isnan(out["iou"]["crossing"])
    assert out["mIoU"] == pytest.approx(1.0)
    meter.reset()
    assert math.isnan(meter.compute()["mIoU"])


def test_segmentation_accepts_tensor_like_and_checks_shape() -> None:
    class FakeTensor:  # mimics torch: .detach().cpu().numpy()
        def __init__(self, array: np.ndarray) -> None:
            self.array = array

        def detach(self) -> FakeTensor:
            return self

        def cpu(self) -> FakeTensor:
            return self

        def numpy(self) -> np.ndarray:
            return self.array

    meter = SegmentationMeter(["road"])
    meter.update(FakeTensor(np.ones((1, 1, 2, 2))), FakeTensor(np.ones((1, 1, 2, 2))))
    assert meter.compute()["iou"]["road"] == 1.0
    with pytest.raises(ValueError):
        meter.update(np.ones((1, 2, 2, 2)), np.ones((1, 2, 2, 2)))  # two classes, meter has one
