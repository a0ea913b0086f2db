"""LiDAR branch: PointPillars feature net, pillars placed on the BEV canvas by a gather, and a 2-D
residual backbone (the SECOND-style dense stage that follows the scatter in PointPillars)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import Config
from fusion.data.pillars import PILLAR_FEATURES, pillar_features
from fusion.models.resnet import BasicBlock, conv_bn_relu


class PillarFeatureNet(nn.Module):
    """Shared point MLP (a 1x1 conv over (features, pillars, points)) and a max over each pillar's points."""

    def __init__(self, channels: int, in_features: int = PILLAR_FEATURES):
        super().__init__()
        self.conv = nn.Conv2d(in_features, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, pillars: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(pillars))).amax(dim=3)  # (B, C, P)


def pillars_to_canvas(features: torch.Tensor, pillar_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Gather pillar features (B, C, P) into a canvas (B, C, height, width); empty cells read a zero column."""
    b, c, _ = features.shape
    padded = F.pad(features, (1, 0))  # column 0 is the empty cell
    canvas = padded.gather(2, pillar_map.unsqueeze(1).expand(b, c, -1))
    return canvas.view(b, c, height, width)


class LidarEncoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.size = (config.grid.size_y, config.grid.size_x)
        self.pfn = PillarFeatureNet(m.pillar_channels, pillar_features(config.lidar.point_features))
        self.stem = conv_bn_relu(m.pillar_channels, m.lidar_channels)
        self.blocks = nn.Sequential(*[BasicBlock(m.lidar_channels, m.lidar_channels) for _ in range(m.lidar_blocks)])
        self.out_channels = m.lidar_channels

    def forward(self, pillars: torch.Tensor, pillar_map: torch.Tensor) -> torch.Tensor:
        canvas = pillars_to_canvas(self.pfn(pillars), pillar_map, *self.size)
        return self.blocks(self.stem(canvas))
