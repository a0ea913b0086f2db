"""The NVIDIA CUDA-BEVFusion split of a `BEVFusion` model: thin wrappers around the model's own submodules.

camera_backbone: images -> depth, context; camera_vtransform: depth, context -> camera_bev;
lidar_backbone: pillars, pillar_map -> lidar_bev; fuser_decoder: camera_bev and/or lidar_bev -> bev_features;
heads: bev_features -> head outputs. Each wrapper's `owned_modules()` lists the layers it runs, so the stages'
parameters sum to the model's. Plain modules, no export code: `BEVFusion.export_stages` hands them to the
generic split export (`export.onnx.export_split`) as `(name, module, inputs, outputs)` tuples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

STAGES = ("camera_backbone", "camera_vtransform", "lidar_backbone", "fuser_decoder", "heads")


class CameraBackboneStage(nn.Module):
    """images (B, N, 3, H, W) -> depth (B*N, D, h, w) softmaxed over bins, context (B*N, C, h, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.camera = model.camera

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c, h, w = images.shape
        features = self.camera.neck(self.camera.backbone(images.view(b * n, c, h, w)))
        return self.camera.vtransform.depth_and_context(features)

    def owned_modules(self) -> list[nn.Module]:
        """The layers whose parameters this stage runs (the wrapper also holds the camera's view transform)."""
        vt = self.camera.vtransform
        return [self.camera.backbone, self.camera.neck, vt.depth_conv, vt.feat_conv]


class CameraVTransformStage(nn.Module):
    """depth, context -> camera_bev (B, C, Y, X): lift (outer product), BEV pool, BEV downsample."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vtransform = model.camera.vtransform

    def forward(self, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.vtransform.splat(depth, context)

    def owned_modules(self) -> list[nn.Module]:
        return [self.vtransform.pool, self.vtransform.downsample]


class LidarBackboneStage(nn.Module):
    """pillars, pillar_map -> lidar_bev (B, C, Y, X)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lidar = model.lidar

    def forward(self, pillars: torch.Tensor, pillar_map: torch.Tensor) -> torch.Tensor:
        return self.lidar(pillars, pillar_map)

    def owned_modules(self) -> list[nn.Module]:
        return [self.lidar]


class FuserDecoderStage(nn.Module):
    """camera_bev and/or lidar_bev -> bev_features (fuser when both exist, then the decoder)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.fuser = model.fuser
        self.decoder = model.decoder

    def forward(self, camera_bev: torch.Tensor | None = None, lidar_bev: torch.Tensor | None = None) -> torch.Tensor:
        bev = [x for x in (camera_bev, lidar_bev) if x is not None]
        x = self.fuser(bev) if self.fuser is not None else bev[0]
        return self.decoder(x)

    def owned_modules(self) -> list[nn.Module]:
        return [m for m in (self.fuser, self.decoder) if m is not None]


class HeadsStage(nn.Module):
    """bev_features -> the head outputs (heatmap, offset, height, size, rotation[, velocity][, bev_map])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.heads = model.heads

    def forward(self, bev_features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(bev_features)

    def owned_modules(self) -> list[nn.Module]:
        return [self.heads]


def split_stages(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[tuple]:
    """`model.export_stages` with the head output names of one forward pass on `inputs`.

    The forward runs in eval mode without gradients (no BatchNorm statistics change); every module's
    training flag is restored before the wrappers are built, so they copy the model's own flag.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            head_outputs = list(model(**{name: inputs[name] for name in model.input_names}))
    finally:
        for module, training in modes.items():
            module.training = training
    return model.export_stages(head_outputs)
