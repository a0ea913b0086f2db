"""CenterPoint-style detection head, BEV map segmentation head, and box decoding."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import BEVGrid
from fusion.models.resnet import conv_bn_relu

# Regression outputs of the detection head, in the order of the targets (fusion.data.targets).
REGRESSION_HEADS = {"offset": 2, "height": 1, "size": 3, "rotation": 2}
VELOCITY_CHANNELS = 2  # optional branch (ModelConfig.velocity_head): vx, vy in the LiDAR/BEV frame, m/s
HEATMAP_PRIOR = 0.1  # initial foreground probability: keeps the focal loss stable at the start


class CenterHead(nn.Module):
    """Shared conv, then one small branch per output. The last conv of every branch is an output layer.

    `velocity` adds CenterPoint's velocity branch last, so the other branches initialise as without it."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, velocity: bool = False):
        super().__init__()
        self.shared = conv_bn_relu(in_channels, channels)
        outputs = {"heatmap": num_classes, **REGRESSION_HEADS}
        if velocity:
            outputs["velocity"] = VELOCITY_CHANNELS
        self.branches = nn.ModuleDict(
            {
                name: nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, n, 3, padding=1))
                for name, n in outputs.items()
            }
        )
        nn.init.constant_(self.branches["heatmap"][-1].bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(x)
        return {name: branch(x) for name, branch in self.branches.items()}


class MapHead(nn.Module):
    """Per-class BEV map logits (multi-label, as BEVFusion's segmentation head)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_channels, channels), conv_bn_relu(channels, channels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


@torch.no_grad()
def decode_boxes(
    outputs: dict[str, torch.Tensor], grid: BEVGrid, top_k: int = 100, score_threshold: float = 0.05
) -> list[dict[str, np.ndarray]]:
    """Peaks of the class heatmaps (3x3 max-pool NMS, top-k) to boxes (x, y, z, l, w, h, yaw) per sample,
    plus `velocities` (K, 2) LiDAR-frame m/s at the peaks when the outputs have a `velocity` map."""
    heat = outputs["heatmap"].float().sigmoid()
    b, num_classes, height, width = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, flat = peaks.view(b, -1).topk(min(top_k, num_classes * height * width))
    labels, cell = flat // (height * width), flat % (height * width)

    def at_peaks(name: str) -> torch.Tensor:
        values = outputs[name].float().view(b, outputs[name].shape[1], -1)
        return values.gather(2, cell.unsqueeze(1).expand(-1, values.shape[1], -1)).transpose(1, 2)

    offset, z, size, rot = at_peaks("offset"), at_peaks("height"), at_peaks("size"), at_peaks("rotation")
    x = grid.x_range[0] + ((cell % width).float() + offset[..., 0]) * grid.cell
    y = grid.y_range[0] + ((cell // width).float() + offset[..., 1]) * grid.cell
    yaw = torch.atan2(rot[..., 0], rot[..., 1])
    boxes = torch.cat([x[..., None], y[..., None], z, size.clamp(max=4.0).exp(), yaw[..., None]], dim=-1)
    velocity = at_peaks("velocity") if "velocity" in outputs else None
    results = []
    for i in range(b):
        keep = scores[i] >= score_threshold
        result = {
            "boxes": boxes[i][keep].cpu().numpy(),
            "scores": scores[i][keep].cpu().numpy(),
            "labels": labels[i][keep].cpu().numpy(),
        }
        if velocity is not None:
            result["velocities"] = velocity[i][keep].cpu().numpy()
        results.append(result)
    return results
