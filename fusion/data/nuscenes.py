"""nuScenes as a streaming PyTorch Dataset, read without the devkit, in the reference model's batch format.

Construction reads the 13 tables once (`fusion.data.nuscenes_tables`), turns the split into a compact plan
per sample (file paths, sensor transforms, ground-truth boxes) and lets the tables go; `__getitem__` reads
that sample's files and nothing else, so memory does not grow with the number of scenes, and DataLoader
workers only ever hold the sample they are building.

Per sample, as BEVFusion prepares it:
- the six key-frame camera JPEGs (Pillow), resized to the preset's input width and cropped to its height
  from the bottom (`camera_geometry.resize_crop`); the intrinsics and the image-augmentation matrix go
  into the per-sample camera geometry `frustum_cells`, cached per calibration;
- LIDAR_TOP: the key frame and `sweeps` earlier sweeps (the prev chain), each `.pcd.bin` float32 x 5, moved
  into the key-frame LiDAR frame through the ego poses (sensor -> ego -> global -> ego' -> sensor'), sweep
  points within 1 m of their sensor dropped (the car's own body), the time lag in seconds replacing the
  ring index as the fifth column; intensity is divided by 255 (nuScenes stores 0..255, the synthetic data 0..1);
- ground truth from sample_annotation (global -> key-frame LiDAR), the 10 detection classes, boxes with
  no LiDAR and no radar point dropped (as the devkit does), boxes outside the BEV grid dropped (as
  BEVFusion's ObjectRangeFilter), velocities from the neighbouring annotations (the devkit's rule).

The BEV frame is the key-frame LiDAR frame. Camera-to-LiDAR goes through the calibrated sensors only (the
ego motion between a camera's and the LiDAR's timestamp, tens of milliseconds, is not compensated; this
keeps the geometry a function of the calibration, as on a deployed car). Map layers are not read from
nuScenes: `bev_map` is all zeros (the nuScenes presets have no map head).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fusion.config import Config
from fusion.data.camera_geometry import CameraCalibration, FrustumCache, resize_crop
from fusion.data.nuscenes_tables import (
    DETECTION_CLASSES,
    NuScenesFormatError,
    load_tables,
    matrix_to_quaternion,
    pose_matrix,
    quaternion_to_matrix,
    split_scenes,
    yaw_of_quaternion,
)
from fusion.data.sparse_inputs import lidar_arrays
from fusion.data.targets import build_targets

LIDAR = "LIDAR_TOP"
POINT_COLUMNS = 5  # x, y, z, intensity, ring index: float32 each in a .pcd.bin
SWEEP_MIN_RANGE = 1.0  # metres; sweep points closer to their sensor are the ego vehicle (BEVFusion's remove_close)
# Our generic split names, in each version's official names.
SPLIT_ALIASES = {"v1.0-mini": {"train": "mini_train", "val": "mini_val"}}


@dataclass(frozen=True)
class SamplePlan:
    """Everything `__getitem__` needs about one sample, without the tables."""

    token: str
    image_paths: tuple[str, ...]
    intrinsics: np.ndarray  # (N, 3, 3) of the raw images
    camera_to_lidar: np.ndarray  # (N, 4, 4)
    lidar_paths: tuple[str, ...]  # key frame first, then the sweeps, nearest first
    lidar_to_key: np.ndarray  # (S, 4, 4): each file's LiDAR frame -> key-frame LiDAR frame
    time_lags: np.ndarray  # (S,) seconds before the key frame
    lidar_to_global: np.ndarray  # (4, 4)
    boxes: np.ndarray  # (K, 7) float32 x, y, z centre, l, w, h, yaw in the key-frame LiDAR frame
    labels: np.ndarray  # (K,) int64 into the config's classes
    velocities: np.ndarray  # (K, 2) float32 LiDAR-frame m/s; NaN where the devkit cannot estimate one


def check_lidar_file(path: str | Path, where: str = "") -> None:
    """A `.pcd.bin` must exist and hold whole points (one stat); `where` says whose file it is."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise NuScenesFormatError(f"missing LiDAR file {path}{where}") from None
    if size % (4 * POINT_COLUMNS):
        raise NuScenesFormatError(
            f"truncated LiDAR file {path}: {size} bytes is not a whole number of points (20 bytes each)"
        )


def read_points(path: str | Path) -> np.ndarray:
    """A `.pcd.bin` as float32 (P, 5); a missing or truncated file is a NuScenesFormatError naming it."""
    check_lidar_file(path)
    return np.fromfile(path, dtype=np.float32).reshape(-1, POINT_COLUMNS)


def read_image(path: str | Path) -> Image.Image:
    """An RGB image; a missing or unreadable file is a NuScenesFormatError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise NuScenesFormatError(f"missing camera image {path}") from None
    except OSError as error:
        raise NuScenesFormatError(f"unreadable camera image {path}: {error}") from None


def official_split(version: str, split: str) -> str:
    """The official split name: "train"/"val" are accepted for v1.0-mini as mini_train/mini_val."""
    return SPLIT_ALIASES.get(version, {}).get(split, split)


class NuScenesDataset(Dataset):
    """One official split of a nuScenes data root, streamed: each item reads its own files.

    `split`: mini_train / mini_val (v1.0-mini; "train" and "val" are read as those), train / val
    (v1.0-trainval). `sweeps`: earlier LiDAR sweeps per key frame (default: the preset's `lidar.sweeps`).
    Items have `make_sample`'s keys plus `frustum_cells` (P,) int64, `sample_token` (str),
    `lidar_to_global` (4, 4) float64, `velocities` (K, 2) (0 where unknown), the velocity targets
    `target_velocity` (K, 2) and `target_velocity_mask` (K,) (0 where the devkit's rule gives NaN), and the
    camera calibration the geometry came from: `camera_intrinsics` (N, 3, 3) of the raw images,
    `camera_to_lidar` (N, 4, 4), `image_aug` (N, 3, 3).
    """

    def __init__(
        self,
        config: Config,
        dataroot: str | Path,
        version: str,
        split: str,
        sweeps: int | None = None,
        check_files: bool = True,
    ):
        if tuple(config.data.classes) != DETECTION_CLASSES:
            raise ValueError(
                f"the config's classes {list(config.data.classes)} are not the nuScenes detection classes "
                "(use the nuscenes or nuscenes-tiny preset)"
            )
        if config.lidar.point_features != 5:
            raise ValueError("nuScenes points carry a time lag: the config needs lidar.point_features = 5")
        self.config = config
        self.dataroot = Path(dataroot)
        self.version = version
        self.split = official_split(version, split)
        self.sweeps = config.lidar.sweeps if sweeps is None else sweeps
        if self.sweeps < 0:
            raise ValueError(f"sweeps must be >= 0, got {self.sweeps}")
        self.channels = tuple(config.rig.channels)
        if len(self.channels) != config.rig.num_cameras:
            raise ValueError("the config names no camera channels (rig.channels): use a nuscenes preset")
        self.seed = 0
        self.plans = self._plan()
        if check_files:
            self.check_files()
        self.geometry = FrustumCache(config)

    def check_files(self) -> None:
        """Fail before any work on a missing image or LiDAR file or a truncated `.pcd.bin` (one stat per file)."""
        for plan in self.plans:
            for path in plan.image_paths:
                if not os.path.isfile(path):
                    raise NuScenesFormatError(f"missing camera image {path} (sample {plan.token})")
            for path in plan.lidar_paths:
                check_lidar_file(path, f" (sample {plan.token})")

    def _plan(self) -> list[SamplePlan]:
        tables = load_tables(self.dataroot, self.version)
        wanted = split_scenes(self.version, self.split)
        tokens = tables.split_sample_tokens(self.split)
        if not tokens:
            present = sorted(s.get("name", "?") for s in tables.tables["scene"])
            raise NuScenesFormatError(
                f"{self.dataroot / self.version}: no scene of split {self.split} ({len(wanted)} scenes, e.g. "
                f"{', '.join(wanted[:3])}) is present; scenes present: {', '.join(present[:6]) or 'none'}"
            )
        return [self._plan_sample(tables, token) for token in tokens]

    def _plan_sample(self, tables, token: str) -> SamplePlan:
        lidar = tables.key_frame(token, LIDAR)
        lidar_to_ego = pose_matrix(tables.get("calibrated_sensor", lidar["calibrated_sensor_token"]))
        ego_to_global = pose_matrix(tables.get("ego_pose", lidar["ego_pose_token"]))
        lidar_to_global = ego_to_global @ lidar_to_ego
        global_to_lidar = np.linalg.inv(lidar_to_global)
        ego_to_lidar = np.linalg.inv(lidar_to_ego)

        image_paths, intrinsics, camera_to_lidar = [], [], []
        for channel in self.channels:
            record = tables.key_frame(token, channel)
            calibration = tables.get("calibrated_sensor", record["calibrated_sensor_token"])
            image_paths.append(str(self.dataroot / tables.field(record, "filename", "sample_data")))
            intrinsics.append(np.asarray(tables.field(calibration, "camera_intrinsic", "calibrated_sensor"), float))
            camera_to_lidar.append(ego_to_lidar @ pose_matrix(calibration))

        files = [lidar, *tables.previous_sweeps(lidar, self.sweeps)]
        to_key, lags = [], []
        for record in files:
            sensor_to_ego = pose_matrix(tables.get("calibrated_sensor", record["calibrated_sensor_token"]))
            ego_to_global_s = pose_matrix(tables.get("ego_pose", record["ego_pose_token"]))
            to_key.append(global_to_lidar @ ego_to_global_s @ sensor_to_ego)
            lags.append(1e-6 * (lidar["timestamp"] - record["timestamp"]))

        boxes, labels, velocities = [], [], []
        grid = self.config.grid
        for ann in tables.sample_annotations(token):
            name = tables.detection_class(ann)  # an unknown category is an error naming the annotation
            if name is None or ann.get("num_lidar_pts", 0) + ann.get("num_radar_pts", 0) == 0:
                continue
            centre = global_to_lidar @ np.array([*ann["translation"], 1.0])
            if not (grid.x_range[0] <= centre[0] < grid.x_range[1] and grid.y_range[0] <= centre[1] < grid.y_range[1]):
                continue
            width, length, height = ann["size"]
            rotation = global_to_lidar[:3, :3] @ quaternion_to_matrix(ann["rotation"])
            yaw = yaw_of_quaternion(matrix_to_quaternion(rotation))
            velocity = global_to_lidar[:3, :3] @ tables.box_velocity(ann)  # NaN stays NaN: not supervised
            boxes.append([*centre[:3], length, width, height, yaw])
            labels.append(DETECTION_CLASSES.index(name))
            velocities.append(velocity[:2])
        return SamplePlan(
            token=token,
            image_paths=tuple(image_paths),
            intrinsics=np.stack(intrinsics),
            camera_to_lidar=np.stack(camera_to_lidar),
            lidar_paths=tuple(str(self.dataroot / tables.field(r, "filename", "sample_data")) for r in files),
            lidar_to_key=np.stack(to_key),
            time_lags=np.array(lags),
            lidar_to_global=lidar_to_global,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 7),
            labels=np.array(labels, dtype=np.int64),
            velocities=np.array(velocities, dtype=np.float32).reshape(-1, 2),
        )

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def sample_tokens(self) -> list[str]:
        return [plan.token for plan in self.plans]

    def images(self, plan: SamplePlan) -> tuple[np.ndarray, np.ndarray]:
        """Input images (N, 3, H, W) uint8 and the raw-to-input pixel maps (N, 3, 3)."""
        height, width = self.config.rig.image_height, self.config.rig.image_width
        images, augs = [], []
        for path in plan.image_paths:
            image = read_image(path)
            try:
                _, (new_height, new_width), (top, left), aug = resize_crop(image.height, image.width, height, width)
            except ValueError as error:
                raise NuScenesFormatError(f"camera image {path}: {error}") from None
            image = image.resize((new_width, new_height), Image.BILINEAR)
            image = image.crop((left, top, left + width, top + height))
            images.append(np.asarray(image).transpose(2, 0, 1))
            augs.append(aug)
        return np.stack(images), np.stack(augs)

    def points(self, plan: SamplePlan) -> np.ndarray:
        """Key frame and sweeps in the key-frame LiDAR frame: (P, 5) x, y, z, intensity / 255, time lag."""
        clouds = []
        for index, (path, transform, lag) in enumerate(zip(plan.lidar_paths, plan.lidar_to_key, plan.time_lags)):
            raw = read_points(path)
            if index > 0:
                raw = raw[np.hypot(raw[:, 0], raw[:, 1]) >= SWEEP_MIN_RANGE]
            xyz = raw[:, :3].astype(np.float64) @ transform[:3, :3].T + transform[:3, 3]
            cloud = np.empty((len(raw), 5), dtype=np.float32)
            cloud[:, :3] = xyz
            cloud[:, 3] = raw[:, 3] / 255.0
            cloud[:, 4] = lag
            clouds.append(cloud)
        return np.concatenate(clouds)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.plans):
            raise IndexError(f"sample {index} of a {len(self.plans)}-sample split")
        config, plan = self.config, self.plans[index]
        images, augs = self.images(plan)
        cells = self.geometry(CameraCalibration(plan.intrinsics, plan.camera_to_lidar, augs))
        rng = np.random.default_rng([self.seed, index])
        lidar = lidar_arrays(self.points(plan), config, rng)  # pillars or voxels + rulebooks

        k_max = config.data.max_objects
        count = min(len(plan.boxes), k_max)
        boxes = np.zeros((k_max, 7), dtype=np.float32)
        labels = np.full(k_max, -1, dtype=np.int64)
        velocities = np.zeros((k_max, 2), dtype=np.float32)
        boxes[:count], labels[:count], velocities[:count] = (
            plan.boxes[:count],
            plan.labels[:count],
            np.nan_to_num(plan.velocities[:count]),  # the item's `velocities`: 0 where unknown
        )
        grid = config.grid
        sample = {
            "images": images,
            **lidar,
            "boxes": boxes,
            "labels": labels,
            "bev_map": np.zeros((len(config.data.map_classes), grid.size_y, grid.size_x), dtype=np.uint8),
            "frustum_cells": cells.copy(),
            "sample_token": plan.token,
            "lidar_to_global": plan.lidar_to_global.copy(),
            "velocities": velocities,
            "camera_intrinsics": plan.intrinsics.copy(),
            "camera_to_lidar": plan.camera_to_lidar.copy(),
            "image_aug": augs,
        }
        sample.update(
            build_targets(
                plan.boxes[:count], plan.labels[:count], grid, len(config.data.classes), k_max, plan.velocities[:count]
            )
        )
        return sample
