"""PointPillars preprocessing, done outside the network so the exported graph keeps static shapes.

The network receives a fixed-size tensor of decorated points (9, P, M) and an inverse map from every
BEV cell to its pillar (0 = empty, k + 1 = pillar k). Placing pillars on the canvas is then a gather,
the most TensorRT-friendly form (no scatter, no sort, no unique in the graph).
"""

from __future__ import annotations

import numpy as np

from fusion.config import BEVGrid, LidarConfig
from fusion.geometry import bev_cell_index

PILLAR_FEATURES = 9  # x, y, z, intensity, offsets to the pillar's point mean (3), to the cell centre (2)
DECORATIONS = 5  # features added to each point's own: offsets to the pillar mean (3) and to the cell centre (2)


def pillar_features(point_features: int) -> int:
    """Decorated features per point for points of `point_features` columns (4: PILLAR_FEATURES; 5 adds time lag)."""
    return point_features + DECORATIONS


def pillarize(
    points: np.ndarray, grid: BEVGrid, lidar: LidarConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Group points (N, 4) into pillars. Returns features (9, P, M), cell-to-pillar map (Y*X,), pillar count.

    Points may carry more columns after x, y, z, intensity (multi-sweep nuScenes: the time lag); the
    features then have `pillar_features(F)` rows, the point's own F columns first.

    When a cell holds more than M points or the sweep more than P pillars, a random subset is kept,
    drawn from `rng` so the result is reproducible.
    """
    p_max, m_max = lidar.max_pillars, lidar.max_points_per_pillar
    features = np.zeros((p_max, m_max, pillar_features(points.shape[1])), dtype=np.float32)
    pillar_map = np.zeros(grid.size_x * grid.size_y, dtype=np.int64)

    cell = bev_cell_index(points[:, :3], grid)
    points, cell = points[cell >= 0], cell[cell >= 0]
    if len(points) == 0:
        return features.transpose(2, 0, 1).copy(), pillar_map, 0
    shuffle = rng.permutation(len(points))
    points, cell = points[shuffle], cell[shuffle]
    order = np.argsort(cell, kind="stable")
    points, cell = points[order], cell[order]

    cells, starts, counts = np.unique(cell, return_index=True, return_counts=True)
    if len(cells) > p_max:
        chosen = np.sort(rng.choice(len(cells), size=p_max, replace=False))
        cells, starts, counts = cells[chosen], starts[chosen], counts[chosen]
    counts = np.minimum(counts, m_max)
    pillar_of_point = np.repeat(np.arange(len(cells)), counts)
    slot = np.arange(len(pillar_of_point)) - np.repeat(np.cumsum(counts) - counts, counts)
    kept = points[np.repeat(starts, counts) + slot]

    mean = np.stack([np.bincount(pillar_of_point, kept[:, i], len(cells)) for i in range(3)], 1) / counts[:, None]
    ix, iy = cells % grid.size_x, cells // grid.size_x
    centre_x = grid.x_range[0] + (ix + 0.5) * grid.cell
    centre_y = grid.y_range[0] + (iy + 0.5) * grid.cell
    decorated = np.concatenate(
        [
            kept,
            kept[:, :3] - mean[pillar_of_point],
            (kept[:, 0] - centre_x[pillar_of_point])[:, None],
            (kept[:, 1] - centre_y[pillar_of_point])[:, None],
        ],
        axis=1,
    )
    features[pillar_of_point, slot] = decorated
    pillar_map[cells] = np.arange(1, len(cells) + 1)
    return features.transpose(2, 0, 1).copy(), pillar_map, len(cells)
