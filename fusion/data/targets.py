"""CenterPoint training targets: class heatmaps with Gaussian peaks and per-object regression values."""

from __future__ import annotations

import math

import numpy as np

from fusion.config import BEVGrid

REGRESSION_CHANNELS = 8  # offset x, offset y, z, log l, log w, log h, sin yaw, cos yaw
MIN_RADIUS = 2


def gaussian_radius(length_cells: float, width_cells: float, min_overlap: float = 0.1) -> float:
    """CornerNet's radius: the largest centre shift that keeps a box's IoU above `min_overlap`."""
    h, w = length_cells, width_cells
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
    """Max-paste a Gaussian peak of value 1 at (cx, cy) into a (H, W) heatmap, in place."""
    sigma = (2 * radius + 1) / 6.0
    ys, xs = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    peak = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    window = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    np.maximum(window, peak[radius - top : radius + bottom, radius - left : radius + right], out=window)


def build_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    grid: BEVGrid,
    num_classes: int,
    max_objects: int,
    velocities: np.ndarray | None = None,
) -> dict:
    """Heatmap (C, Y, X), flat centre index (K,), regression (K, 8) and mask (K,) for up to K objects.

    With `velocities` (N, 2) LiDAR-frame m/s (nuScenes), also `target_velocity` (K, 2) and
    `target_velocity_mask` (K,): a NaN row (the devkit cannot estimate that object's velocity) is
    not supervised, as is an object whose centre is off the grid.
    """
    heatmap = np.zeros((num_classes, grid.size_y, grid.size_x), dtype=np.float32)
    index = np.zeros(max_objects, dtype=np.int64)
    regression = np.zeros((max_objects, REGRESSION_CHANNELS), dtype=np.float32)
    mask = np.zeros(max_objects, dtype=np.float32)
    for k, (box, label) in enumerate(zip(boxes[:max_objects], labels[:max_objects])):
        fx = (box[0] - grid.x_range[0]) / grid.cell
        fy = (box[1] - grid.y_range[0]) / grid.cell
        cx, cy = int(fx), int(fy)
        if not (0 <= cx < grid.size_x and 0 <= cy < grid.size_y):
            continue
        radius = max(MIN_RADIUS, int(gaussian_radius(box[3] / grid.cell, box[4] / grid.cell)))
        draw_gaussian(heatmap[label], cx, cy, radius)
        index[k] = cy * grid.size_x + cx
        regression[k] = [fx - cx, fy - cy, box[2], *np.log(box[3:6]), math.sin(box[6]), math.cos(box[6])]
        mask[k] = 1.0
    targets = {"heatmap": heatmap, "target_index": index, "target_regression": regression, "target_mask": mask}
    if velocities is not None:
        n = min(len(velocities), max_objects)
        known = np.zeros(max_objects, dtype=bool)
        known[:n] = np.isfinite(velocities[:n]).all(axis=1)
        target_velocity = np.zeros((max_objects, 2), dtype=np.float32)
        target_velocity[:n] = np.nan_to_num(velocities[:n])
        targets["target_velocity"] = target_velocity
        targets["target_velocity_mask"] = mask * known
    return targets
