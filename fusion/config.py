"""Configuration: plain dataclasses, presets (synthetic, nuScenes, BEVFusion-shaped), strict loading.

Every run is described by one `Config`. It is stored as JSON next to every checkpoint, so a model
can always be rebuilt from its files alone. Unknown keys are an error, never silently ignored: a
typo in an override must not train the wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from fusion.data.nuscenes_tables import DETECTION_CLASSES


class ConfigError(ValueError):
    """A configuration that cannot describe a valid run."""


@dataclass
class BEVGrid:
    """The fused bird's-eye-view grid (ego frame: x forward, y left, z up; metres)."""

    x_range: tuple[float, float] = (-25.6, 25.6)
    y_range: tuple[float, float] = (-25.6, 25.6)
    z_range: tuple[float, float] = (-2.0, 4.0)
    cell: float = 0.8

    @property
    def size_x(self) -> int:
        return round((self.x_range[1] - self.x_range[0]) / self.cell)

    @property
    def size_y(self) -> int:
        return round((self.y_range[1] - self.y_range[0]) / self.cell)


@dataclass
class CameraRig:
    """A ring of identical pinhole cameras at one height, evenly spaced in yaw (camera 0 looks forward)."""

    num_cameras: int = 4
    image_height: int = 64
    image_width: int = 128
    hfov_deg: float = 90.0
    mount_height: float = 1.6
    pitch_deg: float = 4.0  # positive looks down
    # nuScenes camera channels in the order the images are stacked (empty for synthetic data); the default
    # order follows the ring (yaw 0, 60, ... degrees), so the fixed rig approximates a nuScenes car.
    channels: tuple[str, ...] = ()


@dataclass
class LidarConfig:
    """A spinning LiDAR at the ego origin, and how its points are grouped into pillars."""

    num_beams: int = 32
    elevation_deg: tuple[float, float] = (-24.0, 4.0)
    azimuth_steps: int = 1024
    mount_height: float = 1.8
    max_range: float = 40.0
    range_noise: float = 0.02
    max_pillars: int = 2560
    max_points_per_pillar: int = 16
    sweeps: int = 0  # earlier sweeps merged into each key frame (nuScenes: 9, as BEVFusion)
    point_features: int = 4  # 4: x, y, z, intensity; 5 adds the time lag of multi-sweep points
    # Hard voxelisation for the sparse voxel encoder (model.lidar_encoder = "sparse"), over the BEV grid's x, y and
    # z ranges: voxel (x, y, z) in metres, at most `max_voxels` voxels (the static row count) of at most
    # `max_points_per_voxel` points each. Defaults: BEVFusion's nuScenes settings (its test-time voxel cap).
    voxel_size: tuple[float, float, float] = (0.075, 0.075, 0.2)
    max_voxels: int = 160000
    max_points_per_voxel: int = 10
    # Rows (output sites) of each strided sparse conv's level in an exported graph, one per strided conv in forward
    # order: ONNX graphs have static shapes, so every cloud's rulebooks are padded to these (a cloud with more sites
    # is refused, never cut). () lets `altermoma export onnx` derive them from the clouds it exports with (25%
    # headroom, said in its report); set them to the most your sensor's clouds need, as CUDA-BEVFusion fixes its
    # buffers.
    sparse_rows: tuple[int, ...] = ()


@dataclass
class DataConfig:
    """The synthetic driving scenes and their sensor degradations."""

    classes: tuple[str, ...] = ("car", "truck", "pedestrian")
    map_classes: tuple[str, ...] = ("drivable_area", "lane_divider")
    objects_per_scene: tuple[int, int] = (8, 18)
    distractors_per_scene: tuple[int, int] = (6, 12)
    max_objects: int = 64
    camera_brightness: float = 1.0  # < 1 darkens every image
    camera_noise: float = 0.02  # pixel noise std (images in [0, 1])
    lidar_beam_dropout: float = 0.0  # fraction of beams removed
    lidar_point_dropout: float = 0.05  # fraction of returns lost
    # Sensor-physics knobs of the modality balance (defaults: the `tiny` benchmark's data, bit for bit).
    camera_blur: float = 0.0  # Gaussian optical blur, std in pixels (defocus, motion, a low-grade lens)
    camera_haze_range: float = 120.0  # metres over which contrast fades towards the sky (fog, dusk, rain)
    lidar_material_contrast: float = 0.0  # 0: reflectivity independent of material; 1: set by each surface's material
    train_scenes: int = 2000
    val_scenes: int = 200
    train_seed: int = 0
    val_seed: int = 1


@dataclass
class ModelConfig:
    """Widths and depths of the BEVFusion-style reference model."""

    camera_depth: int = 18  # ResNet 18/34/50/101
    camera_width: float = 0.25  # ResNet width multiplier (1.0 = 64 stem channels)
    fpn_channels: int = 32
    feature_stride: int = 8  # image-feature stride the view transform lifts
    depth_bins: tuple[float, float, float] = (1.0, 33.0, 1.0)  # start, stop, step (metres)
    camera_bev_channels: int = 32
    bev_pool_factor: int = 1  # camera features are pooled on a grid this many times finer
    pool_method: str = "scatter"  # "scatter" (ScatterElements-add) or "cumsum" (gathers only)
    pillar_channels: int = 32
    lidar_channels: int = 32
    lidar_blocks: int = 2
    fuser: str = "conv"  # "conv" (BEVFusion-MIT ConvFuser) or "se" (concat, conv, squeeze-excite)
    fuser_channels: int = 32
    decoder_channels: tuple[int, int] = (32, 64)
    decoder_layers: tuple[int, int] = (2, 2)
    decoder_up_channels: int = 32
    head_channels: int = 32
    seg_head: bool = True
    # CenterPoint's velocity branch (vx, vy in the LiDAR frame, m/s): on for the nuScenes presets only, whose
    # ground truth has velocities (synthetic scenes are static), so mAVE measures the model, not zeros.
    velocity_head: bool = False
    # Camera backbone: "resnet" (camera_depth, camera_width) or "swin" (the swin_* fields; defaults: Swin-T).
    camera_backbone: str = "resnet"
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    swin_drop_path: float = 0.2
    # LiDAR encoder: "pillars" (PointPillars: pillar_channels, lidar_channels, lidar_blocks) or "sparse" (the
    # SECOND/VoxelNet sparse voxel encoder of mmdet3d on lidar.voxel_size voxels; defaults: BEVFusion's). Stages of
    # residual SubM blocks, a strided conv (padding z, y, x from sparse_down_padding) closing each stage but the last.
    lidar_encoder: str = "pillars"
    sparse_base_channels: int = 16
    sparse_channels: tuple[tuple[int, ...], ...] = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128))
    sparse_down_padding: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 1, 1), (0, 1, 1))
    sparse_out_channels: int = 128
    # The sparse convs' implementation: "plain" (common.sparse: rulebooks from preprocessing, trains on the CPU,
    # exports to ONNX) or "spconv" (spconv 2.x: its own rulebooks, CUDA training, spconv deployments). The
    # parameters are the same, so a checkpoint of one loads into the other.
    sparse_backend: str = "plain"
    # Detection head: "centerpoint" (dense, head_channels wide) or "transfusion" (TransFusion's query head:
    # the transfusion_* fields, its prediction branches head_channels wide; defaults: BEVFusion's nuScenes head).
    head: str = "centerpoint"
    transfusion_channels: int = 128
    transfusion_proposals: int = 200
    transfusion_heads: int = 8
    transfusion_ffn: int = 256

    @property
    def num_depth_bins(self) -> int:
        start, stop, step = self.depth_bins
        return int(math.floor((stop - start) / step + 1e-6))


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 500


@dataclass
class Config:
    preset: str = "tiny"
    grid: BEVGrid = field(default_factory=BEVGrid)
    rig: CameraRig = field(default_factory=CameraRig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "config")

    def validate(self) -> Config:
        """Reject combinations that would only fail later, deep inside a forward pass."""
        m = self.model
        if m.camera_depth not in (18, 34, 50, 101):
            raise ConfigError(f"model.camera_depth must be 18, 34, 50 or 101, got {m.camera_depth}")
        for name, value, choices in (
            ("camera_backbone", m.camera_backbone, CAMERA_BACKBONES),
            ("lidar_encoder", m.lidar_encoder, LIDAR_ENCODERS),
            ("head", m.head, HEADS),
        ):
            if value not in choices:
                raise ConfigError(f"model.{name} must be one of {', '.join(choices)}, got {value!r}")
        if m.camera_backbone == "swin":
            _check_swin(m)
        if m.lidar_encoder == "sparse":
            _check_sparse(self)
        if m.head == "transfusion":
            _check_transfusion(self)
        if m.fuser not in ("conv", "se"):
            raise ConfigError(f"model.fuser must be 'conv' or 'se', got {m.fuser!r}")
        if m.pool_method not in ("scatter", "cumsum"):
            raise ConfigError(f"model.pool_method must be 'scatter' or 'cumsum', got {m.pool_method!r}")
        if m.feature_stride not in (8, 16):
            raise ConfigError(f"model.feature_stride must be 8 or 16, got {m.feature_stride}")
        for name, size in (("image_height", self.rig.image_height), ("image_width", self.rig.image_width)):
            if size % 32:
                raise ConfigError(f"rig.{name} must be a multiple of 32, got {size}")
        if self.rig.channels and len(self.rig.channels) != self.rig.num_cameras:
            raise ConfigError(
                f"rig.channels names {len(self.rig.channels)} cameras but rig.num_cameras is {self.rig.num_cameras}"
            )
        if self.lidar.point_features not in (4, 5):
            raise ConfigError(f"lidar.point_features must be 4 or 5, got {self.lidar.point_features}")
        if self.lidar.sweeps < 0:
            raise ConfigError(f"lidar.sweeps must be >= 0, got {self.lidar.sweeps}")
        if self.grid.size_x % 4 or self.grid.size_y % 4:
            raise ConfigError("the BEV grid must have a multiple of 4 cells per side")
        if m.num_depth_bins < 1:
            raise ConfigError(f"model.depth_bins {m.depth_bins} gives no depth bin")
        t = self.train
        for name in ("steps", "batch_size", "threads", "checkpoint_every"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.warmup_steps < 0 or not t.lr > 0 or t.weight_decay < 0:
            raise ConfigError("train.warmup_steps and train.weight_decay must be >= 0 and train.lr > 0")
        if self.data.train_scenes < 1 or self.data.val_scenes < 1:
            raise ConfigError("data.train_scenes and data.val_scenes must be >= 1")
        d = self.data
        if d.camera_blur < 0 or not d.camera_haze_range > 0 or not 0.0 <= d.lidar_material_contrast <= 1.0:
            raise ConfigError("data.camera_blur must be >= 0, camera_haze_range > 0, lidar_material_contrast in [0, 1]")
        return self


CAMERA_BACKBONES = ("resnet", "swin")
LIDAR_ENCODERS = ("pillars", "sparse")
SPARSE_BACKENDS = ("plain", "spconv")  # fusion.models.sparse_encoder.BACKENDS, without importing torch
HEADS = ("centerpoint", "transfusion")


def _check_swin(m: ModelConfig) -> None:
    if len(m.swin_depths) != len(m.swin_heads) or len(m.swin_depths) < 3:
        raise ConfigError("model.swin_depths and model.swin_heads need one entry per stage (at least 3 stages)")
    for i, heads in enumerate(m.swin_heads):
        width = m.swin_embed_dim * 2**i
        if heads < 1 or width % heads:
            raise ConfigError(f"Swin stage {i} has {width} channels, not divisible into {heads} heads")
    if m.swin_window < 1 or min(m.swin_depths) < 1 or not 0.0 <= m.swin_drop_path < 1.0:
        raise ConfigError("model.swin_window and model.swin_depths must be >= 1, swin_drop_path in [0, 1)")


def _check_sparse(config: Config) -> None:
    """The sparse encoder's BEV output must be the BEV grid: voxel size, grid and strided convs must agree."""
    m, lidar, grid = config.model, config.lidar, config.grid
    if min(lidar.voxel_size) <= 0 or lidar.max_voxels < 1 or lidar.max_points_per_voxel < 1:
        raise ConfigError("lidar.voxel_size must be positive, lidar.max_voxels and max_points_per_voxel >= 1")
    strided = len(m.sparse_channels)  # one strided conv closing every stage but the last, and conv_out
    if lidar.sparse_rows and (len(lidar.sparse_rows) != strided or min(lidar.sparse_rows) < 1):
        raise ConfigError(
            f"lidar.sparse_rows needs one positive row count per strided sparse conv ({strided}), "
            f"got {list(lidar.sparse_rows)}"
        )
    if m.sparse_backend not in SPARSE_BACKENDS:
        raise ConfigError(f"model.sparse_backend must be one of {', '.join(SPARSE_BACKENDS)}, got {m.sparse_backend!r}")
    if len(m.sparse_down_padding) != len(m.sparse_channels) - 1:
        raise ConfigError(
            f"model.sparse_down_padding needs one (z, y, x) padding per strided conv: {len(m.sparse_channels) - 1} "
            f"for {len(m.sparse_channels)} stages, got {len(m.sparse_down_padding)}"
        )
    from fusion.models.sparse_encoder import SparseEncoder  # torch-backed; imported only for sparse configs

    try:
        geometry = SparseEncoder(
            1,
            sparse_shape(config),
            m.sparse_base_channels,
            m.sparse_out_channels,
            m.sparse_channels,
            sparse_paddings(m),
        )
    except ValueError as error:
        raise ConfigError(f"model.sparse_*: {error}") from None
    _, height, width = geometry.output_shape
    if (height, width) != (grid.size_y, grid.size_x):
        raise ConfigError(
            f"the sparse encoder's BEV output is {height} x {width} cells, the BEV grid {grid.size_y} x {grid.size_x}: "
            f"lidar.voxel_size {list(lidar.voxel_size)} must be grid.cell / 2**(strided convs)"
        )


def _check_transfusion(config: Config) -> None:
    m = config.model
    if m.transfusion_heads < 1 or m.transfusion_channels % m.transfusion_heads:
        raise ConfigError(
            f"model.transfusion_channels {m.transfusion_channels} must divide into {m.transfusion_heads} heads"
        )
    cells = config.grid.size_x * config.grid.size_y * len(config.data.classes)
    if not 1 <= m.transfusion_proposals <= cells:
        raise ConfigError(f"model.transfusion_proposals must be in [1, {cells}], got {m.transfusion_proposals}")


def point_cloud_range(grid: BEVGrid) -> tuple[float, float, float, float, float, float]:
    """The voxelised region (x, y, z min, then max): the BEV grid's box."""
    return (grid.x_range[0], grid.y_range[0], grid.z_range[0], grid.x_range[1], grid.y_range[1], grid.z_range[1])


def sparse_shape(config: Config) -> tuple[int, int, int]:
    """The sparse encoder's (z, y, x) grid: the voxel grid plus one z slice, as mmdet3d and BEVFusion set it
    (`sparse_shape = grid_size[::-1] + [1, 0, 0]`), so that BEVFusion's four z halvings leave two slices."""
    from fusion.data.voxelize import grid_shape

    z, y, x = grid_shape(point_cloud_range(config.grid), config.lidar.voxel_size)
    return z + 1, y, x


def sparse_paddings(m: ModelConfig) -> tuple[tuple, ...]:
    """`SparseEncoder(encoder_paddings=...)` from the config: the strided conv of stage i has padding
    `sparse_down_padding[i]`; SubM blocks ignore their padding entry (0)."""
    stages = []
    for i, stage in enumerate(m.sparse_channels):
        last = m.sparse_down_padding[i] if i < len(m.sparse_down_padding) else 0
        stages.append((0,) * (len(stage) - 1) + (last,))
    return tuple(stages)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a dataclass from a dict, refusing keys it does not have."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _typed(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _typed(value: Any, default: Any, where: str) -> Any:
    """`value` checked against the type of the field's default (ints are accepted for floats); a wrong
    type is a one-line error before any work, not a TypeError deep inside rendering or training."""
    if default is None:
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if default and len(value) != len(default) and len({type(d) for d in default}) > 1:
            raise ConfigError(f"{where} must have {len(default)} entries, got {len(value)}")
        kind = default[0] if default else None
        return tuple(_typed(v, kind, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _tiny() -> Config:
    return Config(preset="tiny")


def _small() -> Config:
    return Config(
        preset="small",
        grid=BEVGrid(x_range=(-51.2, 51.2), y_range=(-51.2, 51.2), cell=0.8),
        rig=CameraRig(num_cameras=6, image_height=128, image_width=352, hfov_deg=70.0),
        lidar=LidarConfig(max_range=60.0, max_pillars=8000, azimuth_steps=1536),
        model=ModelConfig(
            camera_width=0.5,
            fpn_channels=64,
            depth_bins=(1.0, 52.0, 1.0),
            camera_bev_channels=48,
            bev_pool_factor=2,
            pillar_channels=64,
            lidar_channels=64,
            fuser_channels=64,
            decoder_channels=(64, 128),
            decoder_layers=(3, 3),
            decoder_up_channels=64,
            head_channels=64,
        ),
    )


def _r50() -> Config:
    """BEVFusion-R50 sizes: 6 cameras at 256x704 and a 180x180 BEV (0.6 m over +-54 m)."""
    return Config(
        preset="r50",
        grid=BEVGrid(x_range=(-54.0, 54.0), y_range=(-54.0, 54.0), z_range=(-5.0, 3.0), cell=0.6),
        rig=CameraRig(num_cameras=6, image_height=256, image_width=704, hfov_deg=70.0),
        lidar=LidarConfig(max_range=70.0, max_pillars=30000, max_points_per_pillar=20, azimuth_steps=2048),
        model=ModelConfig(
            camera_depth=50,
            camera_width=1.0,
            fpn_channels=256,
            depth_bins=(1.0, 60.0, 0.5),
            camera_bev_channels=80,
            bev_pool_factor=2,
            pillar_channels=64,
            lidar_channels=256,
            lidar_blocks=3,
            fuser_channels=256,
            decoder_channels=(128, 256),
            decoder_layers=(5, 5),
            decoder_up_channels=256,
            head_channels=64,
        ),
    )


NUSCENES_CLASSES = DETECTION_CLASSES  # the 10 classes of the detection challenge, in the devkit's order
# Camera channels in ring order (yaw 0, +60, +120, 180, -120, -60 degrees), where nuScenes mounts them.
NUSCENES_CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT", "CAM_FRONT_RIGHT")


def _nuscenes() -> Config:
    """nuScenes with BEVFusion-R50 sizes: 6 cameras at 256x704, a 180x180 BEV over +-54 m in the LiDAR frame,
    the 10 detection classes, 9 earlier sweeps with the time lag as a fifth point feature. No map head:
    map layers are not read from nuScenes (its map files are not parsed)."""
    config = _r50()
    config.preset = "nuscenes"
    config.rig.channels = NUSCENES_CAMERAS
    config.lidar = LidarConfig(
        elevation_deg=(-30.0, 10.0),
        azimuth_steps=1084,  # 32 x 1084: about the 34k points of one nuScenes sweep
        mount_height=1.84,
        max_range=70.0,
        max_pillars=30000,
        max_points_per_pillar=20,
        sweeps=9,
        point_features=5,
    )
    config.data = DataConfig(classes=NUSCENES_CLASSES, max_objects=500)
    config.model.seg_head = False
    config.model.velocity_head = True
    return config


def _nuscenes_tiny() -> Config:
    """A CPU-sized nuScenes layout for tests: 6 cameras at 64x192, +-54 m at 1.5 m cells, 2 sweeps."""
    return Config(
        preset="nuscenes-tiny",
        grid=BEVGrid(x_range=(-54.0, 54.0), y_range=(-54.0, 54.0), z_range=(-5.0, 3.0), cell=1.5),
        rig=CameraRig(num_cameras=6, image_height=64, image_width=192, hfov_deg=70.0, channels=NUSCENES_CAMERAS),
        lidar=LidarConfig(
            num_beams=16,
            elevation_deg=(-30.0, 10.0),
            azimuth_steps=512,
            mount_height=1.84,
            max_range=60.0,
            max_pillars=2560,
            max_points_per_pillar=16,
            sweeps=2,
            point_features=5,
        ),
        data=DataConfig(classes=NUSCENES_CLASSES, max_objects=128),
        model=ModelConfig(depth_bins=(1.0, 55.0, 2.0), seg_head=False, velocity_head=True),
    )


def _tiny_balanced() -> Config:
    """The tiny model on nuScenes-balanced data: sensor physics (fewer look-alike distractors, material
    reflectivity the LiDAR reads, a hazy, blurred, noisy camera) aim LiDAR-only at 0.90-0.96 of fusion mAP
    and the camera at 0.45-0.60, as BEVFusion reports on nuScenes (64.7 and 35.6 of 68.5 mAP)."""
    config = _tiny()
    config.preset = "tiny-balanced"
    config.data = DataConfig(
        distractors_per_scene=(1, 3),
        camera_brightness=0.7,
        camera_noise=0.08,
        camera_blur=1.0,
        camera_haze_range=45.0,
        lidar_material_contrast=0.4,
        lidar_point_dropout=0.25,
    )
    config.lidar.num_beams = 16
    return config


def _bevfusion_tiny() -> Config:
    """BEVFusion's deployed structure at a CPU-trainable size, on the tiny-balanced synthetic data: a Swin camera
    (Swin-T's depths 2-2-6-2 at swin_cpu's width: embed 32, 32 channels per head, window 4), a plain-backend
    sparse voxel encoder on 0.2 x 0.2 x 0.3 m voxels (three stages of mmdet3d's SparseEncoder, two strided
    convs, z folded to two slices), the ConvFuser, SECOND + SECONDFPN, and a TransFusion head (64 proposals, no
    BEV map head). Sized so that the two backbones hold >= 60% of the GFLOPs, as in BEVFusion
    (docs/bevfusion_presets.md)."""
    config = _tiny_balanced()
    config.preset = "bevfusion-tiny"
    config.lidar.voxel_size = (0.2, 0.2, 0.3)
    config.lidar.max_voxels = BEVFUSION_TINY_MAX_VOXELS
    config.lidar.max_points_per_voxel = 10
    # Exported graphs' sites per level (spconv1, spconv2, conv_out): the most of 120 scenes (60 train, 60 val:
    # 3499, 1722, 1531; voxels at most 4180 of the 5000) plus 25%, rounded up to 64.
    config.lidar.sparse_rows = (4416, 2176, 1920)
    config.model = ModelConfig(
        camera_backbone="swin",
        swin_embed_dim=32,
        swin_depths=(2, 2, 6, 2),
        swin_heads=(1, 2, 4, 8),
        swin_window=4,
        swin_drop_path=0.0,
        camera_bev_channels=24,
        lidar_encoder="sparse",
        sparse_base_channels=16,
        sparse_channels=((16, 16, 32), (32, 32, 64), (64, 64)),
        sparse_down_padding=((1, 1, 1), (0, 1, 1)),
        sparse_out_channels=32,
        decoder_layers=(1, 1),
        head="transfusion",
        head_channels=32,
        transfusion_channels=32,
        transfusion_proposals=64,
        transfusion_heads=4,
        transfusion_ffn=64,
        seg_head=False,
    )
    return config


def _bevfusion_r50() -> Config:
    """BEVFusion (MIT) nuScenes detector sizes with a ResNet-50 camera: the `nuscenes` preset (6 cameras at
    256x704, LSS to a 180x180 BEV of 0.6 m, 10 classes, 9 sweeps) with BEVFusion's sparse voxel encoder
    (0.075 x 0.075 x 0.2 m voxels, a 1440 x 1440 x 41 grid) and TransFusion head (200 proposals, velocity)."""
    config = _nuscenes()
    config.preset = "bevfusion-r50"
    config.lidar.voxel_size = (0.075, 0.075, 0.2)
    config.model.lidar_encoder = "sparse"
    config.model.head = "transfusion"
    return config


def _bevfusion_swint() -> Config:
    """BEVFusion (MIT) as published: `bevfusion-r50` with the Swin-T camera backbone (drop-path 0.2)."""
    config = _bevfusion_r50()
    config.preset = "bevfusion-swint"
    config.model.camera_backbone = "swin"
    return config


BEVFUSION_TINY_MAX_VOXELS = 5000

PRESETS = {
    "tiny": _tiny,
    "tiny-balanced": _tiny_balanced,
    "small": _small,
    "r50": _r50,
    "nuscenes": _nuscenes,
    "nuscenes-tiny": _nuscenes_tiny,
    "bevfusion-tiny": _bevfusion_tiny,
    "bevfusion-r50": _bevfusion_r50,
    "bevfusion-swint": _bevfusion_swint,
}


def get_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """A preset, with optional dotted overrides such as {"model.fuser": "se"}."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    data = PRESETS[preset]().to_dict()
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {dotted!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key {dotted!r}")
        node[leaf] = value
    return Config.from_dict(data).validate()


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as JSON when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
