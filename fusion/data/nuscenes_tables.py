"""The 13 JSON tables of a nuScenes data root, read and written without the devkit.

One small layer shared by the reader (fusion/data/nuscenes.py), the writer of nuScenes-format roots
(fusion/data/nuscenes_write.py) and the official detection metric (fusion/nuscenes_eval.py): loading with
errors that name the file or token, indexes built once, pose maths (quaternions wxyz, as the tables store
them), the detection-challenge class mapping and the official scene splits. Conventions follow the
nuscenes-devkit so that our figures can be checked against its DetectionEval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

TABLE_NAMES = (
    "category",
    "attribute",
    "visibility",
    "instance",
    "sensor",
    "calibrated_sensor",
    "ego_pose",
    "log",
    "scene",
    "sample",
    "sample_data",
    "sample_annotation",
    "map",
)

# The 10 classes of the nuScenes detection challenge, in the devkit's order (eval/detection/constants.py).
DETECTION_CLASSES = (
    "car",
    "truck",
    "bus",
    "trailer",
    "construction_vehicle",
    "pedestrian",
    "motorcycle",
    "bicycle",
    "traffic_cone",
    "barrier",
)

# The devkit's general-category -> detection-class mapping (eval/detection/utils.py). Pedestrian leaves out
# personal_mobility, stroller and wheelchair on purpose.
_DETECTION_MAPPING = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

# Every category name nuScenes defines: the 23 annotated ones plus the lidarseg-only ones that category.json
# holds when lidarseg is installed. A name outside this set is a format error, not "no class".
NUSCENES_CATEGORIES = frozenset(
    {
        *_DETECTION_MAPPING,
        "animal",
        "human.pedestrian.personal_mobility",
        "human.pedestrian.stroller",
        "human.pedestrian.wheelchair",
        "movable_object.debris",
        "movable_object.pushable_pullable",
        "static_object.bicycle_rack",
        "vehicle.emergency.ambulance",
        "vehicle.emergency.police",
        "noise",
        "flat.driveable_surface",
        "flat.other",
        "flat.sidewalk",
        "flat.terrain",
        "static.manmade",
        "static.other",
        "static.vegetation",
        "vehicle.ego",
    }
)

ATTRIBUTE_NAMES = (
    "pedestrian.moving",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "cycle.with_rider",
    "cycle.without_rider",
    "vehicle.moving",
    "vehicle.parked",
    "vehicle.stopped",
)

_VEHICLE = ("vehicle.moving", "vehicle.parked", "vehicle.stopped")
_CYCLE = ("cycle.with_rider", "cycle.without_rider")
# Attributes the devkit scores per class (detection_name_to_rel_attributes); barrier and cone have none.
CLASS_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "car": _VEHICLE,
    "truck": _VEHICLE,
    "bus": _VEHICLE,
    "trailer": _VEHICLE,
    "construction_vehicle": _VEHICLE,
    "pedestrian": ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing"),
    "motorcycle": _CYCLE,
    "bicycle": _CYCLE,
    "traffic_cone": (),
    "barrier": (),
}

# The attribute written when a model predicts none (the choice mmdetection3d/BEVFusion make); "" where the
# class has no attributes (the devkit's results format expects the empty string there).
DEFAULT_ATTRIBUTE: dict[str, str] = {
    "car": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "trailer": "vehicle.parked",
    "construction_vehicle": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider",
    "traffic_cone": "",
    "barrier": "",
}

# Which data-set version each official split belongs to (the devkit asserts the same pairing).
_SPLIT_VERSION = {
    "mini_train": "v1.0-mini",
    "mini_val": "v1.0-mini",
    "train": "v1.0-trainval",
    "val": "v1.0-trainval",
    "train_detect": "v1.0-trainval",
    "train_track": "v1.0-trainval",
    "test": "v1.0-test",
}


class NuScenesFormatError(ValueError):
    """A data root or results file that breaks the nuScenes format; the message names the file or token."""


def category_to_detection_class(category_name: str) -> str | None:
    """Detection-challenge class of a general nuScenes category; None for categories the challenge ignores."""
    if category_name in _DETECTION_MAPPING:
        return _DETECTION_MAPPING[category_name]
    if category_name in NUSCENES_CATEGORIES:
        return None
    raise NuScenesFormatError(f"unknown nuScenes category {category_name!r}")


def split_scenes(version: str, split: str) -> list[str]:
    """Scene names of an official split (facts of the data set, stored in nuscenes_splits.json)."""
    if split not in _SPLIT_VERSION:
        raise NuScenesFormatError(f"unknown nuScenes split {split!r}; known: {', '.join(_SPLIT_VERSION)}")
    if _SPLIT_VERSION[split] != version:
        raise NuScenesFormatError(f"split {split!r} belongs to {_SPLIT_VERSION[split]}, not {version!r}")
    return list(_official_splits()[split])


def splits_of_version(version: str) -> list[str]:
    """The official split names that exist for a version (for help texts and error messages)."""
    return [split for split, owner in _SPLIT_VERSION.items() if owner == version]


def _official_splits() -> dict[str, list[str]]:
    text = resources.files("fusion.data").joinpath("nuscenes_splits.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------- poses


def quaternion_to_matrix(q_wxyz) -> np.ndarray:
    """3x3 rotation matrix of a quaternion (w, x, y, z); normalised first, as pyquaternion does."""
    w, x, y, z = np.asarray(q_wxyz, dtype=np.float64) / np.linalg.norm(q_wxyz)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rotation) -> np.ndarray:
    """Quaternion (w, x, y, z), w >= 0, of a 3x3 rotation matrix (Shepperd's method: stable for any angle)."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = np.trace(m)
    candidates = (trace, m[0, 0], m[1, 1], m[2, 2])
    i = int(np.argmax(candidates))
    if i == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = np.array([0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s])
    elif i == 1:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = np.array([(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s])
    elif i == 2:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = np.array([(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s])
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = np.array([(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s])
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def pose_matrix(record: dict) -> np.ndarray:
    """4x4 float64 transform (sensor -> ego, or ego -> global) of a calibrated_sensor or ego_pose record."""
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(record["rotation"])
    out[:3, 3] = np.asarray(record["translation"], dtype=np.float64)
    return out


def yaw_of_quaternion(q_wxyz) -> float:
    """Heading of a box quaternion: the angle of its rotated x axis in the xy plane (the devkit's quaternion_yaw)."""
    x_axis = quaternion_to_matrix(q_wxyz)[:, 0]
    return float(np.arctan2(x_axis[1], x_axis[0]))


def quaternion_of_yaw(yaw: float) -> np.ndarray:
    """Quaternion (w, x, y, z) of a rotation by yaw about +z (Quaternion(axis=[0, 0, 1], radians=yaw))."""
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class NuScenesTables:
    """The 13 tables of one version folder, with token indexes built on first use."""

    root: Path
    version: str
    tables: dict[str, list[dict]]

    @cached_property
    def _by_token(self) -> dict[str, dict[str, dict]]:
        index: dict[str, dict[str, dict]] = {}
        for name in TABLE_NAMES:
            rows = index.setdefault(name, {})
            for number, record in enumerate(self.tables.get(name, [])):
                if not isinstance(record, dict) or "token" not in record:
                    raise NuScenesFormatError(f"{self.table_path(name)}: record {number} has no token")
                rows[record["token"]] = record
        return index

    def table_path(self, table: str) -> Path:
        return Path(self.root) / self.version / f"{table}.json"

    def get(self, table: str, token: str) -> dict:
        """The record of a token; an unknown token names the table and the token."""
        try:
            return self._by_token[table][token]
        except KeyError:
            raise NuScenesFormatError(f"{table} token {token!r} not found in {self.table_path(table)}") from None

    def field(self, record: dict, key: str, table: str):
        """record[key], or an error naming the table and the record's token when the field is missing."""
        try:
            return record[key]
        except KeyError:
            raise NuScenesFormatError(
                f"{table} record {record.get('token')!r} in {self.table_path(table)} has no field {key!r}"
            ) from None

    # -- scenes and samples

    def scene_by_name(self, name: str) -> dict:
        for scene in self.tables["scene"]:
            if scene.get("name") == name:
                return scene
        raise NuScenesFormatError(f"scene {name!r} not found in {self.table_path('scene')}")

    def scene_samples(self, scene: dict) -> list[dict]:
        """The samples of a scene in time order, following first_sample_token and the next chain."""
        first = self.field(scene, "first_sample_token", "scene")
        return self._chain("sample", first, f"scene {scene['token']!r}: the sample next-chain loops")

    def split_sample_tokens(self, split: str) -> list[str]:
        """Sample tokens of an official split's scenes, scene by scene in split order, time order within."""
        tokens: list[str] = []
        for name in split_scenes(self.version, split):
            scene = next((s for s in self.tables["scene"] if s.get("name") == name), None)
            if scene is not None:
                tokens.extend(sample["token"] for sample in self.scene_samples(scene))
        return tokens

    def channel(self, sample_data: dict) -> str:
        """Sensor channel (CAM_FRONT, LIDAR_TOP, ...) of a sample_data record."""
        calibration = self.get("calibrated_sensor", self.field(sample_data, "calibrated_sensor_token", "sample_data"))
        return self.get("sensor", calibration["sensor_token"])["channel"]

    @cached_property
    def _key_frames(self) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for record in self.tables["sample_data"]:
            if record.get("is_key_frame"):
                out.setdefault(record["sample_token"], {})[self.channel(record)] = record
        return out

    def key_frames(self, sample_token: str) -> dict[str, dict]:
        """channel -> key-frame sample_data record of a sample."""
        return self._key_frames.get(sample_token, {})

    def key_frame(self, sample_token: str, channel: str) -> dict:
        """The key-frame sample_data of one channel; an error names the sample and the channel when absent."""
        try:
            return self._key_frames[sample_token][channel]
        except KeyError:
            raise NuScenesFormatError(
                f"sample {sample_token!r} has no key-frame {channel} sample_data in {self.table_path('sample_data')}"
            ) from None

    def lidar_to_global(self, sample_token: str) -> np.ndarray:
        """4x4 float64 transform of the key-frame LIDAR_TOP frame into the global frame (ego_pose @ calibration)."""
        lidar = self.key_frame(sample_token, "LIDAR_TOP")
        ego_to_global = pose_matrix(self.get("ego_pose", self.field(lidar, "ego_pose_token", "sample_data")))
        return ego_to_global @ pose_matrix(self.get("calibrated_sensor", lidar["calibrated_sensor_token"]))

    def previous_sweeps(self, sample_data: dict, count: int) -> list[dict]:
        """Up to `count` earlier sample_data of the same sensor, nearest first (the prev chain)."""
        out, token = [], sample_data.get("prev", "")
        while token and len(out) < count:
            record = self.get("sample_data", token)
            out.append(record)
            token = record.get("prev", "")
        return out

    # -- annotations

    @cached_property
    def _annotations_by_sample(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for record in self.tables["sample_annotation"]:
            out.setdefault(record["sample_token"], []).append(record)
        return out

    def sample_annotations(self, sample_token: str) -> list[dict]:
        return self._annotations_by_sample.get(sample_token, [])

    def instance_annotations(self, instance_token: str) -> list[dict]:
        """The annotations of one instance in time order (first_annotation_token and the next chain)."""
        first = self.get("instance", instance_token)["first_annotation_token"]
        return self._chain("sample_annotation", first, f"instance {instance_token!r}: the annotation next-chain loops")

    def _chain(self, table: str, token: str, loop_error: str) -> list[dict]:
        """Records of `table` from `token` along the next links; a chain longer than the table loops."""
        out = []
        while token:
            record = self.get(table, token)
            out.append(record)
            token = record.get("next", "")
            if len(out) > len(self.tables[table]):
                raise NuScenesFormatError(loop_error)
        return out

    def category_name(self, annotation: dict) -> str:
        instance = self.get("instance", self.field(annotation, "instance_token", "sample_annotation"))
        return self.get("category", instance["category_token"])["name"]

    def detection_class(self, annotation: dict) -> str | None:
        """Detection-challenge class of an annotation; an unknown category names the annotation."""
        name = self.category_name(annotation)
        try:
            return category_to_detection_class(name)
        except NuScenesFormatError:
            raise NuScenesFormatError(
                f"sample_annotation {annotation['token']!r}: unknown category {name!r} in {self.table_path('category')}"
            ) from None

    def attribute_names(self, annotation: dict) -> list[str]:
        return [self.get("attribute", token)["name"] for token in annotation.get("attribute_tokens", [])]

    def box_velocity(self, annotation: dict, max_time_diff: float = 1.5) -> np.ndarray:
        """Global-frame velocity (3,) from neighbouring annotations, NaN where it cannot be estimated.

        The devkit's rule: centred difference when both neighbours exist (time limit doubled), else a one-sided
        difference; a gap over the limit gives NaN.
        """
        prev, nxt = annotation.get("prev", ""), annotation.get("next", "")
        if not prev and not nxt:
            return np.full(3, np.nan)
        first = self.get("sample_annotation", prev) if prev else annotation
        last = self.get("sample_annotation", nxt) if nxt else annotation
        dt = 1e-6 * (
            self.get("sample", last["sample_token"])["timestamp"]
            - self.get("sample", first["sample_token"])["timestamp"]
        )
        if dt > (2 * max_time_diff if prev and nxt else max_time_diff):
            return np.full(3, np.nan)
        return (
            np.asarray(last["translation"], dtype=np.float64) - np.asarray(first["translation"], dtype=np.float64)
        ) / dt


def _read_table(path: Path) -> list[dict]:
    if not path.is_file():
        raise NuScenesFormatError(f"missing table {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NuScenesFormatError(f"unreadable table {path}: {error}") from None
    if not isinstance(data, list):
        raise NuScenesFormatError(f"table {path} is not a JSON list of records")
    return data


def available_versions(root: str | Path) -> list[str]:
    """Version folders under a data root (v1.0-mini, v1.0-trainval, ...): folders that hold a sample.json."""
    root = Path(root)
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "sample.json").is_file()) if root.is_dir() else []
    )


def load_tables(root: str | Path, version: str) -> NuScenesTables:
    """Read the 13 tables of root/version; every problem is a NuScenesFormatError naming the path."""
    root = Path(root)
    if not root.is_dir():
        raise NuScenesFormatError(f"nuScenes data root {root} does not exist or is not a directory")
    if not (root / version).is_dir():
        present = available_versions(root)
        raise NuScenesFormatError(
            f"version folder {root / version} does not exist; present: {', '.join(present) if present else 'none'}"
        )
    tables = {name: _read_table(root / version / f"{name}.json") for name in TABLE_NAMES}
    return NuScenesTables(root=root, version=version, tables=tables)


def write_tables(root: str | Path, version: str, tables: dict[str, list[dict]]) -> Path:
    """Write the 13 tables as root/version/<table>.json (indented like the official files); returns the folder."""
    missing = [name for name in TABLE_NAMES if name not in tables]
    if missing:
        raise ValueError(f"write_tables: tables missing: {', '.join(missing)}")
    folder = Path(root) / version
    folder.mkdir(parents=True, exist_ok=True)
    for name in TABLE_NAMES:
        (folder / f"{name}.json").write_text(json.dumps(tables[name], indent=0))
    return folder
