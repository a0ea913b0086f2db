"""Camera geometry per calibration: the BEV cell of every LSS frustum point, from intrinsics and extrinsics.

The reference model's view transform bakes one fixed rig into constant index buffers (`fusion.models.lss`).
Real data has a calibration per vehicle (nuScenes: per log), and every image is resized and cropped to the
network's input size, so the data pipeline computes the frustum-to-cell indices of each sample here and
hands them to the model as the `frustum_cells` input (B, P) int64; pooling then scatter-adds with that
per-sample index, a static-shape op (no sort, unique or nonzero in the forward pass). The result depends
only on the calibrated sensors and the image augmentation, so it is cached per calibration set
(`FrustumCache`), as NVIDIA's CUDA-BEVFusion recomputes its geometry only when the calibration changes.

For export to one car, `bake_calibration` turns one calibration into the model's constant buffers, so the
exported graph keeps its fixed-rig form (gather + scatter-add or gather + cumsum).

Frames: cameras x right, y down, z forward; the BEV frame is the key-frame LiDAR frame (nuScenes) or the
ego frame (synthetic rig). A frustum point at camera depth d through input pixel (u, v) is
`t + R @ (d * K^-1 @ A^-1 @ [u, v, 1])` with A the 3x3 image-augmentation matrix (input pixel = A @ raw pixel).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fusion.config import Config
from fusion.geometry import bev_cell_index, camera_intrinsics, camera_to_ego


@dataclass(frozen=True)
class CameraCalibration:
    """The cameras of one sample as the network sees them: (N, 3, 3) intrinsics of the raw image, (N, 4, 4)
    camera-to-BEV-frame transforms and (N, 3, 3) raw-to-input pixel maps (resize and crop)."""

    intrinsics: np.ndarray
    camera_to_frame: np.ndarray
    image_aug: np.ndarray

    def key(self) -> bytes:
        """A hashable digest of the calibration (exact float64 bytes) for caches."""
        return b"".join(np.ascontiguousarray(a, dtype=np.float64).tobytes() for a in self.arrays())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.intrinsics, self.camera_to_frame, self.image_aug


def rig_calibration(config: Config) -> CameraCalibration:
    """The synthetic ring rig of `config` as a calibration (identity image augmentation)."""
    n = config.rig.num_cameras
    rotations, origins = camera_to_ego(config.rig)
    transforms = np.tile(np.eye(4), (n, 1, 1))
    transforms[:, :3, :3] = rotations
    transforms[:, :3, 3] = origins
    return CameraCalibration(
        intrinsics=np.tile(camera_intrinsics(config.rig), (n, 1, 1)),
        camera_to_frame=transforms,
        image_aug=np.tile(np.eye(3), (n, 1, 1)),
    )


def resize_crop(
    raw_height: int, raw_width: int, height: int, width: int
) -> tuple[float, tuple[int, int], tuple[int, int], np.ndarray]:
    """BEVFusion's test-time image transform: resize to the input width, keep the bottom `height` rows.

    Returns the scale, the resized (height, width), the crop's (top, left) and the 3x3 matrix taking raw
    pixel coordinates to input ones. As mmdet3d's ImageAug3D at test time (bot_pct_lim (0, 0)): resized
    size int(raw * scale), crop top = resized height - height. The matrix uses each axis's exact scale
    (resized / raw size), in continuous pixel coordinates (0 at the image's edge, as Pillow resizes).
    """
    scale = width / raw_width
    new_height, new_width = int(raw_height * scale), int(raw_width * scale)
    if new_height < height:
        raise ValueError(
            f"a {raw_width}x{raw_height} image resized to width {width} is {new_height} rows high, "
            f"fewer than the {height} the input needs"
        )
    top, left = new_height - height, (new_width - width) // 2
    aug = np.array(
        [[new_width / raw_width, 0.0, -left], [0.0, new_height / raw_height, -top], [0.0, 0.0, 1.0]], dtype=np.float64
    )
    return scale, (new_height, new_width), (top, left), aug


def frustum_points(config: Config, calibration: CameraCalibration) -> np.ndarray:
    """BEV-frame positions (N, D, h, w, 3) of every frustum point (camera, depth bin, feature row, column)."""
    m = config.model
    start, _, step = m.depth_bins
    depths = start + step * np.arange(m.num_depth_bins)
    stride = m.feature_stride
    h, w = config.rig.image_height // stride, config.rig.image_width // stride
    # Same arithmetic, in the same order, as fusion.geometry.pixel_rays and fusion.models.lss.frustum_cells,
    # so the fixed rig gives bit-identical cells both ways.
    v, u = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # (h, w, 3) input pixels
    intrinsics, transforms, augs = calibration.arrays()
    rays = []
    for k, transform, aug in zip(intrinsics, transforms, augs):
        raw = pix @ np.linalg.inv(aug).T
        cam = raw @ np.linalg.inv(k).T  # camera-frame direction with z = 1
        rays.append(np.einsum("ij,hwj->hwi", transform[:3, :3], cam))
    rays = np.stack(rays)
    origins = transforms[:, :3, 3]
    return origins[:, None, None, None, :] + depths[None, :, None, None, None] * rays[:, None]


def frustum_cells_for(config: Config, calibration: CameraCalibration) -> np.ndarray:
    """Pooled-grid cell (P,) int64 of every frustum point, -1 outside the grid; P = N * D * h * w."""
    points = frustum_points(config, calibration)
    cell = config.grid.cell / config.model.bev_pool_factor
    return bev_cell_index(points.reshape(-1, 3), config.grid, cell=cell)


def num_frustum_points(config: Config) -> int:
    """P, the length of `frustum_cells`: fixed by the preset, whatever the calibration."""
    stride = config.model.feature_stride
    rig = config.rig
    return rig.num_cameras * config.model.num_depth_bins * (rig.image_height // stride) * (rig.image_width // stride)


class FrustumCache:
    """`frustum_cells_for` memoised per calibration (least recently used first out).

    A calibration changes per vehicle or per log, not per sample, so a handful of entries serve a whole
    split; each entry is P int64 (16 MB at BEVFusion-R50 sizes), hence the small default.
    """

    def __init__(self, config: Config, max_entries: int = 4):
        self.config = config
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.misses = 0

    def __call__(self, calibration: CameraCalibration) -> np.ndarray:
        key = calibration.key()
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        cells = frustum_cells_for(self.config, calibration)
        cells.setflags(write=False)
        self.entries[key] = cells
        if len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return cells


def bake_calibration(model, config: Config, calibration: CameraCalibration) -> None:
    """Fix the model's camera geometry to one calibration (a user's car) for export.

    The view transform's constant pooling buffers are rebuilt from `calibration`, so a forward pass
    without `frustum_cells` (and the exported ONNX graph, in either pooling form) lifts with this
    vehicle's cameras. The buffers are not part of the state dict: a reloaded checkpoint lifts with
    the preset's rig again until this is called.
    """
    camera = getattr(model, "camera", None)
    if camera is None:
        raise ValueError("the model has no camera branch: there is no camera geometry to fix")
    camera.vtransform.set_frustum_cells(frustum_cells_for(config, calibration))
