"""Task losses: CenterPoint's Gaussian focal loss, L1 box (and velocity) regression, and BEV map BCE.

The heatmap and box losses divide by a batch-wide count (peaks, objects), so they do not decompose
over samples. When a global batch is split over N ranks, `normaliser` makes each rank divide its
sum by the GLOBAL count over N (as mmdetection's `reduce_mean(num_pos)`): the DDP-averaged gradient
is then the one-process gradient of the whole batch. Without it, the local count is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fusion.data.targets import REGRESSION_CHANNELS
from fusion.models.heads import REGRESSION_HEADS

REGRESSION_WEIGHT = 0.25  # CenterPoint's weight of the box loss against the heatmap loss
VELOCITY_CODE_WEIGHT = 0.2  # CenterPoint's code_weights for vx, vy: 0.2 of a box channel's weight each
MAP_WEIGHT = 1.0
Normaliser = Callable[[torch.Tensor], torch.Tensor]  # this rank's count -> the divisor of its loss


def local_count(count: torch.Tensor) -> torch.Tensor:
    return count.clamp(min=1.0)


def gaussian_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    normaliser: Normaliser = local_count,
) -> torch.Tensor:
    """CornerNet/CenterPoint focal loss on Gaussian heatmaps, normalised by the number of peaks."""
    prob = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = -torch.log(prob) * (1 - prob).pow(alpha) * positive
    neg_loss = -torch.log(1 - prob) * prob.pow(alpha) * (1 - target).pow(beta) * (1 - positive)
    return (pos_loss.sum() + neg_loss.sum()) / normaliser(positive.sum())


def regression_loss(
    outputs: dict[str, torch.Tensor],
    index: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    normaliser: Normaliser = local_count,
) -> torch.Tensor:
    """L1 between head outputs at the object centres and the targets, averaged over objects."""
    predictions = []
    for name in REGRESSION_HEADS:
        values = outputs[name].flatten(2)  # (B, n, cells)
        predictions.append(values.gather(2, index.unsqueeze(1).expand(-1, values.shape[1], -1)))
    prediction = torch.cat(predictions, dim=1).transpose(1, 2)  # (B, K, 8)
    l1 = (prediction - target).abs() * mask.unsqueeze(-1)
    return l1.sum() / normaliser(mask.sum()) / target.shape[-1]


def velocity_loss(
    velocity: torch.Tensor,
    index: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    normaliser: Normaliser = local_count,
) -> torch.Tensor:
    """L1 between the velocity map (B, 2, Y, X) at the object centres and the targets (B, K, 2), summed over
    the two channels and averaged over the objects the mask keeps (known velocity, centre on the grid)."""
    values = velocity.flatten(2)
    prediction = values.gather(2, index.unsqueeze(1).expand(-1, values.shape[1], -1)).transpose(1, 2)
    l1 = (prediction - target).abs() * mask.unsqueeze(-1)
    return l1.sum() / normaliser(mask.sum())


def task_loss(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], normaliser: Normaliser = local_count
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total training loss and its parts (as floats, for logging)."""
    parts = {
        "heatmap": gaussian_focal_loss(outputs["heatmap"], batch["heatmap"], normaliser=normaliser),
        "box": REGRESSION_WEIGHT
        * regression_loss(outputs, batch["target_index"], batch["target_regression"], batch["target_mask"], normaliser),
    }
    if "velocity" in outputs and "target_velocity" in batch:
        # Per channel 0.2 of a box channel's weight (the box loss is a mean over its 8 channels), as CenterPoint.
        # Without velocity targets (synthetic scenes are static and have none) the branch gets no loss.
        velocity = velocity_loss(
            outputs["velocity"],
            batch["target_index"],
            batch["target_velocity"],
            batch["target_velocity_mask"],
            normaliser,
        )
        parts["velocity"] = REGRESSION_WEIGHT * VELOCITY_CODE_WEIGHT / REGRESSION_CHANNELS * velocity
    if "bev_map" in outputs:
        parts["map"] = MAP_WEIGHT * F.binary_cross_entropy_with_logits(outputs["bev_map"], batch["bev_map"])
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}
