"""Write synthetic driving sequences as a complete nuScenes data root (the format is our test bed).

No machine here can download nuScenes, so the reader, the results writer and the official evaluation are
exercised on roots written by this module: all 13 tables, key-frame JPEGs under samples/CAM_*/, key-frame
`.pcd.bin` files under samples/LIDAR_TOP/ and the sweeps between key frames under sweeps/LIDAR_TOP/.

Each scene is one synthetic scene (`fusion.data.scenes`) played forward in time: the ego vehicle drives
along the road and part of the objects move (vehicles along their heading, pedestrians walking), sampled
at 2 Hz for key frames, with `sweeps` LiDAR sweeps evenly spaced before each key frame (nuScenes: 9, at
20 Hz). The sensors are rendered by `fusion.data.render` in a "render frame" (the ego frame shifted by
RENDER_OFFSET_X, so the sensors sit where a nuScenes car has them); calibrations are written as nuScenes
stores them: LIDAR_TOP turned -90 degrees about z (x to the right), cameras with z forward, intrinsics of
the written image size. Scene names come from the official splits, so the devkit's split logic applies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image

from common.progress import progress_bar
from fusion.config import Config, DataConfig, get_config
from fusion.data.camera_geometry import rig_calibration
from fusion.data.nuscenes_tables import (
    ATTRIBUTE_NAMES,
    DETECTION_CLASSES,
    NUSCENES_CATEGORIES,
    matrix_to_quaternion,
    quaternion_of_yaw,
    split_scenes,
    write_tables,
)
from fusion.data.render import render_cameras, scan_lidar
from fusion.data.scenes import SIZE_PRIORS, Scene, sample_scene
from fusion.geometry import camera_intrinsics

KIND = "nuscenes-root"  # the manifest kind of a written root (common.io.staged_directory)
RENDER_OFFSET_X = 0.94  # metres: the render frame's origin in the ego frame (nuScenes' LIDAR_TOP x)
KEY_FRAME_INTERVAL_US = 500_000  # 2 Hz key frames
START_TIMESTAMP_US = 1_532_402_927_000_000
# The nuScenes category each detection class is written as.
CLASS_CATEGORY = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "construction_vehicle": "vehicle.construction",
    "pedestrian": "human.pedestrian.adult",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "traffic_cone": "movable_object.trafficcone",
    "barrier": "movable_object.barrier",
}
# Distractors are annotated too, under a category that is no detection class (the devkit ignores it).
DISTRACTOR_CATEGORY = {"bollard": "movable_object.pushable_pullable"}
SPEEDS = {"pedestrian": (0.8, 1.6), "bicycle": (2.5, 5.0), "motorcycle": (4.0, 9.0)}  # m/s; vehicles: VEHICLE_SPEED
VEHICLE_SPEED = (3.0, 10.0)
MOVING_FRACTION = 0.5
VISIBILITY = [("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100")]


def _token(*parts) -> str:
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def default_camera_size(config: Config) -> tuple[int, int]:
    """Raw (height, width) of the written images: nuScenes' 9:16 at 1.25x the input width, so the reader
    resizes and crops as on nuScenes (1600x900 -> 704x396 -> bottom 256 rows at the nuscenes preset)."""
    width = round(config.rig.image_width * 1.25)
    return round(width * 9 / 16), width


def scene_names(version: str, count: int) -> list[str]:
    """`count` official scene names, alternating the version's validation and training splits."""
    train, val = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}[version]
    train_names, val_names = split_scenes(version, train), split_scenes(version, val)
    names = []
    for i in range(max(len(train_names), len(val_names))):
        names += [
            n
            for n in (val_names[i] if i < len(val_names) else None, train_names[i] if i < len(train_names) else None)
            if n
        ]
    if count > len(names):
        raise ValueError(f"{version} has {len(names)} official scenes, asked for {count}")
    return names[:count]


def _rotz(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _pose(rotation: np.ndarray, translation) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rotation, translation
    return out


def _record(token: str, rotation: np.ndarray, translation: np.ndarray, **extra) -> dict:
    return {
        "token": token,
        **extra,
        "translation": [float(v) for v in translation],
        "rotation": [float(v) for v in matrix_to_quaternion(rotation)],
    }


@dataclasses.dataclass
class _Motion:
    """A scene played forward. The start frame is the render frame at time 0 (boxes as sampled); `origin`
    places it in the global frame (a log's map coordinates: a few hundred metres out, any heading)."""

    scene: Scene
    velocities: np.ndarray  # (K, 2) start-frame m/s of every box
    ego_speed: float  # m/s along the start frame's x axis (the ego keeps its heading)
    origin: np.ndarray  # (4, 4) start frame -> global

    def ego_in_start(self, t: float) -> np.ndarray:
        return _pose(np.eye(3), [self.ego_speed * t - RENDER_OFFSET_X, 0.0, 0.0])

    def ego_to_world(self, t: float) -> np.ndarray:
        return self.origin @ self.ego_in_start(t)

    def start_boxes(self, t: float) -> np.ndarray:
        boxes = self.scene.boxes.copy()
        boxes[:, :2] += self.velocities * t
        return boxes

    def world_boxes(self, t: float) -> np.ndarray:
        """Global-frame boxes at time t."""
        boxes = self.start_boxes(t)
        boxes[:, :3] = boxes[:, :3] @ self.origin[:3, :3].T + self.origin[:3, 3]
        boxes[:, 6] += math.atan2(self.origin[1, 0], self.origin[0, 0])
        return boxes

    def world_velocities(self) -> np.ndarray:
        return self.velocities @ self.origin[:2, :2].T

    def render_scene(self, t: float) -> Scene:
        """The scene as the sensors see it at time t, in the render frame."""
        world_to_render = np.linalg.inv(self.ego_in_start(t) @ _pose(np.eye(3), [RENDER_OFFSET_X, 0.0, 0.0]))
        boxes = self.start_boxes(t)
        boxes[:, :3] = boxes[:, :3] @ world_to_render[:3, :3].T + world_to_render[:3, 3]
        yaw_shift = math.atan2(world_to_render[1, 0], world_to_render[0, 0])
        boxes[:, 6] = np.arctan2(np.sin(boxes[:, 6] + yaw_shift), np.cos(boxes[:, 6] + yaw_shift))
        roads = self.scene.roads.copy()
        centres = np.c_[roads[:, :2], np.zeros(len(roads))]
        roads[:, :2] = (centres @ world_to_render[:3, :3].T + world_to_render[:3, 3])[:, :2]
        roads[:, 2] += yaw_shift
        return dataclasses.replace(self.scene, boxes=boxes, roads=roads)


def _motion(scene: Scene, rng: np.random.Generator) -> _Motion:
    velocities = np.zeros((len(scene.boxes), 2))
    for i, kind in enumerate(scene.kinds[: scene.num_objects]):
        if rng.random() >= MOVING_FRACTION:
            continue
        low, high = SPEEDS.get(kind, VEHICLE_SPEED if kind in ("car", "truck", "bus", "trailer") else (0.0, 0.0))
        speed = rng.uniform(low, high)
        velocities[i] = speed * np.array([math.cos(scene.boxes[i, 6]), math.sin(scene.boxes[i, 6])])
    origin = _pose(_rotz(rng.uniform(-math.pi, math.pi)), [rng.uniform(300.0, 1500.0), rng.uniform(300.0, 1500.0), 0.0])
    return _Motion(scene, velocities, ego_speed=float(rng.uniform(3.0, 8.0)), origin=origin)


def _points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Number of points (P, >=3) inside each box (K, 7)."""
    counts = np.zeros(len(boxes), dtype=np.int64)
    for k, (x, y, z, length, width, height, yaw) in enumerate(boxes):
        dx, dy = points[:, 0] - x, points[:, 1] - y
        along = dx * math.cos(yaw) + dy * math.sin(yaw)
        across = -dx * math.sin(yaw) + dy * math.cos(yaw)
        inside = (
            (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2) & (np.abs(points[:, 2] - z) <= height / 2)
        )
        counts[k] = int(inside.sum())
    return counts


def _attribute(kind: str, moving: bool, rng: np.random.Generator) -> str | None:
    if kind in ("car", "truck", "bus", "trailer", "construction_vehicle"):
        return "vehicle.moving" if moving else ("vehicle.parked" if rng.random() < 0.7 else "vehicle.stopped")
    if kind == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    if kind in ("bicycle", "motorcycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    return None


def write_nuscenes_root(
    out: str | Path,
    version: str = "v1.0-mini",
    scenes: int = 2,
    config: Config | None = None,
    samples_per_scene: int = 4,
    sweeps: int | None = None,
    camera_size: tuple[int, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    keep_truth: bool = False,
    overwrite: bool = False,
) -> dict:
    """Render `scenes` synthetic sequences and write them as a nuScenes root at `out` (staged, swapped in).

    config: the preset whose cameras, LiDAR and grid are rendered (default nuscenes-tiny); camera_size: raw
    image (height, width) (default `default_camera_size`); sweeps: LiDAR sweeps before each key frame
    (default the preset's `lidar.sweeps`). Returns a summary; with `keep_truth` also what was rendered per
    sample token (LiDAR-frame points of every file, boxes, calibrations, raw images), for round-trip tests.
    """
    from common.io import check_replaceable, staged_directory

    if version not in ("v1.0-mini", "v1.0-trainval"):
        raise ValueError(f"version must be v1.0-mini or v1.0-trainval, got {version!r}")
    if scenes < 1 or samples_per_scene < 1:
        raise ValueError("scenes and samples_per_scene must be >= 1")
    config = config or get_config("nuscenes-tiny")
    sweeps = config.lidar.sweeps if sweeps is None else sweeps
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    names = scene_names(version, scenes)
    check_replaceable(out, (KIND,), overwrite)
    raw_height, raw_width = camera_size or default_camera_size(config)
    writer = _RootWriter(config, version, raw_height, raw_width, sweeps, samples_per_scene, seed, keep_truth)
    with staged_directory(out, kind=KIND) as staging:
        for index in progress_bar(range(scenes), desc="writing scenes", enabled=progress, leave=False):
            writer.write_scene(staging, index, names[index])
        write_tables(staging, version, writer.tables())
    summary = {
        "out": str(out),
        "version": version,
        "scenes": names,
        "samples": len(writer.samples),
        "sweeps_per_sample": sweeps,
        "annotations": len(writer.annotations),
        "camera_size": [raw_height, raw_width],
    }
    if keep_truth:
        summary["truth"] = writer.truth
    return summary


class _RootWriter:
    """Accumulates the table records while scenes are rendered and their files written."""

    def __init__(self, config, version, raw_height, raw_width, sweeps, samples_per_scene, seed, keep_truth):
        self.config, self.version, self.seed = config, version, seed
        self.sweeps, self.samples_per_scene, self.keep_truth = sweeps, samples_per_scene, keep_truth
        self.classes = [c for c in DETECTION_CLASSES if c in SIZE_PRIORS]  # what the scene generator can draw
        self.render_data = DataConfig(classes=tuple(self.classes))
        self.rig = dataclasses.replace(config.rig, image_height=raw_height, image_width=raw_width, channels=())
        self.channels = tuple(config.rig.channels) or tuple(f"CAM_{i}" for i in range(config.rig.num_cameras))
        self.samples, self.sample_data, self.ego_poses, self.annotations = [], [], [], []
        self.instances, self.calibrated, self.logs, self.scenes, self.maps = [], [], [], [], []
        self.truth: dict[str, dict] = {}
        # Sensor calibration (the same for every log: one car).
        self.lidar_to_ego = _pose(_rotz(-math.pi / 2), [RENDER_OFFSET_X, 0.0, config.lidar.mount_height])
        calibration = rig_calibration(dataclasses.replace(config, rig=self.rig))
        self.camera_to_ego = calibration.camera_to_frame.copy()
        self.camera_to_ego[:, 0, 3] += RENDER_OFFSET_X
        self.intrinsics = camera_intrinsics(self.rig)

    # -- static tables

    def tables(self) -> dict[str, list[dict]]:
        categories = sorted(NUSCENES_CATEGORIES)
        return {
            "category": [{"token": _token("category", n), "name": n, "description": n} for n in categories],
            "attribute": [{"token": _token("attribute", n), "name": n, "description": n} for n in ATTRIBUTE_NAMES],
            "visibility": [{"token": t, "level": level, "description": level} for t, level in VISIBILITY],
            "instance": self.instances,
            "sensor": [
                {"token": _token("sensor", c), "channel": c, "modality": "camera" if c.startswith("CAM") else "lidar"}
                for c in (*self.channels, "LIDAR_TOP")
            ],
            "calibrated_sensor": self.calibrated,
            "ego_pose": self.ego_poses,
            "log": self.logs,
            "scene": self.scenes,
            "sample": self.samples,
            "sample_data": self.sample_data,
            "sample_annotation": self.annotations,
            "map": self.maps,
        }

    # -- one scene

    def write_scene(self, root: Path, index: int, name: str) -> None:
        rng = np.random.default_rng([self.seed, index])
        motion = _motion(sample_scene(rng, self.config.grid, self.render_data), rng)
        log_name = f"n015-2018-07-{index % 28 + 1:02d}-11-22-45+0800"
        log_token, scene_token = _token("log", name), _token("scene", name)
        map_name = f"maps/{_token('map', name)}.png"
        (root / "maps").mkdir(exist_ok=True)
        (root / map_name).write_bytes(b"")  # map layers are not written; the devkit opens map files lazily
        self.logs.append(
            {
                "token": log_token,
                "logfile": log_name,
                "vehicle": "n015",
                "date_captured": "2018-07-24",
                "location": "singapore-onenorth",
            }
        )
        self.maps.append(
            {
                "token": _token("map", name),
                "log_tokens": [log_token],
                "category": "semantic_prior",
                "filename": map_name,
            }
        )
        lidar_cs = _token("calibrated_sensor", name, "LIDAR_TOP")
        self.calibrated.append(
            _record(
                lidar_cs,
                self.lidar_to_ego[:3, :3],
                self.lidar_to_ego[:3, 3],
                sensor_token=_token("sensor", "LIDAR_TOP"),
                camera_intrinsic=[],
            )
        )
        camera_cs = []
        for n, channel in enumerate(self.channels):
            camera_cs.append(_token("calibrated_sensor", name, channel))
            self.calibrated.append(
                _record(
                    camera_cs[-1],
                    self.camera_to_ego[n, :3, :3],
                    self.camera_to_ego[n, :3, 3],
                    sensor_token=_token("sensor", channel),
                    camera_intrinsic=self.intrinsics.tolist(),
                )
            )
        start = START_TIMESTAMP_US + index * 100_000_000
        sample_tokens = [_token("sample", name, k) for k in range(self.samples_per_scene)]
        moving = np.linalg.norm(motion.velocities, axis=1) > 0.1
        attributes = [_attribute(kind, bool(m), rng) for kind, m in zip(motion.scene.kinds, moving)]
        last_lidar, last_camera = "", dict.fromkeys(self.channels, "")
        instance_annotations: dict[int, list[dict]] = {}
        interval = KEY_FRAME_INTERVAL_US / (self.sweeps + 1)
        for k, token in enumerate(sample_tokens):
            key_time = start + k * KEY_FRAME_INTERVAL_US
            self.samples.append(
                {
                    "token": token,
                    "timestamp": key_time,
                    "prev": sample_tokens[k - 1] if k else "",
                    "next": sample_tokens[k + 1] if k + 1 < len(sample_tokens) else "",
                    "scene_token": scene_token,
                }
            )
            truth = {"files": [], "points": []}
            # Sweeps before the key frame (oldest first), then the key frame itself.
            for j in range(self.sweeps, -1, -1):
                timestamp = int(round(key_time - j * interval))
                t = (timestamp - start) * 1e-6
                scene_t = motion.render_scene(t)
                points = scan_lidar(scene_t, self.config.lidar, self.render_data, rng)
                ego_points = points[:, :3].astype(np.float64) + [RENDER_OFFSET_X, 0.0, 0.0]
                lidar_points = (ego_points - self.lidar_to_ego[:3, 3]) @ self.lidar_to_ego[:3, :3]
                key = j == 0
                folder = "samples" if key else "sweeps"
                filename = f"{folder}/LIDAR_TOP/{log_name}__LIDAR_TOP__{timestamp}.pcd.bin"
                (root / folder / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
                self._write_points(root / filename, lidar_points, points[:, 3])
                sd_token = _token("sample_data", name, "LIDAR_TOP", timestamp)
                ego_to_world = motion.ego_to_world(t)
                self._sample_data(sd_token, token, timestamp, lidar_cs, filename, key, last_lidar, ego_to_world, 0, 0)
                last_lidar = sd_token
                if self.keep_truth:
                    to_key = np.linalg.inv(motion.ego_to_world((key_time - start) * 1e-6) @ self.lidar_to_ego) @ (
                        ego_to_world @ self.lidar_to_ego
                    )
                    truth["files"].append(
                        {
                            "lidar_points": lidar_points,
                            "intensity": points[:, 3],
                            "to_key": to_key,
                            "time_lag": j * interval * 1e-6,
                        }
                    )
                if key:
                    key_points_render = points
            t = k * KEY_FRAME_INTERVAL_US * 1e-6
            ego_to_world = motion.ego_to_world(t)
            scene_t = motion.render_scene(t)
            images = render_cameras(scene_t, self.rig, self.render_data, rng)
            for n, channel in enumerate(self.channels):
                filename = f"samples/{channel}/{log_name}__{channel}__{key_time}.jpg"
                (root / "samples" / channel).mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[n].transpose(1, 2, 0)).save(root / filename, quality=95)
                sd_token = _token("sample_data", name, channel, key_time)
                self._sample_data(
                    sd_token,
                    token,
                    key_time,
                    camera_cs[n],
                    filename,
                    True,
                    last_camera[channel],
                    ego_to_world,
                    self.rig.image_height,
                    self.rig.image_width,
                )
                last_camera[channel] = sd_token
            # Annotations: every box of a class or an annotated distractor, in the world (global) frame.
            counts = _points_in_boxes(key_points_render, scene_t.boxes)
            world = motion.world_boxes(t)
            boxes_lidar, labels, velocities_lidar = [], [], []
            world_velocities = motion.world_velocities()
            world_to_lidar = np.linalg.inv(ego_to_world @ self.lidar_to_ego)
            for i, kind in enumerate(motion.scene.kinds):
                category = CLASS_CATEGORY.get(kind) if i < motion.scene.num_objects else DISTRACTOR_CATEGORY.get(kind)
                if category is None:
                    continue
                x, y, z, length, width, height, yaw = world[i]
                ann_token = _token("sample_annotation", name, i, k)
                previous = instance_annotations.setdefault(i, [])
                if previous:
                    previous[-1]["next"] = ann_token
                record = {
                    "token": ann_token,
                    "sample_token": token,
                    "instance_token": _token("instance", name, i),
                    "visibility_token": "4",
                    "attribute_tokens": [_token("attribute", attributes[i])] if attributes[i] else [],
                    "translation": [float(x), float(y), float(z)],
                    "size": [float(width), float(length), float(height)],
                    "rotation": [float(v) for v in quaternion_of_yaw(yaw)],
                    "prev": previous[-1]["token"] if previous else "",
                    "next": "",
                    "num_lidar_pts": int(counts[i]),
                    "num_radar_pts": 0,
                }
                previous.append(record)
                self.annotations.append(record)
                if i < motion.scene.num_objects and counts[i] > 0:
                    centre = world_to_lidar @ [x, y, z, 1.0]
                    rel_yaw = yaw + math.atan2(world_to_lidar[1, 0], world_to_lidar[0, 0])
                    boxes_lidar.append(
                        [*centre[:3], length, width, height, math.atan2(math.sin(rel_yaw), math.cos(rel_yaw))]
                    )
                    labels.append(DETECTION_CLASSES.index(kind))
                    velocity = world_to_lidar[:3, :3] @ [*world_velocities[i], 0.0]
                    velocities_lidar.append(velocity[:2])
            if self.keep_truth:
                truth.update(
                    boxes=np.array(boxes_lidar).reshape(-1, 7),
                    labels=np.array(labels, dtype=np.int64),
                    velocities=np.array(velocities_lidar).reshape(-1, 2),
                    images=images,
                    intrinsics=self.intrinsics,
                    camera_to_lidar=np.linalg.inv(self.lidar_to_ego) @ self.camera_to_ego,
                    lidar_to_global=ego_to_world @ self.lidar_to_ego,
                )
                truth["files"] = truth["files"][::-1]  # key frame first, then the sweeps nearest first
                self.truth[token] = truth
        for i, records in instance_annotations.items():
            kind = motion.scene.kinds[i]
            category = CLASS_CATEGORY.get(kind) if i < motion.scene.num_objects else DISTRACTOR_CATEGORY[kind]
            self.instances.append(
                {
                    "token": _token("instance", name, i),
                    "category_token": _token("category", category),
                    "nbr_annotations": len(records),
                    "first_annotation_token": records[0]["token"],
                    "last_annotation_token": records[-1]["token"],
                }
            )
        self.scenes.append(
            {
                "token": scene_token,
                "log_token": log_token,
                "nbr_samples": len(sample_tokens),
                "first_sample_token": sample_tokens[0],
                "last_sample_token": sample_tokens[-1],
                "name": name,
                "description": "synthetic scene written by altermoma",
            }
        )

    def _write_points(self, path: Path, lidar_points: np.ndarray, intensity: np.ndarray) -> None:
        """x, y, z, intensity (0..255), ring index (from the elevation angle) as float32 x 5."""
        low, high = self.config.lidar.elevation_deg
        elevation = np.degrees(np.arctan2(lidar_points[:, 2], np.hypot(lidar_points[:, 0], lidar_points[:, 1])))
        beams = self.config.lidar.num_beams
        ring = np.clip(np.round((elevation - low) / max(high - low, 1e-6) * (beams - 1)), 0, beams - 1)
        data = np.c_[lidar_points, intensity * 255.0, ring].astype(np.float32)
        data.tofile(path)

    def _sample_data(
        self, token, sample_token, timestamp, calibrated, filename, key, prev, ego_to_world, height, width
    ):
        pose_token = _token("ego_pose", token)
        self.ego_poses.append(_record(pose_token, ego_to_world[:3, :3], ego_to_world[:3, 3], timestamp=timestamp))
        if prev:
            next(r for r in reversed(self.sample_data) if r["token"] == prev)["next"] = token
        self.sample_data.append(
            {
                "token": token,
                "sample_token": sample_token,
                "ego_pose_token": pose_token,
                "calibrated_sensor_token": calibrated,
                "timestamp": timestamp,
                "fileformat": "jpg" if filename.endswith(".jpg") else "pcd",
                "is_key_frame": key,
                "height": height,
                "width": width,
                "filename": filename,
                "prev": prev,
                "next": "",
            }
        )
