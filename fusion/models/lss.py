"""Lift-Splat-Shoot view transform for a fixed camera rig, with no sort or unique in the forward pass.

(Real data brings its own calibration per sample: `frustum_cells`, computed in the data pipeline by
`fusion.data.camera_geometry`, replaces the constant buffers for that forward pass; see `BEVPool.scatter_per_sample`.)

The rig never moves, so the BEV cell of every (camera, depth bin, feature pixel) frustum point is
computed once, here, and kept as constant index buffers. Pooling is then pure indexing:
- "scatter": gather the valid points, scatter-add them into the canvas (ONNX ScatterElements-add);
- "cumsum": gather the points sorted by cell, cumulative-sum, difference at interval ends, and gather
  the intervals into the canvas (ONNX Gather + CumSum only; keep CumSum in FP32 on TensorRT).
Channels stay on dim 1 throughout, which keeps the layout legible to torch-pruning.

Depth and context come from two separate convs so that depth bins are never coupled to feature
channels: the depth conv is excluded from pruning, the context conv is prunable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import Config
from fusion.geometry import bev_cell_index, camera_to_ego, pixel_rays
from fusion.models.resnet import conv_bn_relu


def frustum_cells(config: Config) -> np.ndarray:
    """Pooled-grid cell of every frustum point, ordered (camera, depth bin, row, column); -1 outside."""
    start, _, step = config.model.depth_bins
    depths = start + step * np.arange(config.model.num_depth_bins)
    rays = pixel_rays(config.rig, stride=config.model.feature_stride)  # (N, h, w, 3)
    _, origins = camera_to_ego(config.rig)
    points = origins[:, None, None, None, :] + depths[None, :, None, None, None] * rays[:, None]  # (N, D, h, w, 3)
    return bev_cell_index(points.reshape(-1, 3), config.grid, cell=config.grid.cell / config.model.bev_pool_factor)


class BEVPool(nn.Module):
    """Sum frustum features (B, C, points) into a BEV canvas (B, C, cells) through precomputed indices."""

    def __init__(self, cells: np.ndarray, num_cells: int, method: str = "scatter"):
        super().__init__()
        self.method = method
        self.num_cells = num_cells
        valid = np.nonzero(cells >= 0)[0]
        order = valid[np.argsort(cells[valid], kind="stable")]
        sorted_cells = cells[order]
        # Intervals of equal cell in the sorted order; ends index a cumsum padded with one leading zero.
        boundaries = np.nonzero(np.diff(sorted_cells))[0] + 1
        starts = np.concatenate([[0], boundaries])
        ends = np.concatenate([boundaries, [len(order)]])
        interval_of_cell = np.zeros(num_cells, dtype=np.int64)
        interval_of_cell[sorted_cells[starts]] = np.arange(1, len(starts) + 1)
        for name, value in {
            "point_index": order,
            "point_cell": sorted_cells,
            "interval_start": starts,
            "interval_end": ends,
            "interval_of_cell": interval_of_cell,
        }.items():
            self.register_buffer(name, torch.from_numpy(value.astype(np.int64)), persistent=False)

    def forward(self, points: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        b, c, _ = points.shape
        if cells is not None:
            return self.scatter_per_sample(points, cells)
        kept = points.index_select(2, self.point_index)
        if self.method == "scatter":
            # A zero canvas derived from the input, not `new_zeros`: exporters fold a constant-shaped
            # zeros tensor into an initializer (0.5 MB on tiny, 40 MB on r50); this stays 3 small ops.
            canvas = (kept[:, :, :1] * 0).expand(b, c, self.num_cells)
            return canvas.scatter_add(2, self.point_cell.view(1, 1, -1).expand(b, c, -1), kept)
        running = F.pad(kept.cumsum(2), (1, 0))
        sums = running.index_select(2, self.interval_end) - running.index_select(2, self.interval_start)
        return F.pad(sums, (1, 0)).index_select(2, self.interval_of_cell)

    def scatter_per_sample(self, points: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Pool with a per-sample cell index (B, points) from the data pipeline (`fusion.data.camera_geometry`).

        Points outside the grid (-1, or any index out of range) go to one extra dummy cell that is cut
        off: the shapes stay static and the graph holds no sort, unique or nonzero. This is always the
        scatter-add form; the cumsum form needs cells sorted per sample and stays the fixed-rig form.
        """
        b, c, _ = points.shape
        outside = (cells < 0) | (cells >= self.num_cells)
        index = cells.masked_fill(outside, self.num_cells)
        canvas = (points[:, :, :1] * 0).expand(b, c, self.num_cells + 1)
        canvas = canvas.scatter_add(2, index.unsqueeze(1).expand(b, c, -1), points)
        return canvas[:, :, : self.num_cells]


class LSSViewTransform(nn.Module):
    """Image features (B*N, C_in, h, w) to camera BEV features (B, C, Y, X)."""

    def __init__(self, config: Config, in_channels: int):
        super().__init__()
        m, grid = config.model, config.grid
        self.num_cameras = config.rig.num_cameras
        self.pool_size = (grid.size_y * m.bev_pool_factor, grid.size_x * m.bev_pool_factor)
        self.depth_conv = nn.Conv2d(in_channels, m.num_depth_bins, 1)
        self.feat_conv = nn.Conv2d(in_channels, m.camera_bev_channels, 1)
        self.pool_method = m.pool_method
        h, w = config.rig.image_height // m.feature_stride, config.rig.image_width // m.feature_stride
        self.num_frustum_points = self.num_cameras * m.num_depth_bins * h * w
        self.set_frustum_cells(frustum_cells(config))
        c = m.camera_bev_channels
        self.downsample = nn.Sequential(conv_bn_relu(c, c), conv_bn_relu(c, c, stride=m.bev_pool_factor))
        self.pruning_trace = False  # see `pruning_stand_in`

    def set_frustum_cells(self, cells: np.ndarray) -> None:
        """Rebuild the constant pooling buffers from one rig's frustum cells (the pooling form is kept).

        `fusion.data.camera_geometry.bake_calibration` calls this to fix the geometry to one car for export.
        """
        pool = getattr(self, "pool", None)
        method = pool.method if pool is not None else self.pool_method
        num_cells = self.pool_size[0] * self.pool_size[1]
        if cells.shape != (self.num_frustum_points,):
            raise ValueError(f"frustum cells must have shape ({self.num_frustum_points},), got {cells.shape}")
        self.pool = BEVPool(cells, num_cells, method)

    def depth_and_context(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth distribution (B*N, D, h, w), softmaxed over bins, and context features (B*N, C, h, w)."""
        return self.depth_conv(features).softmax(dim=1), self.feat_conv(features)

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """Outer product of depth distribution and context: (B, C, N*D*h*w) in frustum_cells' order."""
        return self.outer_product(*self.depth_and_context(features))

    def outer_product(self, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """`lift` from precomputed depth and context (the split export's camera_vtransform stage starts here)."""
        frustum = depth.unsqueeze(1) * context.unsqueeze(2)  # (B*N, C, D, h, w)
        bn, c, d, h, w = frustum.shape
        frustum = frustum.view(bn // self.num_cameras, self.num_cameras, c, d, h, w).transpose(1, 2)
        return frustum.reshape(bn // self.num_cameras, c, self.num_cameras * d * h * w)

    def splat(
        self, depth: torch.Tensor, context: torch.Tensor, frustum_cells: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Depth and context to camera BEV features: lift, BEV pool, downsample.

        `frustum_cells` (B, N*D*h*w) int64: each sample's own geometry; None lifts with the fixed rig.
        """
        canvas = self.pool(self.outer_product(depth, context), frustum_cells)
        bev = canvas.view(canvas.shape[0], canvas.shape[1], *self.pool_size)
        return self.downsample(bev)

    def forward(self, features: torch.Tensor, frustum_cells: torch.Tensor | None = None) -> torch.Tensor:
        if self.pruning_trace:
            return self.pruning_stand_in(features)
        return self.splat(*self.depth_and_context(features), frustum_cells)

    def pruning_stand_in(self, features: torch.Tensor) -> torch.Tensor:
        """A channel-preserving replacement used only while torch-pruning traces the graph.

        torch-pruning reads the depth x context outer product as an element-wise op and would couple
        depth bins with context channels. This stand-in maps context channels straight to the BEV
        size, so channel c of `feat_conv` stays channel c of the canvas. The depth conv is kept alive
        through `self.traced_depth`, which the model returns as an extra output while tracing.
        """
        self.traced_depth = self.depth_conv(features)
        # one camera per sample (features are (B*N, C, h, w)): the canvas keeps the batch of the LiDAR branch
        context = self.feat_conv(features)[:: self.num_cameras]
        bev = F.interpolate(context, size=self.pool_size, mode="nearest")
        return self.downsample(bev)
