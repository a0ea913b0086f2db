"""Hard voxelisation with static shapes (mmcv's `Voxelization` + mmdet3d's `HardSimpleVFE`), in numpy.

Done in preprocessing so the network (and its exported graph) sees fixed-size tensors: features
(max_voxels, F) holding the mean of each voxel's points, coordinates (max_voxels, 4) int32
[batch, z, y, x] and the real voxel count. Padding rows have features 0 and coordinates -1, the
padding convention of `common.sparse` (spconv users keep the first `count` rows).

Points are taken in input order, as mmcv's hard voxelisation does: voxels are numbered by the first
point that falls in them, a voxel keeps its first `max_points` points, and points of voxels beyond
`max_voxels` are dropped. Shuffle the points beforehand for a random subset. Deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Voxels:
    """One sample's voxels, padded to a fixed row count."""

    features: np.ndarray  # (max_voxels, F) float32, mean of the voxel's kept points
    indices: np.ndarray  # (max_voxels, 4) int32 [batch, z, y, x], padding rows -1
    num_points: np.ndarray  # (max_voxels,) int32, points averaged per voxel (0 for padding)
    count: int  # real voxels (the first `count` rows)


def grid_shape(point_cloud_range: Sequence[float], voxel_size: Sequence[float]) -> tuple[int, int, int]:
    """Voxel grid (z, y, x), the `sparse_shape` of a sparse encoder; mmcv rounds the (x, y, z) ratio."""
    low, high = np.asarray(point_cloud_range[:3], np.float32), np.asarray(point_cloud_range[3:], np.float32)
    size = np.round((high - low) / np.asarray(voxel_size, np.float32)).astype(np.int64)
    if (size < 1).any():
        raise ValueError(f"point cloud range {list(point_cloud_range)} holds no voxel of size {list(voxel_size)}")
    return int(size[2]), int(size[1]), int(size[0])


def voxel_coords(points: np.ndarray, point_cloud_range: Sequence[float], voxel_size: Sequence[float]) -> np.ndarray:
    """(P, 3) int64 voxel (z, y, x) of every point, -1 in every column for points outside the range."""
    low = np.asarray(point_cloud_range[:3], np.float32)
    xyz = np.floor((points[:, :3].astype(np.float32) - low) / np.asarray(voxel_size, np.float32)).astype(np.int64)
    zyx = xyz[:, ::-1]
    inside = ((zyx >= 0) & (zyx < np.array(grid_shape(point_cloud_range, voxel_size)))).all(axis=1)
    return np.where(inside[:, None], zyx, -1)


def voxelize(
    points: np.ndarray,
    voxel_size: Sequence[float],
    point_cloud_range: Sequence[float],
    max_voxels: int,
    max_points: int,
    num_features: int | None = None,
    batch_index: int = 0,
) -> Voxels:
    """Group points (P, F>=3; x, y, z first) into at most `max_voxels` voxels of at most `max_points` each.

    `num_features` keeps the first columns of each point in the mean (HardSimpleVFE's argument; None: all).
    """
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be (P, F>=3), got shape {points.shape}")
    if max_voxels < 1 or max_points < 1:
        raise ValueError(f"max_voxels and max_points must be positive, got {max_voxels}, {max_points}")
    width = points.shape[1] if num_features is None else int(num_features)
    shape = grid_shape(point_cloud_range, voxel_size)
    coords = voxel_coords(points, point_cloud_range, voxel_size)
    inside = np.flatnonzero(coords[:, 0] >= 0)
    keys = (coords[inside, 0] * shape[1] + coords[inside, 1]) * shape[2] + coords[inside, 2]

    # voxel number = rank of its first point; a point's slot = how many earlier points share its voxel
    unique_keys, first, voxel_of_point = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(unique_keys), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(unique_keys))
    voxel = rank[voxel_of_point]
    order = np.argsort(voxel, kind="stable")
    starts = np.searchsorted(voxel[order], voxel[order], side="left")
    slot = np.empty(len(voxel), dtype=np.int64)
    slot[order] = np.arange(len(voxel)) - starts
    kept = (voxel < max_voxels) & (slot < max_points)

    count = min(len(unique_keys), max_voxels)
    sums = np.zeros((max_voxels, width), dtype=np.float64)
    np.add.at(sums, voxel[kept], points[inside[kept], :width].astype(np.float64))
    num_points = np.bincount(voxel[kept], minlength=max_voxels).astype(np.int32)
    features = np.zeros((max_voxels, width), dtype=np.float32)
    features[:count] = sums[:count] / num_points[:count, None]

    indices = np.full((max_voxels, 4), -1, dtype=np.int32)
    first_point = np.empty(len(unique_keys), dtype=np.int64)
    first_point[rank] = inside[first]
    indices[:count, 0] = batch_index
    indices[:count, 1:] = coords[first_point[:count]]
    return Voxels(features, indices, num_points, count)


def batch_voxels(samples: Sequence[Voxels]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack samples (each padded to the same max_voxels) into one batch: features (B*M, F), indices (B*M, 4)
    with batch b in the first column of sample b's real rows, and the real counts (B,)."""
    if not samples:
        raise ValueError("no samples to batch")
    if len({s.features.shape for s in samples}) != 1:
        raise ValueError("samples must share max_voxels and the feature count")
    indices = np.concatenate([s.indices for s in samples])
    rows = np.arange(len(indices)) // len(samples[0].indices)
    indices[:, 0] = np.where(indices[:, 0] >= 0, rows, -1)
    features = np.concatenate([s.features for s in samples])
    return features, indices, np.array([s.count for s in samples], dtype=np.int64)
