"""nuScenes tables and the official detection metric, checked against the devkit's DetectionEval where installed.

Roots are written here with write_tables (tables only: the evaluation needs no images or point clouds), in the
scene names of the official mini splits so that the devkit accepts them.
"""

from __future__ import annotations

import json
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
        for k in range(objects_per_scene):
            category = CATEGORIES[k % len(CATEGORIES)] if k < len(CATEGORIES) else CATEGORIES[rng.integers(0, 10)]
            instance = {"token": _token(rng), "category_token": category_token[category]}
            # Mostly inside the class range; the last objects far out (55-70 m) so range filtering matters.
            radius = rng.uniform(3, 28) if k < objects_per_scene - 3 else rng.uniform(55, 70)
            angle = rng.uniform(-np.pi, np.pi)
            yaw = rng.uniform(-np.pi, np.pi)
            speed = 0.0 if category in ("movable_object.trafficcone", "movable_object.barrier") else rng.uniform(0, 6)
            first, last = int(rng.integers(0, 2)), samples_per_scene - int(rng.integers(0, 2))
            if k == 0:
                first, last = 2, 3  # a single annotation: no velocity
            annotations = []
            for i in range(first, last):
                sample, ego = samples[i]
                offset = radius * np.array([np.cos(angle), np.sin(angle)]) + speed * 0.5 * i * np.array(
                    [np.cos(yaw), np.sin(yaw)]
                )
                centre = np.array(ego["translation"][:2]) + offset
                attributes = _CATEGORY_ATTRIBUTES.get(category, ())
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
