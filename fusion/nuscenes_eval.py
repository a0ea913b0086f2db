"""The nuScenes detection metric (mAP, TP errors, NDS) with the detection-challenge settings, without the devkit.

`results_json` turns per-sample LiDAR-frame detections into the official results format (global frame, size in
w-l-h order, rotation as a quaternion w-x-y-z, at most 500 boxes per sample). `evaluate_results` scores such a
results dict against the sample_annotation table following the devkit's DetectionEval step by step (same range,
point and bike-rack filters, same greedy matching order, same 101-point interpolation), so that both give the
same figures; a test checks that to 1e-6 where the devkit is installed. `devkit_evaluate` runs the devkit itself
on a results file where the `nuscenes` extra is installed, for a side-by-side report.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fusion.data.nuscenes_tables import (
    ATTRIBUTE_NAMES,
    CLASS_ATTRIBUTES,
    DEFAULT_ATTRIBUTE,
    DETECTION_CLASSES,
    NuScenesFormatError,
    NuScenesTables,
    matrix_to_quaternion,
    quaternion_to_matrix,
    split_scenes,
    yaw_of_quaternion,
)

# The devkit's detection_cvpr_2019 configuration (eval/detection/configs/detection_cvpr_2019.json).
CLASS_RANGE = {
    "car": 50.0,
    "truck": 50.0,
    "bus": 50.0,
    "trailer": 50.0,
    "construction_vehicle": 50.0,
    "pedestrian": 40.0,
    "motorcycle": 40.0,
    "bicycle": 40.0,
    "traffic_cone": 30.0,
    "barrier": 30.0,
}
DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
DIST_TH_TP = 2.0
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
MAX_BOXES_PER_SAMPLE = 500
MEAN_AP_WEIGHT = 5
TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
TP_SUMMARY_NAMES = {
    "trans_err": "mATE",
    "scale_err": "mASE",
    "orient_err": "mAOE",
    "vel_err": "mAVE",
    "attr_err": "mAAE",
}
# TP errors the challenge does not score for a class (orientation of a cone, velocity/attribute of static objects).
_UNSCORED = {"traffic_cone": ("attr_err", "vel_err", "orient_err"), "barrier": ("attr_err", "vel_err")}
_NELEM = 101  # recall points of the interpolated precision-recall curve


# ----------------------------------------------------------------------------------------------- results format


def default_meta(use_camera: bool = True, use_lidar: bool = True) -> dict:
    """The `meta` block of a results file: which inputs the detector used."""
    return {
        "use_camera": use_camera,
        "use_lidar": use_lidar,
        "use_radar": False,
        "use_map": False,
        "use_external": False,
    }


def results_json(
    detections: Iterable[Mapping],
    meta: Mapping,
    class_names: Sequence[str] = DETECTION_CLASSES,
    max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
) -> dict:
    """The official results dict {"meta": ..., "results": {sample_token: [box, ...]}} from LiDAR-frame detections.

    Each detection mapping holds `sample_token`, `lidar_to_global` (4x4), `boxes` (K, 7: x, y, z_centre, l, w, h,
    yaw in the LiDAR frame), `scores` (K,), `labels` (K, indices into class_names), optional `velocities` (K, 2,
    LiDAR frame; zeros if absent) and optional `attributes` (K names; the class default where empty or not one
    of the class's attributes). Only the highest-scoring max_boxes_per_sample boxes of a sample are kept.
    """
    unknown = [name for name in class_names if name not in DETECTION_CLASSES]
    if unknown:
        raise ValueError(f"class names {unknown} are not nuScenes detection classes {list(DETECTION_CLASSES)}")
    results: dict[str, list[dict]] = {}
    for detection in detections:
        token = str(detection["sample_token"])
        if token in results:
            raise ValueError(f"detections for sample {token!r} given twice")
        results[token] = _sample_results(token, detection, class_names, max_boxes_per_sample)
    return {"meta": dict(meta), "results": results}


def _sample_results(token: str, detection: Mapping, class_names: Sequence[str], limit: int) -> list[dict]:
    boxes = np.asarray(detection["boxes"], dtype=np.float64).reshape(-1, 7)
    scores = np.asarray(detection["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(detection["labels"]).reshape(-1).astype(np.int64)
    count = len(boxes)
    velocities = detection.get("velocities")
    velocities = np.zeros((count, 2)) if velocities is None else np.asarray(velocities, dtype=np.float64).reshape(-1, 2)
    attributes = detection.get("attributes")
    attributes = [""] * count if attributes is None else [str(a or "") for a in attributes]
    if not (len(scores) == len(labels) == len(velocities) == len(attributes) == count):
        raise ValueError(f"sample {token!r}: boxes, scores, labels, velocities and attributes differ in length")
    if count and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"sample {token!r}: labels must index the {len(class_names)} class names")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all() and np.isfinite(velocities).all()):
        raise ValueError(f"sample {token!r}: boxes, scores and velocities must be finite")
    if count and (boxes[:, 3:6] <= 0).any():
        raise ValueError(f"sample {token!r}: box sizes must be positive")
    bad = sorted({a for a in attributes if a and a not in ATTRIBUTE_NAMES})
    if bad:
        raise ValueError(f"sample {token!r}: unknown attribute names {bad}")
    lidar_to_global = np.asarray(detection["lidar_to_global"], dtype=np.float64)
    rotation, translation = lidar_to_global[:3, :3], lidar_to_global[:3, 3]
    keep = np.argsort(-scores, kind="stable")[:limit]
    out = []
    for i in keep:
        x, y, z, length, width, height, yaw = boxes[i]
        name = class_names[labels[i]]
        centre = rotation @ (x, y, z) + translation
        c, s = math.cos(yaw), math.sin(yaw)
        box_rotation = rotation @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        velocity = rotation @ (velocities[i, 0], velocities[i, 1], 0.0)
        attribute = attributes[i] if attributes[i] in CLASS_ATTRIBUTES[name] else DEFAULT_ATTRIBUTE[name]
        out.append(
            {
                "sample_token": token,
                "translation": [float(v) for v in centre],
                "size": [float(width), float(length), float(height)],  # the devkit's w, l, h order
                "rotation": [float(v) for v in matrix_to_quaternion(box_rotation)],
                "velocity": [float(velocity[0]), float(velocity[1])],
                "detection_name": name,
                "detection_score": float(scores[i]),
                "attribute_name": attribute,
            }
        )
    return out


def write_results(path: str | os.PathLike, results: Mapping) -> Path:
    """Write a results dict as JSON, atomically (a reader never sees half a file)."""
    from common.io import atomic_write_text

    atomic_write_text(path, json.dumps(results))
    return Path(path)


def load_results(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NuScenesFormatError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NuScenesFormatError(f"unreadable results file {path}: {error}") from None
    return data


# ----------------------------------------------------------------------------------------------- boxes


class _Boxes:
    """The boxes of one class in one sample, as arrays (global frame)."""

    __slots__ = ("xy", "size", "yaw", "velocity", "attribute", "score")

    def __init__(self, records: list[dict], gt: bool):
        self.xy = np.array([r["translation"][:2] for r in records], dtype=np.float64).reshape(-1, 2)
        self.size = np.array([r["size"] for r in records], dtype=np.float64).reshape(-1, 3)
        self.yaw = np.array([yaw_of_quaternion(r["rotation"]) for r in records], dtype=np.float64)
        self.velocity = np.array([r["velocity"] for r in records], dtype=np.float64).reshape(-1, 2)
        self.attribute = [r["attribute_name"] for r in records]
        self.score = None if gt else np.array([r["detection_score"] for r in records], dtype=np.float64)


def _check_prediction(token: str, number: int, box) -> dict:
    """A results box, checked as the devkit's DetectionBox checks it; errors name the sample token."""
    where = f"results[{token!r}][{number}]"
    if not isinstance(box, Mapping):
        raise NuScenesFormatError(f"{where} is not a box object")
    try:
        record = {
            "translation": [float(v) for v in box["translation"]],
            "size": [float(v) for v in box["size"]],
            "rotation": [float(v) for v in box["rotation"]],
            "velocity": [float(v) for v in box["velocity"]],
            "detection_name": box["detection_name"],
            "detection_score": box.get("detection_score", -1.0),
            "attribute_name": box["attribute_name"],
            "num_pts": int(box.get("num_pts", -1)),
        }
    except KeyError as missing:
        raise NuScenesFormatError(f"{where} has no field {missing}") from None
    except (TypeError, ValueError) as error:
        raise NuScenesFormatError(f"{where}: {error}") from None
    if box.get("sample_token") != token:  # the devkit matches a box by this field, so it must agree with the key
        raise NuScenesFormatError(f"{where}: sample_token {box.get('sample_token')!r} differs from its key")
    lengths = {"translation": 3, "size": 3, "rotation": 4, "velocity": 2}
    for key, length in lengths.items():
        if len(record[key]) != length:
            raise NuScenesFormatError(f"{where}: {key} must have {length} elements")
    for key in ("translation", "size", "rotation"):
        if not np.isfinite(record[key]).all():
            raise NuScenesFormatError(f"{where}: {key} may not be NaN or infinite")
    if min(record["size"]) <= 0:
        raise NuScenesFormatError(f"{where}: size must be > 0")
    if record["detection_name"] not in DETECTION_CLASSES:
        raise NuScenesFormatError(f"{where}: unknown detection_name {record['detection_name']!r}")
    if record["attribute_name"] != "" and record["attribute_name"] not in ATTRIBUTE_NAMES:
        raise NuScenesFormatError(f"{where}: unknown attribute_name {record['attribute_name']!r}")
    score = record["detection_score"]
    if not isinstance(score, float) or math.isnan(score):
        raise NuScenesFormatError(f"{where}: detection_score must be a float, not {score!r}")
    return record


def _in_box(point: np.ndarray, record: dict) -> bool:
    """Whether a point lies in an annotation box, faces included (the devkit's points_in_box)."""
    width, length, height = record["size"]
    local = quaternion_to_matrix(record["rotation"]).T @ (point - np.asarray(record["translation"], dtype=np.float64))
    return bool(abs(local[0]) <= length / 2 and abs(local[1]) <= width / 2 and abs(local[2]) <= height / 2)


def _filter(records: list[dict], ego_xy: np.ndarray, racks: list[dict]) -> list[dict]:
    """The devkit's filter_eval_boxes: class range (ego distance in xy), boxes with no points, bikes in a rack."""
    kept = []
    for record in records:
        name = record["detection_name"]
        dx, dy = record["translation"][0] - ego_xy[0], record["translation"][1] - ego_xy[1]
        if math.sqrt(dx * dx + dy * dy) >= CLASS_RANGE[name] or record["num_pts"] == 0:
            continue
        if name in ("bicycle", "motorcycle") and any(
            _in_box(np.asarray(record["translation"]), rack) for rack in racks
        ):
            continue
        kept.append(record)
    return kept


def _ground_truth(tables: NuScenesTables, token: str) -> tuple[list[dict], list[dict]]:
    """Detection-class annotation records of a sample (global frame) and its bicycle racks."""
    boxes, racks = [], []
    for annotation in tables.sample_annotations(token):
        category = tables.category_name(annotation)
        if category == "static_object.bicycle_rack":
            racks.append(annotation)
        name = tables.detection_class(annotation)
        if name is None:
            continue
        attributes = tables.attribute_names(annotation)
        if len(attributes) > 1:
            raise NuScenesFormatError(f"sample_annotation {annotation['token']!r} has more than one attribute")
        boxes.append(
            {
                "translation": [float(v) for v in annotation["translation"]],
                "size": [float(v) for v in annotation["size"]],
                "rotation": [float(v) for v in annotation["rotation"]],
                "velocity": tables.box_velocity(annotation)[:2],
                "detection_name": name,
                "attribute_name": attributes[0] if attributes else "",
                "num_pts": int(annotation["num_lidar_pts"]) + int(annotation["num_radar_pts"]),
            }
        )
    return boxes, racks


# ----------------------------------------------------------------------------------------------- metric


def _angle_diff(gt_yaw: np.ndarray | float, yaw: float, period: float) -> np.ndarray:
    diff = (gt_yaw - yaw + period / 2) % period - period / 2
    return np.abs(np.where(diff > np.pi, diff - 2 * np.pi, diff))


def _cummean(values: np.ndarray) -> np.ndarray:
    """Running mean that skips NaN; all NaN gives ones (the devkit's cummean)."""
    if np.isnan(values).all():
        return np.ones(len(values))
    sums = np.nancumsum(values)
    counts = np.cumsum(~np.isnan(values))
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts != 0)


def _no_predictions() -> dict[str, np.ndarray]:
    curve = {"precision": np.zeros(_NELEM), "confidence": np.zeros(_NELEM)}
    curve.update({metric: np.ones(_NELEM) for metric in TP_METRICS})
    return curve


def _accumulate(gt: dict[str, _Boxes], pred: list[tuple[str, _Boxes]], name: str, threshold: float) -> dict:
    """Precision and TP-error curves of one class at one distance threshold (the devkit's accumulate)."""
    npos = sum(len(boxes.xy) for boxes in gt.values())
    if npos == 0:
        return _no_predictions()
    # Predictions in results order, then sorted by (score, position) descending, as the devkit sorts them.
    tokens = [token for token, boxes in pred for _ in range(len(boxes.xy))]
    local = [i for _, boxes in pred for i in range(len(boxes.xy))]
    owners = [boxes for _, boxes in pred for _ in range(len(boxes.xy))]
    scores = np.array([boxes.score[i] for boxes, i in zip(owners, local, strict=True)], dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), scores))[::-1]
    taken = {token: np.zeros(len(boxes.xy), dtype=bool) for token, boxes in gt.items()}
    period = np.pi if name == "barrier" else 2 * np.pi
    is_tp = np.zeros(len(order), dtype=bool)
    errors: dict[str, list[float]] = {metric: [] for metric in TP_METRICS}
    match_conf: list[float] = []
    for rank, index in enumerate(order):
        token, box, i = tokens[index], owners[index], local[index]
        truth = gt.get(token)
        if truth is None or not len(truth.xy):
            continue
        delta = truth.xy - box.xy[i]
        distance = np.sqrt(delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1])
        distance[taken[token]] = np.inf
        match = int(np.argmin(distance))
        if not distance[match] < threshold:
            continue
        taken[token][match] = True
        is_tp[rank] = True
        match_conf.append(box.score[i])
        errors["trans_err"].append(float(distance[match]))
        errors["vel_err"].append(float(np.linalg.norm(box.velocity[i] - truth.velocity[match])))
        intersection = np.prod(np.minimum(truth.size[match], box.size[i]))
        union = np.prod(truth.size[match]) + np.prod(box.size[i]) - intersection
        errors["scale_err"].append(1.0 - intersection / union)
        errors["orient_err"].append(float(_angle_diff(truth.yaw[match], box.yaw[i], period)))
        gt_attribute = truth.attribute[match]
        errors["attr_err"].append(np.nan if gt_attribute == "" else 1.0 - float(gt_attribute == box.attribute[i]))
    if not match_conf:
        return _no_predictions()
    tp = np.cumsum(is_tp).astype(float)
    fp = np.cumsum(~is_tp).astype(float)
    recall = tp / float(npos)
    recall_points = np.linspace(0, 1, _NELEM)
    curve = {
        "precision": np.interp(recall_points, recall, tp / (fp + tp), right=0),
        "confidence": np.interp(recall_points, recall, scores[order], right=0),
    }
    match_conf_reversed = np.array(match_conf)[::-1]
    for metric in TP_METRICS:
        running = _cummean(np.array(errors[metric], dtype=np.float64))
        curve[metric] = np.interp(curve["confidence"][::-1], match_conf_reversed, running[::-1])[::-1]
    return curve


def _average_precision(curve: dict) -> float:
    precision = curve["precision"][round(100 * MIN_RECALL) + 1 :] - MIN_PRECISION
    precision[precision < 0] = 0
    return float(np.mean(precision)) / (1.0 - MIN_PRECISION)


def _tp_error(curve: dict, metric: str) -> float:
    first = round(100 * MIN_RECALL) + 1
    nonzero = np.nonzero(curve["confidence"])[0]
    last = nonzero[-1] if len(nonzero) else 0
    return 1.0 if last < first else float(np.mean(curve[metric][first : last + 1]))


def evaluate_results(results: Mapping, tables: NuScenesTables, split: str) -> dict:
    """mAP, per-class AP, TP errors and NDS of a results dict on an official split, as the devkit computes them.

    The results must hold exactly the split's samples (those of the split's scenes present in the root).
    """
    if not isinstance(results, Mapping) or not isinstance(results.get("results"), Mapping):
        raise NuScenesFormatError("results: no 'results' object (the official format is {'meta': ..., 'results': ...})")
    if not isinstance(results.get("meta"), Mapping):
        raise NuScenesFormatError("results: no 'meta' object")
    split_scenes(tables.version, split)  # an unknown split or one of another version is an error
    tokens = tables.split_sample_tokens(split)
    if not tokens:
        raise NuScenesFormatError(f"no scene of split {split!r} in {tables.table_path('scene')}")
    if split == "test" and not tables.tables["sample_annotation"]:
        raise NuScenesFormatError("the test split has no annotations to evaluate against")
    expected, given = set(tokens), set(results["results"])
    missing, extra = [t for t in tokens if t not in given], sorted(given - expected)
    if missing:
        raise NuScenesFormatError(
            f"results miss {len(missing)} sample(s) of split {split!r}, e.g. sample {missing[0]!r}"
        )
    if extra:
        raise NuScenesFormatError(f"results hold {len(extra)} sample(s) outside split {split!r}, e.g. {extra[0]!r}")

    gt_by_class: dict[str, dict[str, _Boxes]] = {name: {} for name in DETECTION_CLASSES}
    pred_by_class: dict[str, list[tuple[str, _Boxes]]] = {name: [] for name in DETECTION_CLASSES}
    gt_counts = dict.fromkeys(DETECTION_CLASSES, 0)
    pred_counts = dict.fromkeys(DETECTION_CLASSES, 0)
    ego_xy = {
        t: np.asarray(
            tables.get("ego_pose", tables.key_frame(t, "LIDAR_TOP")["ego_pose_token"])["translation"][:2],
            dtype=np.float64,
        )
        for t in tokens
    }
    racks_of: dict[str, list[dict]] = {}
    for token in tokens:
        boxes, racks_of[token] = _ground_truth(tables, token)
        kept = _filter(boxes, ego_xy[token], racks_of[token])
        for name in DETECTION_CLASSES:
            of_class = [r for r in kept if r["detection_name"] == name]
            gt_by_class[name][token] = _Boxes(of_class, gt=True)
            gt_counts[name] += len(of_class)
    for token, boxes in results["results"].items():  # results order: the devkit breaks score ties by it
        if not isinstance(boxes, list):
            raise NuScenesFormatError(f"results[{token!r}] is not a list of boxes")
        if len(boxes) > MAX_BOXES_PER_SAMPLE:
            raise NuScenesFormatError(
                f"results[{token!r}] holds {len(boxes)} boxes; at most {MAX_BOXES_PER_SAMPLE} allowed"
            )
        records = [_check_prediction(token, number, box) for number, box in enumerate(boxes)]
        kept = _filter(records, ego_xy[token], racks_of[token])
        for name in DETECTION_CLASSES:
            of_class = [r for r in kept if r["detection_name"] == name]
            if of_class:
                pred_by_class[name].append((token, _Boxes(of_class, gt=False)))
                pred_counts[name] += len(of_class)

    class_ap_by_distance: dict[str, dict[float, float]] = {}
    class_tp_errors: dict[str, dict[str, float]] = {}
    for name in DETECTION_CLASSES:
        curves = {th: _accumulate(gt_by_class[name], pred_by_class[name], name, th) for th in DIST_THRESHOLDS}
        class_ap_by_distance[name] = {th: _average_precision(curves[th]) for th in DIST_THRESHOLDS}
        class_tp_errors[name] = {
            metric: np.nan if metric in _UNSCORED.get(name, ()) else _tp_error(curves[DIST_TH_TP], metric)
            for metric in TP_METRICS
        }
    class_ap = {name: float(np.mean(list(aps.values()))) for name, aps in class_ap_by_distance.items()}
    mean_ap = float(np.mean(list(class_ap.values())))
    tp_errors = {m: float(np.nanmean([class_tp_errors[c][m] for c in DETECTION_CLASSES])) for m in TP_METRICS}
    tp_scores = {m: max(0.0, 1.0 - tp_errors[m]) for m in TP_METRICS}
    nds = (MEAN_AP_WEIGHT * mean_ap + float(np.sum(list(tp_scores.values())))) / (MEAN_AP_WEIGHT + len(TP_METRICS))
    summary = {"mAP": mean_ap, **{TP_SUMMARY_NAMES[m]: tp_errors[m] for m in TP_METRICS}, "NDS": nds}
    return {
        **summary,
        "class_ap": class_ap,
        "class_ap_by_distance": class_ap_by_distance,
        "class_tp_errors": class_tp_errors,
        "tp_errors": tp_errors,
        "num_samples": len(tokens),
        "num_gt": gt_counts,
        "num_pred": pred_counts,
    }


# ----------------------------------------------------------------------------------------------- devkit referee


def devkit_status() -> str | None:
    """None where the devkit's DetectionEval can run here; otherwise why not (for the report)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from nuscenes.eval.detection.evaluate import DetectionEval  # noqa: F401
    except Exception as error:  # ImportError, or a devkit that breaks on import
        return (
            f"nuscenes-devkit not usable ({type(error).__name__}: {error}); install it with "
            "`pip install -e '.[nuscenes]' && pip install --no-deps nuscenes-devkit==1.2.0`"
        )
    return None


def devkit_cannot_score(results: dict) -> str | None:
    """Why the devkit cannot score this results file although it is installed, or None. Its loader reads the
    box type from the first box it finds, so a file with no box at all (a model that detects nothing: barely
    trained, or pruned hard before fine-tuning) fails inside the devkit; our metric scores it (mAP 0)."""
    if not any(results.get("results", {}).values()):
        return "the results hold no boxes (the model detected nothing); the devkit cannot read such a file"
    return None


def devkit_evaluate(
    results_path: str | os.PathLike, dataroot: str | os.PathLike, version: str, split: str, out_dir: str | os.PathLike
) -> dict | None:
    """The devkit's own DetectionEval (detection_cvpr_2019) on a results file, in our summary's keys; None where
    the devkit is not installed (devkit_status() says why). Its metrics_summary.json lands in out_dir."""
    if devkit_status() is not None:
        return None
    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log = io.StringIO()  # the devkit prints its tables and a progress bar; the caller reports the figures
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
        evaluation = DetectionEval(
            nusc, config_factory("detection_cvpr_2019"), str(results_path), split, str(out_dir), verbose=False
        )
        summary = evaluation.main(plot_examples=0, render_curves=False)
    summary = json.loads(json.dumps(summary))  # plain JSON types (distance keys become strings)
    tp_errors = summary["tp_errors"]
    return {
        "mAP": summary["mean_ap"],
        **{TP_SUMMARY_NAMES[m]: tp_errors[m] for m in TP_METRICS},
        "NDS": summary["nd_score"],
        "class_ap": summary["mean_dist_aps"],
        "class_tp_errors": summary["label_tp_errors"],
        "tp_errors": tp_errors,
        "summary": summary,
    }
