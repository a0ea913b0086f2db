"""nuScenes tables and the official detection metric, checked against the devkit's DetectionEval where installed.

Roots are written here with write_tables (tables only: the evaluation needs no images or point clouds), in the
scene names of the official mini splits so that the devkit accepts them.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from fusion.data.nuscenes_tables import (
    ATTRIBUTE_NAMES,
    DETECTION_CLASSES,
    NuScenesFormatError,
    category_to_detection_class,
    load_tables,
    matrix_to_quaternion,
    pose_matrix,
    quaternion_of_yaw,
    quaternion_to_matrix,
    split_scenes,
    write_tables,
    yaw_of_quaternion,
)
from fusion.nuscenes_eval import (
    _angle_diff,
    default_meta,
    devkit_cannot_score,
    devkit_evaluate,
    devkit_status,
    evaluate_results,
    load_results,
    results_json,
    write_results,
)

VERSION = "v1.0-mini"
CATEGORIES = (
    "vehicle.car",
    "vehicle.truck",
    "vehicle.bus.rigid",
    "vehicle.trailer",
    "vehicle.construction",
    "human.pedestrian.adult",
    "vehicle.motorcycle",
    "vehicle.bicycle",
    "movable_object.trafficcone",
    "movable_object.barrier",
    "animal",
    "human.pedestrian.stroller",
    "static_object.bicycle_rack",
)
# Attribute drawn for a category (None: the category carries none).
_CATEGORY_ATTRIBUTES = {
    "vehicle.car": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "vehicle.truck": ("vehicle.moving", "vehicle.parked"),
    "vehicle.bus.rigid": ("vehicle.moving", "vehicle.stopped"),
    "vehicle.trailer": ("vehicle.parked",),
    "vehicle.construction": ("vehicle.parked", "vehicle.moving"),
    "human.pedestrian.adult": ("pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down"),
    "vehicle.motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "vehicle.bicycle": ("cycle.with_rider", "cycle.without_rider"),
}
_SIZES = {  # w, l, h as the tables store them
    "vehicle.car": (1.9, 4.5, 1.6),
    "vehicle.truck": (2.5, 7.0, 3.0),
    "vehicle.bus.rigid": (2.9, 11.0, 3.4),
    "vehicle.trailer": (2.6, 9.0, 3.8),
    "vehicle.construction": (2.8, 6.5, 3.2),
    "human.pedestrian.adult": (0.7, 0.7, 1.8),
    "vehicle.motorcycle": (0.8, 2.1, 1.5),
    "vehicle.bicycle": (0.6, 1.7, 1.3),
    "movable_object.trafficcone": (0.4, 0.4, 1.0),
    "movable_object.barrier": (2.5, 0.5, 1.0),
    "animal": (0.4, 0.8, 0.6),
    "human.pedestrian.stroller": (0.6, 1.0, 1.1),
    "static_object.bicycle_rack": (2.0, 6.0, 1.5),
}


def _token(rng: np.random.Generator) -> str:
    return uuid.UUID(bytes=rng.bytes(16)).hex


def make_tables(
    rng: np.random.Generator,
    scene_names=("scene-0103", "scene-0916", "scene-0061"),
    samples_per_scene: int = 5,
    objects_per_scene: int = 14,
) -> dict[str, list[dict]]:
    """Tables of a small nuScenes-format root: LIDAR_TOP key frames with ego poses, moving annotated objects of
    every class (some out of class range, some with zero points, some without neighbours), attributes."""
    t = {name: [] for name in ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor")}
    t.update({name: [] for name in ("ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map")})
    category_token = {}
    for name in CATEGORIES:
        category_token[name] = _token(rng)
        t["category"].append({"token": category_token[name], "name": name, "description": ""})
    attribute_token = {}
    for name in ATTRIBUTE_NAMES:
        attribute_token[name] = _token(rng)
        t["attribute"].append({"token": attribute_token[name], "name": name, "description": ""})
    for level, text in enumerate(("v0-40", "v40-60", "v60-80", "v80-100"), start=1):
        t["visibility"].append({"token": str(level), "level": text, "description": ""})
    lidar = {"token": _token(rng), "channel": "LIDAR_TOP", "modality": "lidar"}
    t["sensor"].append(lidar)
    calibration = {
        "token": _token(rng),
        "sensor_token": lidar["token"],
        "translation": [0.94, 0.0, 1.84],
        "rotation": quaternion_of_yaw(-np.pi / 2 + 0.01).tolist(),
        "camera_intrinsic": [],
    }
    t["calibrated_sensor"].append(calibration)
    time_us = 1_532_402_927_000_000
    for scene_name in scene_names:
        log = {"token": _token(rng), "logfile": f"log-{scene_name}", "vehicle": "n015", "date_captured": "2018-07-24"}
        log["location"] = "singapore-onenorth"
        t["log"].append(log)
        scene = {"token": _token(rng), "log_token": log["token"], "nbr_samples": samples_per_scene, "name": scene_name}
        scene["description"] = ""
        start = rng.uniform(-500, 500, size=2)
        heading = rng.uniform(-np.pi, np.pi)
        ego_speed = rng.uniform(0, 8)
        samples = []
        for i in range(samples_per_scene):
            sample = {"token": _token(rng), "timestamp": time_us, "scene_token": scene["token"], "prev": "", "next": ""}
            ego_xy = start + ego_speed * 0.5 * i * np.array([np.cos(heading), np.sin(heading)])
            ego = {
                "token": _token(rng),
                "timestamp": time_us,
                "translation": [float(ego_xy[0]), float(ego_xy[1]), 0.0],
                "rotation": quaternion_of_yaw(heading + 0.02 * i).tolist(),
            }
            t["ego_pose"].append(ego)
            t["sample_data"].append(
                {
                    "token": _token(rng),
                    "sample_token": sample["token"],
                    "ego_pose_token": ego["token"],
                    "calibrated_sensor_token": calibration["token"],
                    "timestamp": time_us,
                    "fileformat": "pcd",
                    "is_key_frame": True,
                    "height": 0,
                    "width": 0,
                    "filename": f"samples/LIDAR_TOP/{scene_name}-{i}.pcd.bin",
                    "prev": "",
                    "next": "",
                }
            )
            samples.append((sample, ego))
            time_us += 500_000
        for (a, _), (b, _) in zip(samples[:-1], samples[1:], strict=True):
            a["next"], b["prev"] = b["token"], a["token"]
        t["sample"].extend(s for s, _ in samples)
        scene["first_sample_token"], scene["last_sample_token"] = samples[0][0]["token"], samples[-1][0]["token"]
        t["scene"].append(scene)
        for k in range(objects_per_scene + 2 if objects_per_scene else 0):
            if k >= objects_per_scene:  # a parked bicycle inside a bicycle rack: the devkit drops such bikes
                category = ("static_object.bicycle_rack", "vehicle.bicycle")[k - objects_per_scene]
            elif k < 12:
                category = CATEGORIES[k]
            else:
                category = CATEGORIES[int(rng.integers(0, 10))]
            instance = {"token": _token(rng), "category_token": category_token[category]}
            # Mostly inside the class range; the last objects far out (55-70 m) so range filtering matters.
            radius = rng.uniform(3, 28) if k < objects_per_scene - 3 or k >= objects_per_scene else rng.uniform(55, 70)
            angle = rng.uniform(-np.pi, np.pi)
            yaw = rng.uniform(-np.pi, np.pi)
            speed = 0.0 if category in ("movable_object.trafficcone", "movable_object.barrier") else rng.uniform(0, 6)
            if k >= objects_per_scene:  # rack and bike: static, same place in the world
                if k == objects_per_scene:
                    rack_place = (radius, angle, yaw)
                radius, angle, yaw = rack_place
                speed = 0.0
            first, last = int(rng.integers(0, 2)), samples_per_scene - int(rng.integers(0, 2))
            if 12 <= k < objects_per_scene and k % 3 == 0:
                first, last = 2, 3  # a single annotation: no velocity
            annotations = []
            for i in range(first, last):
                sample, ego = samples[i]
                offset = radius * np.array([np.cos(angle), np.sin(angle)]) + speed * 0.5 * i * np.array(
                    [np.cos(yaw), np.sin(yaw)]
                )
                centre = np.array(ego["translation"][:2]) + offset
                # some annotations of attribute classes carry none: the devkit then skips their attribute error
                attributes = _CATEGORY_ATTRIBUTES.get(category, ()) if k < 12 or k % 7 != 5 else ()
                annotations.append(
                    {
                        "token": _token(rng),
                        "sample_token": sample["token"],
                        "instance_token": instance["token"],
                        "visibility_token": str(int(rng.integers(1, 5))),
                        "attribute_tokens": [attribute_token[attributes[int(rng.integers(0, len(attributes)))]]]
                        if attributes
                        else [],
                        "translation": [float(centre[0]), float(centre[1]), float(rng.uniform(0.5, 1.5))],
                        "size": list(_SIZES[category]),
                        "rotation": quaternion_of_yaw(yaw).tolist(),
                        "prev": "",
                        "next": "",
                        # every fifth object is seen by no sensor in its first frame: the devkit drops those boxes
                        "num_lidar_pts": 0 if (k % 5 == 4 and i == first) else int(rng.integers(1, 200)),
                        "num_radar_pts": 0 if (k % 5 == 4 and i == first) else int(rng.integers(0, 5)),
                    }
                )
            for a, b in zip(annotations[:-1], annotations[1:], strict=True):
                a["next"], b["prev"] = b["token"], a["token"]
            instance["nbr_annotations"] = len(annotations)
            instance["first_annotation_token"] = annotations[0]["token"]
            instance["last_annotation_token"] = annotations[-1]["token"]
            t["instance"].append(instance)
            t["sample_annotation"].extend(annotations)
    t["map"].append(
        {
            "token": _token(rng),
            "log_tokens": [log["token"] for log in t["log"]],
            "category": "semantic_prior",
            "filename": "maps/semantic_prior.png",
        }
    )
    return t


def write_root(root: Path, tables: dict[str, list[dict]]) -> Path:
    write_tables(root, VERSION, tables)
    (root / "maps").mkdir(exist_ok=True)
    (root / "maps" / "semantic_prior.png").write_bytes(b"")
    return root


# ----------------------------------------------------------------------------------------------- tables


def test_tables_round_trip_and_indexes(tmp_path):
    tables = make_tables(np.random.default_rng(0))
    write_root(tmp_path, tables)
    loaded = load_tables(tmp_path, VERSION)
    assert loaded.tables == json.loads(json.dumps(tables))
    scene = loaded.scene_by_name("scene-0916")
    samples = loaded.scene_samples(scene)
    assert len(samples) == 5 and [s["timestamp"] for s in samples] == sorted(s["timestamp"] for s in samples)
    lidar = loaded.key_frame(samples[0]["token"], "LIDAR_TOP")
    assert loaded.channel(lidar) == "LIDAR_TOP" and list(loaded.key_frames(samples[0]["token"])) == ["LIDAR_TOP"]
    assert loaded.previous_sweeps(lidar, 9) == []
    tokens = loaded.split_sample_tokens("mini_val")
    assert len(tokens) == 10 and set(tokens) == {
        s["token"] for name in ("scene-0103", "scene-0916") for s in loaded.scene_samples(loaded.scene_by_name(name))
    }
    annotation = loaded.sample_annotations(samples[2]["token"])[0]
    chain = loaded.instance_annotations(annotation["instance_token"])
    assert annotation in chain and all(a["instance_token"] == annotation["instance_token"] for a in chain)
    # velocity: a centred difference over the neighbours, NaN for a lone annotation
    velocities = [loaded.box_velocity(a) for a in loaded.tables["sample_annotation"]]
    assert sum(np.isnan(v).all() for v in velocities) >= 3
    assert all(np.isfinite(v).all() or np.isnan(v).all() for v in velocities)
    with pytest.raises(NuScenesFormatError, match="sample token 'nope'"):
        loaded.get("sample", "nope")
    with pytest.raises(NuScenesFormatError, match=f"sample '{samples[0]['token']}' has no key-frame CAM_FRONT"):
        loaded.key_frame(samples[0]["token"], "CAM_FRONT")


def test_velocity_is_the_centred_difference(tmp_path):
    tables = make_tables(np.random.default_rng(1))
    loaded = load_tables(write_root(tmp_path, tables), VERSION)
    for a in loaded.tables["sample_annotation"]:
        if a["prev"] and a["next"]:
            p, n = loaded.get("sample_annotation", a["prev"]), loaded.get("sample_annotation", a["next"])
            expected = (np.array(n["translation"]) - np.array(p["translation"])) / 1.0  # samples 0.5 s apart
            np.testing.assert_allclose(loaded.box_velocity(a), expected, rtol=1e-9)
            return
    raise AssertionError("no annotation with two neighbours")


def test_table_errors_name_the_file(tmp_path):
    write_root(tmp_path, make_tables(np.random.default_rng(2)))
    with pytest.raises(NuScenesFormatError, match="does not exist"):
        load_tables(tmp_path / "absent", VERSION)
    with pytest.raises(NuScenesFormatError, match=r"v1.0-trainval does not exist; present: v1.0-mini"):
        load_tables(tmp_path, "v1.0-trainval")
    (tmp_path / VERSION / "sample_annotation.json").write_text('[{"token": "a", "sample_t')
    with pytest.raises(NuScenesFormatError, match="sample_annotation.json"):
        load_tables(tmp_path, VERSION)
    (tmp_path / VERSION / "ego_pose.json").unlink()
    with pytest.raises(NuScenesFormatError, match=r"missing table .*ego_pose.json"):
        load_tables(tmp_path, VERSION)


def test_category_mapping_and_splits():
    assert DETECTION_CLASSES[0] == "car" and DETECTION_CLASSES[-1] == "barrier" and len(DETECTION_CLASSES) == 10
    assert category_to_detection_class("vehicle.bus.bendy") == "bus"
    assert category_to_detection_class("human.pedestrian.police_officer") == "pedestrian"
    assert category_to_detection_class("human.pedestrian.wheelchair") is None
    assert category_to_detection_class("static_object.bicycle_rack") is None
    with pytest.raises(NuScenesFormatError, match="'vehicle.spaceship'"):
        category_to_detection_class("vehicle.spaceship")
    assert split_scenes("v1.0-mini", "mini_val") == ["scene-0103", "scene-0916"]
    assert len(split_scenes("v1.0-mini", "mini_train")) == 8
    train, val, test = (
        split_scenes(v, s) for v, s in (("v1.0-trainval", "train"), ("v1.0-trainval", "val"), ("v1.0-test", "test"))
    )
    assert (len(train), len(val), len(test)) == (700, 150, 150) and len(set(train + val + test)) == 1000
    for version, split in (("v1.0-mini", "val"), ("v1.0-trainval", "mini_val"), ("v1.0-mini", "everything")):
        with pytest.raises(NuScenesFormatError, match=split):
            split_scenes(version, split)


def test_pose_maths():
    rng = np.random.default_rng(3)
    for _ in range(200):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        rotation = quaternion_to_matrix(q)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(matrix_to_quaternion(rotation), q * np.sign(q[0]), atol=1e-12)
    # yaw 90 degrees maps +x to +y; a pose moves sensor points into the parent frame
    np.testing.assert_allclose(quaternion_to_matrix(quaternion_of_yaw(np.pi / 2)) @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    for yaw in np.linspace(-3.1, 3.1, 25):
        assert yaw_of_quaternion(quaternion_of_yaw(yaw)) == pytest.approx(yaw, abs=1e-12)
    pose = pose_matrix({"rotation": quaternion_of_yaw(np.pi / 2).tolist(), "translation": [1.0, 2.0, 3.0]})
    assert pose.dtype == np.float64 and pose.shape == (4, 4)
    np.testing.assert_allclose(pose @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-15)


# ----------------------------------------------------------------------------------------------- evaluation


def lidar_detections(tables, split: str, rng: np.random.Generator, noise: float = 1.0) -> list[dict]:
    """LiDAR-frame detections from the ground truth: perturbed copies (noise > 0: jitter, missed boxes, wrong
    classes and attributes, duplicates, false positives, tied scores) or exact copies (noise = 0)."""
    detections = []
    for token in tables.split_sample_tokens(split):
        lidar_to_global = tables.lidar_to_global(token)
        to_lidar = np.linalg.inv(lidar_to_global)
        boxes, scores, labels, velocities, attributes = [], [], [], [], []
        for annotation in tables.sample_annotations(token):
            name = tables.detection_class(annotation)
            if name is None or (noise and rng.random() < 0.15):
                continue
            if not noise and annotation["num_lidar_pts"] + annotation["num_radar_pts"] == 0:
                continue  # the metric drops such ground truth: an exact copy would be a false positive
            centre = (to_lidar @ [*annotation["translation"], 1.0])[:3]
            rotation = to_lidar[:3, :3] @ quaternion_to_matrix(annotation["rotation"])
            yaw = yaw_of_quaternion(matrix_to_quaternion(rotation))
            w, length, h = annotation["size"]
            velocity = (to_lidar[:3, :3] @ np.nan_to_num(tables.box_velocity(annotation)))[:2]
            attribute = (tables.attribute_names(annotation) or [""])[0]
            label = DETECTION_CLASSES.index(name)
            score = 0.9
            if noise:
                centre[:2] += rng.normal(0, 0.7 * noise, 2)
                length, w, h = np.array([length, w, h]) * np.exp(rng.normal(0, 0.15 * noise, 3))
                yaw += rng.normal(0, 0.4 * noise) + (np.pi if rng.random() < 0.1 else 0.0)
                velocity = velocity + rng.normal(0, 0.8 * noise, 2)
                if rng.random() < 0.3:
                    attribute = str(rng.choice(ATTRIBUTE_NAMES))
                if rng.random() < 0.05:
                    label = int(rng.integers(0, 10))
                score = round(float(rng.uniform(0.2, 1.0)), 2)  # two decimals: ties happen
            for copy in range(2 if noise and rng.random() < 0.1 else 1):  # some duplicates
                boxes.append([*centre, length, w, h, yaw])
                scores.append(score * (0.5 if copy else 1.0))
                labels.append(label)
                velocities.append(velocity)
                attributes.append(attribute)
        for _ in range(int(rng.integers(2, 9)) if noise else 0):  # false positives, some out of range
            radius, angle = rng.uniform(0, 60), rng.uniform(-np.pi, np.pi)
            boxes.append([radius * np.cos(angle), radius * np.sin(angle), 1.0, 4.0, 1.8, 1.6, rng.uniform(-3, 3)])
            scores.append(round(float(rng.uniform(0.05, 0.8)), 2))
            labels.append(int(rng.integers(0, 10)))
            velocities.append(rng.normal(0, 2, 2))
            attributes.append("")
        detections.append(
            {
                "sample_token": token,
                "lidar_to_global": lidar_to_global,
                "boxes": np.array(boxes).reshape(-1, 7),
                "scores": np.array(scores),
                "labels": np.array(labels, dtype=np.int64),
                "velocities": np.array(velocities).reshape(-1, 2),
                "attributes": attributes,
            }
        )
    return detections


def _require_devkit():
    """Skip where the devkit is absent, except in CI (`make setup` installs it there: a skip would hide the check)."""
    reason = devkit_status()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the devkit cross-check: {reason}")
        pytest.skip(f"devkit cross-check skipped: {reason}")


def _assert_same_metrics(ours: dict, theirs: dict, tol: float = 1e-6):
    for key in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert ours[key] == pytest.approx(theirs[key], abs=tol), key
    for name in DETECTION_CLASSES:
        assert ours["class_ap"][name] == pytest.approx(theirs["class_ap"][name], abs=tol), name
        for metric, value in ours["class_tp_errors"][name].items():
            other = theirs["class_tp_errors"][name][metric]
            assert (np.isnan(value) and np.isnan(other)) or value == pytest.approx(other, abs=tol), (name, metric)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_equals_the_devkit(tmp_path, seed):
    _require_devkit()
    rng = np.random.default_rng(seed)
    root = write_root(tmp_path / "root", make_tables(rng, samples_per_scene=6, objects_per_scene=30))
    tables = load_tables(root, VERSION)
    results = results_json(lidar_detections(tables, "mini_val", rng), default_meta())
    path = write_results(tmp_path / "results.json", results)
    ours = evaluate_results(json.loads(path.read_text()), tables, "mini_val")
    theirs = devkit_evaluate(path, root, VERSION, "mini_val", tmp_path / "devkit")
    assert 0.05 < ours["mAP"] < 0.95 and sum(ours["num_gt"].values()) > 100  # a case where the figures mean something
    _assert_same_metrics(ours, theirs)


def test_perfect_predictions_score_one(tmp_path):
    rng = np.random.default_rng(4)
    root = write_root(tmp_path, make_tables(rng, samples_per_scene=4, objects_per_scene=16))
    tables = load_tables(root, VERSION)
    metrics = evaluate_results(
        results_json(lidar_detections(tables, "mini_val", rng, noise=0), default_meta()), tables, "mini_val"
    )
    assert all(metrics["num_gt"][name] > 0 for name in DETECTION_CLASSES)
    assert metrics["mAP"] == pytest.approx(1.0, abs=1e-12) and metrics["NDS"] == pytest.approx(1.0, abs=1e-9)
    for key in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert metrics[key] < 1e-9, key
    # the bicycle in its rack is dropped from the ground truth, the range and point filters apply
    in_split = set(tables.split_sample_tokens("mini_val"))
    bikes = [
        a
        for a in tables.tables["sample_annotation"]
        if a["sample_token"] in in_split and tables.detection_class(a) == "bicycle"
    ]
    assert metrics["num_gt"]["bicycle"] < len(bikes)
    all_gt = sum(
        1 for a in tables.tables["sample_annotation"] if a["sample_token"] in in_split and tables.detection_class(a)
    )
    assert sum(metrics["num_gt"].values()) < all_gt


def _one_car_root(tmp_path: Path) -> tuple[Path, str, list[float]]:
    """mini_val with one sample and one car annotation (no neighbours: velocity unknown), other classes absent."""
    rng = np.random.default_rng(5)
    tables = make_tables(rng, scene_names=("scene-0103",), samples_per_scene=1, objects_per_scene=0)
    tables["sample_annotation"].clear()
    tables["instance"].clear()
    sample = tables["sample"][0]
    ego = tables["ego_pose"][0]["translation"]
    car = {
        "token": "car-instance",
        "category_token": next(c["token"] for c in tables["category"] if c["name"] == "vehicle.car"),
    }
    car.update(nbr_annotations=1, first_annotation_token="car-1", last_annotation_token="car-1")
    centre = [ego[0] + 10.0, ego[1] + 5.0, 1.0]
    tables["instance"].append(car)
    tables["sample_annotation"].append(
        {
            "token": "car-1",
            "sample_token": sample["token"],
            "instance_token": "car-instance",
            "visibility_token": "4",
            "attribute_tokens": [next(a["token"] for a in tables["attribute"] if a["name"] == "vehicle.parked")],
            "translation": centre,
            "size": [1.9, 4.5, 1.6],
            "rotation": quaternion_of_yaw(0.3).tolist(),
            "prev": "",
            "next": "",
            "num_lidar_pts": 40,
            "num_radar_pts": 0,
        }
    )
    return write_root(tmp_path, tables), sample["token"], centre


def _box(token, centre, score, yaw=0.3, size=(1.9, 4.5, 1.6), name="car", attribute="vehicle.parked"):
    return {
        "sample_token": token,
        "translation": list(centre),
        "size": list(size),
        "rotation": quaternion_of_yaw(yaw).tolist(),
        "velocity": [0.0, 0.0],
        "detection_name": name,
        "detection_score": score,
        "attribute_name": attribute,
    }


def test_hand_computed_case(tmp_path):
    root, token, centre = _one_car_root(tmp_path)
    tables = load_tables(root, VERSION)
    hit = [centre[0] + 0.7, centre[1], centre[2]]  # 0.7 m off: a match at 1, 2 and 4 m, not at 0.5 m
    miss = [centre[0] - 8.0, centre[1], centre[2]]
    results = {"meta": default_meta(), "results": {token: [_box(token, miss, 0.95), _box(token, hit, 0.9, yaw=0.5)]}}
    metrics = evaluate_results(results, tables, "mini_val")
    # ranked FP then TP: precision 0.5 * recall; AP = mean(max(0, 0.5 r - 0.1) for r = 0.11..1) / 0.9 = 0.2
    assert metrics["class_ap_by_distance"]["car"] == pytest.approx({0.5: 0.0, 1.0: 0.2, 2.0: 0.2, 4.0: 0.2}, abs=1e-12)
    assert metrics["class_ap"]["car"] == pytest.approx(0.15) and metrics["mAP"] == pytest.approx(0.015)
    car = metrics["class_tp_errors"]["car"]
    assert car["trans_err"] == pytest.approx(0.7) and car["orient_err"] == pytest.approx(0.2)
    assert car["scale_err"] == pytest.approx(0.0, abs=1e-12) and car["attr_err"] == 0.0 and car["vel_err"] == 1.0
    assert np.isnan(metrics["class_tp_errors"]["traffic_cone"]["orient_err"])
    assert (
        np.isnan(metrics["class_tp_errors"]["barrier"]["vel_err"])
        and metrics["class_tp_errors"]["barrier"]["orient_err"] == 1.0
    )
    assert metrics["mATE"] == pytest.approx((0.7 + 9) / 10) and metrics["mAOE"] == pytest.approx((0.2 + 8) / 9)
    assert metrics["mAAE"] == pytest.approx((0.0 + 7) / 8) and metrics["mAVE"] == 1.0
    expected_nds = (5 * 0.015 + (1 - 0.97) + 0.1 + (1 - (8.2 / 9)) + 0 + (1 - 7 / 8)) / 10
    assert metrics["NDS"] == pytest.approx(expected_nds)
    # barrier orientation is 180-degree periodic; a box out of class range is ignored
    assert float(_angle_diff(np.array(0.1), np.pi + 0.1, np.pi)) == pytest.approx(0.0, abs=1e-12)
    far = [centre[0] + 60.0, centre[1], centre[2]]
    results["results"][token].append(_box(token, far, 0.99))
    assert evaluate_results(results, tables, "mini_val")["mAP"] == pytest.approx(0.015)
    if devkit_status() is None:
        path = write_results(tmp_path / "results.json", results)
        _assert_same_metrics(metrics, devkit_evaluate(path, root, VERSION, "mini_val", tmp_path / "devkit"))


def test_results_json_format():
    lidar_to_global = np.eye(4)
    lidar_to_global[:3, :3] = quaternion_to_matrix(quaternion_of_yaw(np.pi / 2))
    lidar_to_global[:3, 3] = [100.0, 200.0, 1.5]
    boxes = np.array([[1.0, 0.0, 0.5, 4.0, 2.0, 1.5, 0.25]] * 3 + [[5.0, 5.0, 0.0, 0.5, 0.5, 1.0, 0.0]] * 600)
    scores = np.concatenate([[0.7, 0.9, 0.8], np.linspace(0.1, 0.5, 600)])
    labels = np.array([0, 0, 5] + [8] * 600)
    velocities = np.zeros((603, 2))
    velocities[0] = [1.0, 0.0]
    attributes = ["vehicle.moving", "", "vehicle.moving"] + [""] * 600  # a car attribute on a pedestrian: default
    detections = [
        {
            "sample_token": "s",
            "lidar_to_global": lidar_to_global,
            "boxes": boxes,
            "scores": scores,
            "labels": labels,
            "velocities": velocities,
            "attributes": attributes,
        }
    ]
    results = results_json(detections, default_meta())
    boxes_out = results["results"]["s"]
    assert len(boxes_out) == 500 and results["meta"]["use_lidar"] is True
    assert [b["detection_score"] for b in boxes_out[:3]] == [0.9, 0.8, 0.7] and boxes_out[-1][
        "detection_score"
    ] == pytest.approx(0.1 + 0.4 * 103 / 599)
    car = boxes_out[2]  # score 0.7: the first box
    np.testing.assert_allclose(car["translation"], [100.0, 201.0, 2.0], atol=1e-12)
    assert car["size"] == [2.0, 4.0, 1.5]  # w, l, h
    assert yaw_of_quaternion(car["rotation"]) == pytest.approx(np.pi / 2 + 0.25)
    np.testing.assert_allclose(car["velocity"], [0.0, 1.0], atol=1e-12)
    assert car["attribute_name"] == "vehicle.moving" and boxes_out[0]["attribute_name"] == "vehicle.parked"
    assert boxes_out[1]["detection_name"] == "pedestrian" and boxes_out[1]["attribute_name"] == "pedestrian.moving"
    assert boxes_out[3]["detection_name"] == "traffic_cone" and boxes_out[3]["attribute_name"] == ""
    with pytest.raises(ValueError, match="not nuScenes detection classes"):
        results_json(detections, default_meta(), class_names=("car", "lorry"))
    with pytest.raises(ValueError, match="labels must index"):
        results_json([{**detections[0], "labels": labels + 9}], default_meta())


def test_bad_results_and_tables_name_the_token(tmp_path):
    root, token, centre = _one_car_root(tmp_path)
    tables = load_tables(root, VERSION)
    with pytest.raises(NuScenesFormatError, match=f"results miss 1 sample.*{token}"):
        evaluate_results({"meta": default_meta(), "results": {}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="outside split 'mini_val', e.g. 'stranger'"):
        evaluate_results({"meta": default_meta(), "results": {token: [], "stranger": []}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="at most 500"):
        evaluate_results(
            {"meta": default_meta(), "results": {token: [_box(token, centre, 0.5)] * 501}}, tables, "mini_val"
        )
    with pytest.raises(NuScenesFormatError, match=rf"results\['{token}'\]\[0\]: unknown detection_name 'lorry'"):
        evaluate_results(
            {"meta": default_meta(), "results": {token: [_box(token, centre, 0.5, name="lorry")]}}, tables, "mini_val"
        )
    with pytest.raises(NuScenesFormatError, match="sample_token 'other' differs from its key"):
        evaluate_results({"meta": default_meta(), "results": {token: [_box("other", centre, 0.5)]}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="detection_score must be a float"):
        evaluate_results({"meta": default_meta(), "results": {token: [_box(token, centre, 1)]}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="no field 'velocity'"):
        broken = {k: v for k, v in _box(token, centre, 0.5).items() if k != "velocity"}
        evaluate_results({"meta": default_meta(), "results": {token: [broken]}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="no 'meta'"):
        evaluate_results({"results": {token: []}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="belongs to v1.0-trainval"):
        evaluate_results({"meta": default_meta(), "results": {token: []}}, tables, "val")
    # an annotation of a category nuScenes does not have
    tables.tables["category"][0]["name"] = "vehicle.hovercraft"
    car_category = tables.get("instance", "car-instance")["category_token"]
    tables.get("category", car_category)["name"] = "vehicle.hovercraft"
    with pytest.raises(NuScenesFormatError, match="sample_annotation 'car-1': unknown category 'vehicle.hovercraft'"):
        evaluate_results({"meta": default_meta(), "results": {token: []}}, tables, "mini_val")
    with pytest.raises(NuScenesFormatError, match="results file .* does not exist"):
        load_results(tmp_path / "absent.json")


def test_devkit_evaluate_reports_absence(monkeypatch, tmp_path):
    import fusion.nuscenes_eval as nuscenes_eval

    monkeypatch.setattr(nuscenes_eval, "devkit_status", lambda: "nuscenes-devkit not usable (test)")
    assert nuscenes_eval.devkit_evaluate(tmp_path / "r.json", tmp_path, VERSION, "mini_val", tmp_path / "out") is None


def test_a_results_file_without_boxes_scores_zero_and_the_devkit_is_skipped_with_the_reason(tmp_path):
    """A model that detects nothing writes a results file with no boxes: our metric scores it 0 and the devkit,
    whose loader reads the box type from the first box and fails on none, is skipped with that reason."""
    rng = np.random.default_rng(5)
    root = write_root(tmp_path / "root", make_tables(rng, samples_per_scene=4, objects_per_scene=16))
    tables = load_tables(root, VERSION)
    results = {"meta": default_meta(), "results": {t: [] for t in tables.split_sample_tokens("mini_val")}}
    assert evaluate_results(results, tables, "mini_val")["mAP"] == 0.0
    assert "no boxes" in devkit_cannot_score(results)
    one = results_json(lidar_detections(tables, "mini_val", rng), default_meta())
    assert devkit_cannot_score(one) is None
    if devkit_status() is None:  # the reason is true: the devkit itself fails on such a file
        path = write_results(tmp_path / "empty.json", results)
        with pytest.raises(Exception, match="Invalid box type"):
            devkit_evaluate(path, root, VERSION, "mini_val", tmp_path / "devkit")
