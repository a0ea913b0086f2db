"""Fusers and the BEV decoder (SECOND backbone + SECONDFPN neck), as in BEVFusion-MIT."""

from __future__ import annotations

import torch
from torch import nn

from fusion.models.resnet import conv_bn_relu


class ConvFuser(nn.Module):
    """BEVFusion-MIT: concatenate camera and LiDAR BEV features, one conv-BN-ReLU."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.fuse = conv_bn_relu(sum(in_channels), channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.fuse(torch.cat(features, dim=1))


class SEFuser(nn.Module):
    """PKU-style: concatenate, conv-BN-ReLU, then a squeeze-and-excitation channel gate."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.fuse = conv_bn_relu(sum(in_channels), channels)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid())

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(torch.cat(features, dim=1))
        return x * self.gate(x)


def build_fuser(kind: str, in_channels: list[int], channels: int) -> nn.Module:
    return {"conv": ConvFuser, "se": SEFuser}[kind](in_channels, channels)


class SECOND(nn.Module):
    """Two stages of 3x3 conv-BN-ReLU; the second halves the resolution."""

    def __init__(self, in_channels: int, channels: tuple[int, int], layers: tuple[int, int]):
        super().__init__()
        stages, c_in = [], in_channels
        for stride, c, n in zip((1, 2), channels, layers):
            stages.append(nn.Sequential(conv_bn_relu(c_in, c, stride=stride), *[conv_bn_relu(c, c) for _ in range(n)]))
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class SECONDFPN(nn.Module):
    """Bring both stages back to full resolution and concatenate them."""

    def __init__(self, in_channels: tuple[int, int], channels: int):
        super().__init__()
        self.lateral = nn.Sequential(
            nn.Conv2d(in_channels[0], channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(in_channels[1], channels, 2, stride=2, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.out_channels = 2 * channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.lateral(features[0]), self.upsample(features[1])], dim=1)


class Decoder(nn.Module):
    def __init__(self, in_channels: int, channels: tuple[int, int], layers: tuple[int, int], up_channels: int):
        super().__init__()
        self.backbone = SECOND(in_channels, channels, layers)
        self.neck = SECONDFPN(channels, up_channels)
        self.out_channels = self.neck.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))
