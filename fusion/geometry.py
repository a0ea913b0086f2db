"""Sensor geometry shared by the data renderer and the model's view transform.

One module owns the camera rig so that the pixels the renderer draws and the frustum the model lifts
are the same rays: a mismatch here would silently cost the camera branch all of its depth cues.
Conventions: ego frame x forward, y left, z up; camera frame x right, y down, z along the optical axis.
"""

from __future__ import annotations

import math

import numpy as np

from fusion.config import BEVGrid, CameraRig, LidarConfig


def camera_intrinsics(rig: CameraRig) -> np.ndarray:
    """3x3 pinhole matrix shared by every camera of the ring."""
    fx = (rig.image_width / 2.0) / math.tan(math.radians(rig.hfov_deg) / 2.0)
    return np.array(
        [[fx, 0.0, rig.image_width / 2.0], [0.0, fx, rig.image_height / 2.0], [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def camera_to_ego(rig: CameraRig) -> tuple[np.ndarray, np.ndarray]:
    """Rotations (N, 3, 3) taking camera-frame vectors to the ego frame, and camera origins (N, 3)."""
    pitch = math.radians(rig.pitch_deg)
    rotations = []
    for i in range(rig.num_cameras):
        yaw = 2.0 * math.pi * i / rig.num_cameras
        forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        down = np.cross(forward, right)
        rotations.append(np.stack([right, down, forward], axis=1))
    origins = np.tile(np.array([0.0, 0.0, rig.mount_height]), (rig.num_cameras, 1))
    return np.stack(rotations), origins


def pixel_rays(rig: CameraRig, stride: int = 1) -> np.ndarray:
    """Ego-frame rays (N, H/stride, W/stride, 3) through pixel-block centres, scaled to unit camera depth.

    A point at camera depth z along ray r is origin + z * r, which is exactly how LSS lifts features.
    """
    k_inv = np.linalg.inv(camera_intrinsics(rig))
    h, w = rig.image_height // stride, rig.image_width // stride
    v, u = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # (h, w, 3)
    cam = pix @ k_inv.T  # camera-frame direction with z = 1
    rotations, _ = camera_to_ego(rig)
    return np.einsum("nij,hwj->nhwi", rotations, cam)


def lidar_rays(lidar: LidarConfig) -> np.ndarray:
    """Unit directions (beams, azimuth_steps, 3) of one LiDAR sweep."""
    low, high = lidar.elevation_deg
    elevation = np.radians(np.linspace(low, high, lidar.num_beams))
    azimuth = np.linspace(0.0, 2.0 * math.pi, lidar.azimuth_steps, endpoint=False)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)


def bev_cell_index(points: np.ndarray, grid: BEVGrid, cell: float | None = None) -> np.ndarray:
    """Flat row-major cell index (iy * size_x + ix) of each (..., >=2) point, -1 outside the grid."""
    cell = grid.cell if cell is None else cell
    size_x = round((grid.x_range[1] - grid.x_range[0]) / cell)
    size_y = round((grid.y_range[1] - grid.y_range[0]) / cell)
    ix = np.floor((points[..., 0] - grid.x_range[0]) / cell).astype(np.int64)
    iy = np.floor((points[..., 1] - grid.y_range[0]) / cell).astype(np.int64)
    inside = (ix >= 0) & (ix < size_x) & (iy >= 0) & (iy < size_y)
    if points.shape[-1] > 2:
        inside &= (points[..., 2] >= grid.z_range[0]) & (points[..., 2] < grid.z_range[1])
    return np.where(inside, iy * size_x + ix, -1)


def bev_cell_centres(grid: BEVGrid) -> tuple[np.ndarray, np.ndarray]:
    """x and y of every cell centre, each (size_y, size_x)."""
    xs = grid.x_range[0] + (np.arange(grid.size_x) + 0.5) * grid.cell
    ys = grid.y_range[0] + (np.arange(grid.size_y) + 0.5) * grid.cell
    y, x = np.meshgrid(ys, xs, indexing="ij")
    return x, y
