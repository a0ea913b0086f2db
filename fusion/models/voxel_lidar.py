"""The sparse voxel LiDAR branch of the BEVFusion-shaped presets: mmdet3d's SparseEncoder on batched rulebooks.

    voxels (B, M, F), voxel_coords (B, M, 3), rulebooks {name: (B, rows, ...)} -> BEV features (B, C * D, Y, X)

The per-sample rulebooks of `fusion.data.sparse_inputs` hold row indices local to their sample (-1: none).
`batch_indice_dict` makes them batch-wide with index arithmetic only: sample b's rows of a level become
b * rows + r, "none" becomes the dump row B * rows (the zero row the plain backend appends). No sort, unique
or nonzero: in eval mode the whole branch exports as Gather, MatMul, Add and Where, with the rulebooks as
graph inputs. (Training-mode BatchNorm picks the real rows with a nonzero; training is never exported.)

Parameters are the `SparseEncoder`'s under `backbone.` (BEVFusion's `encoders.lidar.backbone.`), so a
checkpoint of this branch runs with the spconv backend too (`SparseEncoder(..., backend="spconv")`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from common import sparse as plain_sparse
from fusion.config import Config, sparse_paddings, sparse_shape
from fusion.models.sparse_encoder import SparseEncoder

INPUTS = ("voxels", "voxel_coords", "rulebooks")


class VoxelLidarEncoder(nn.Module):
    """BEVFusion's LiDAR branch on pre-voxelised, pre-ruled batches. `model.sparse_backend`: "plain" (trains
    on CPU, exports; uses the batch's rulebooks) or "spconv" (builds its own rulebooks from the coordinates and
    ignores the batch's; CUDA training, forward only on spconv's CPU build)."""

    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.backbone = SparseEncoder(
            config.lidar.point_features,
            sparse_shape(config),
            base_channels=m.sparse_base_channels,
            output_channels=m.sparse_out_channels,
            encoder_channels=m.sparse_channels,
            encoder_paddings=sparse_paddings(m),
            backend=m.sparse_backend,
        )
        self.specs = tuple(self.backbone.layer_specs())  # geometry only: pruning never changes it
        self.out_channels = self.backbone.out_channels

    def forward(
        self, voxels: torch.Tensor, voxel_coords: torch.Tensor, rulebooks: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        b, m, f = voxels.shape
        coords = batch_coords(voxel_coords)
        if self.backbone.backend == "spconv":
            return self.backbone(voxels.reshape(b * m, f), coords, b)
        book = batch_indice_dict(self.specs, self.backbone.sparse_shape, rulebooks, coords, b)
        return self.backbone(voxels.reshape(b * m, f), coords, b, book)


class VoxelLidarStage(nn.Module):
    """voxels, voxel_coords, rulebooks -> lidar_bev: the sparse encoder as its own stage of the CUDA-BEVFusion
    split (`BEVFusion.export_stages`); the rulebooks stay a nested input (graph inputs `rulebooks.<name>`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lidar = model.lidar

    def forward(
        self, voxels: torch.Tensor, voxel_coords: torch.Tensor, rulebooks: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.lidar(voxels, voxel_coords, rulebooks)

    def owned_modules(self) -> list[nn.Module]:
        return [self.lidar]


def batch_coords(coords: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) per-sample (z, y, x), -1 rows padding -> (B * N, 4) int32 (batch, z, y, x), padding rows -1."""
    b, n, _ = coords.shape
    batch = torch.arange(b, device=coords.device, dtype=coords.dtype).view(b, 1, 1).expand(b, n, 1)
    batch = torch.where(coords[..., :1] >= 0, batch, torch.full_like(batch, plain_sparse.PAD))
    return torch.cat([batch, coords], dim=2).reshape(b * n, 4).int()


def batch_rows(local: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-sample row indices (B, ...) into a level of `rows` rows per sample, -1 none -> batch-wide indices
    (B * ..., flattened over the sample dim), none -> the dump row B * rows."""
    b = local.shape[0]
    offset = (torch.arange(b, device=local.device, dtype=local.dtype) * rows).view(b, *([1] * (local.dim() - 1)))
    merged = torch.where(local >= 0, local + offset, torch.full_like(local, b * rows))
    return merged.reshape(b * local.shape[1], *local.shape[2:])


def batch_indice_dict(
    specs: Sequence[plain_sparse.LayerSpec],
    spatial_shape: Sequence[int],
    rulebooks: Mapping[str, torch.Tensor],
    coords: torch.Tensor,
    batch_size: int,
) -> dict[str, plain_sparse.RuleBook]:
    """The batch-wide `common.sparse` indice_dict of per-sample rulebooks (`fusion.data.sparse_inputs` layout).

    `coords` (B * M, 4) are the input sites (`batch_coords`). Sites carry no valid-row index: training-mode
    BatchNorm finds the real rows from the coordinates (padding rows have batch -1)."""
    sites = plain_sparse.Sites(coords, tuple(spatial_shape), batch_size, None)
    per_sample = coords.shape[0] // batch_size
    book: dict[str, plain_sparse.RuleBook] = {}
    for spec in specs:
        if spec.conv1x1 or spec.indice_key in book:
            continue
        if spec.inverse:
            raise ValueError(f"inverse sparse conv '{spec.indice_key}': not part of this encoder's batch layout")
        gather = batch_rows(rulebooks[f"{spec.indice_key}.gather"], per_sample)
        geometry = (spec.kernel_size, spec.stride, spec.padding, spec.dilation)
        if spec.subm:
            book[spec.indice_key] = plain_sparse.RuleBook(True, *geometry, sites, sites, gather)
            continue
        out_coords = rulebooks[f"{spec.indice_key}.coords"]
        shape = plain_sparse.conv_output_shape(sites.spatial_shape, *geometry)
        out_sites = plain_sparse.Sites(batch_coords(out_coords), shape, batch_size, None)
        book[spec.indice_key] = plain_sparse.RuleBook(False, *geometry, sites, out_sites, gather)
        sites, per_sample = out_sites, out_coords.shape[1]
    sites.dense_index = batch_rows(rulebooks["dense"], per_sample)
    return book
