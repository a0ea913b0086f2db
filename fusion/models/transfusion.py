"""TransFusion detection head (Bai et al. 2022), as BEVFusion uses it (mmdet3d's `TransFusionHead`).

    BEV features -> shared conv -> heatmap branch (dense class heatmap, supervised like CenterPoint's)
                                -> proposals: local maxima of the heatmap, top-k over all classes and cells
                                -> queries: features at the proposals + a class embedding of their class
                                -> one decoder layer (self-attention, cross-attention to every BEV cell, FFN)
                                -> per-query branches: centre, height, log size, (sin, cos) yaw, velocity, class

Why a query head: it is what MIT's and NVIDIA's BEVFusion deployments run, and its cost (attention over
all BEV cells, per-query FFNs) is unlike a CenterPoint head's dense convolutions. Shapes are static for export:
a fixed number of proposals, picked by `topk` over a fixed-size heatmap (ONNX TopK); no nonzero, no unique.

Training matches queries to ground truth one-to-one (Hungarian, scipy) with mmdet3d's focal classification
cost and BEV-centre L1 cost; its 3-D IoU cost is left out (IoU-free matching), the only departure from
BEVFusion's assigner. Losses: sigmoid focal loss on the query classes, L1 on the matched boxes, and the
Gaussian focal loss on the dense heatmap against the CenterPoint targets of `fusion.data.targets`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import BEVGrid
from fusion.losses import Normaliser, gaussian_focal_loss, local_count
from fusion.models.heads import HEATMAP_PRIOR
from fusion.models.resnet import conv_bn_relu

# Per-query regression branches in the order of the box code: centre (BEV cells, x then y), z (m),
# log(l, w, h), (sin, cos) of yaw; velocity (vx, vy in m/s) is optional, as in CenterPoint's head here.
QUERY_HEADS = {"center": 2, "height": 1, "size": 3, "rotation": 2}
VELOCITY_CHANNELS = 2
# mmdet3d's TransFusion (nuScenes) weights: assignment costs and losses.
CLASS_COST_WEIGHT = 0.15
CENTER_COST_WEIGHT = 0.25
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
BOX_LOSS_WEIGHT = 0.25
VELOCITY_CODE_WEIGHT = 0.2  # code weight of vx, vy against 1.0 for the 8 box channels
NON_PEAK_OFFSET = 2.0  # non-peaks rank below every peak (scores in (0, 1)), by their own score


class PositionEmbeddingLearned(nn.Module):
    """(x, y) BEV cell coordinates -> a `channels`-wide embedding (mmdet3d's PositionEmbeddingLearned)."""

    def __init__(self, channels: int):
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Conv1d(2, channels, 1), nn.BatchNorm1d(channels), nn.ReLU(inplace=True), nn.Conv1d(channels, channels, 1)
        )

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        """xy (B, N, 2) -> (B, channels, N)."""
        return self.position_embedding_head(xy.transpose(1, 2))


class DecoderLayer(nn.Module):
    """Post-norm transformer decoder layer: query self-attention, cross-attention to the BEV cells, FFN.

    Positions enter as learned embeddings added to queries and keys (and values), as in TransFusion."""

    def __init__(self, channels: int, num_heads: int, ffn_channels: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(channels, num_heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(channels, ffn_channels)
        self.linear2 = nn.Linear(ffn_channels, channels)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(channels), nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.self_posembed = PositionEmbeddingLearned(channels)
        self.cross_posembed = PositionEmbeddingLearned(channels)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor
    ) -> torch.Tensor:
        """query (B, C, P), key (B, C, N), positions (B, P, 2) and (B, N, 2) -> (B, C, P)."""
        query_embed = self.self_posembed(query_pos).permute(2, 0, 1)  # (P, B, C): sequence first
        key = (key + self.cross_posembed(key_pos)).permute(2, 0, 1)
        q = query.permute(2, 0, 1)
        attended = q + query_embed
        q = self.norm1(q + self.dropout1(self.self_attn(attended, attended, attended, need_weights=False)[0]))
        cross = self.cross_attn(q + query_embed, key, key, need_weights=False)[0]
        q = self.norm2(q + self.dropout2(cross))
        q = self.norm3(q + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(q))))))
        return q.permute(1, 2, 0)


class QueryBranches(nn.Module):
    """One small FFN per output, as 1x1 Conv1d over the queries; the last conv of each is an output layer."""

    def __init__(self, channels: int, head_channels: int, outputs: Mapping[str, int]):
        super().__init__()
        self.branches = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv1d(channels, head_channels, 1, bias=False),
                    nn.BatchNorm1d(head_channels),
                    nn.ReLU(inplace=True),
                    nn.Conv1d(head_channels, n, 1),
                )
                for name, n in outputs.items()
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: branch(x) for name, branch in self.branches.items()}


class TransFusionHead(nn.Module):
    """BEV features (B, C, Y, X) -> dense class heatmap and `num_proposals` box predictions.

    Outputs (P = num_proposals, K = num_classes):
      dense_heatmap (B, K, Y, X) logits;  query_heatmap (B, K, P) class logits of each query;
      query_score (B, K, P) the peak-filtered heatmap probability at each proposal (TransFusion's
      `query_heatmap_score`); query_labels (B, P) int64 class of each proposal;
      center (B, 2, P) box centre in BEV cells (x, y: cell i spans [i, i+1)); height (B, 1, P) z in m;
      size (B, 3, P) log(l, w, h); rotation (B, 2, P) (sin, cos) of yaw; velocity (B, 2, P) m/s if enabled.
    `no_nms_classes`: classes whose proposals skip the local-maximum filter (mmdet3d does this for the
    small nuScenes classes, pedestrian and traffic cone, whose peaks are often adjacent)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 128,
        num_proposals: int = 200,
        num_heads: int = 8,
        ffn_channels: int = 256,
        head_channels: int = 64,
        dropout: float = 0.1,
        nms_kernel: int = 3,
        no_nms_classes: Sequence[int] = (),
        velocity: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.nms_kernel = nms_kernel
        self.shared_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.heatmap_head = nn.Sequential(
            conv_bn_relu(channels, channels), nn.Conv2d(channels, num_classes, 3, padding=1)
        )
        self.class_encoding = nn.Conv1d(num_classes, channels, 1)
        self.decoder = DecoderLayer(channels, num_heads, ffn_channels, dropout)
        outputs = dict(QUERY_HEADS)
        if velocity:
            outputs["velocity"] = VELOCITY_CHANNELS
        outputs["query_heatmap"] = num_classes
        self.prediction = QueryBranches(channels, head_channels, outputs)
        no_nms = torch.zeros(num_classes, dtype=torch.bool)
        no_nms[list(no_nms_classes)] = True
        self.register_buffer("no_nms", no_nms, persistent=False)
        prior_bias = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)  # mmdet3d's -2.19
        nn.init.constant_(self.heatmap_head[-1].bias, prior_bias)
        nn.init.constant_(self.prediction.branches["query_heatmap"][-1].bias, prior_bias)

    def output_layers(self) -> list[nn.Module]:
        """Layers whose output channels are the head's outputs (never prune them)."""
        return [self.heatmap_head[-1]] + [branch[-1] for branch in self.prediction.branches.values()]

    def proposals(self, dense_heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The `num_proposals` best local maxima over all classes and cells, in (class, cell) order.

        Returns labels (B, P), flat cells (B, P) (index y * X + x) and the peak-filtered probability map
        (B, K, Y*X), zero off the peaks. If a map has fewer peaks than proposals, the rest are its best
        non-peak cells (TransFusion takes arbitrary zeros there; ours is deterministic, so exports agree)."""
        heat = dense_heatmap.detach().sigmoid()
        pooled = F.max_pool2d(heat, self.nms_kernel, stride=1, padding=self.nms_kernel // 2)
        pooled = torch.where(self.no_nms.view(1, -1, 1, 1), heat, pooled)
        is_peak = heat == pooled
        ranking = torch.where(is_peak, heat, heat - NON_PEAK_OFFSET).flatten(1)
        # In index order, not score order: near-equal scores swap places between runtimes (torch vs ONNX
        # Runtime), and queries are an unordered set to the decoder (attention is permutation-equivariant).
        flat = ranking.topk(self.num_proposals, dim=1).indices.sort(dim=1).values
        cells_per_map = heat.shape[2] * heat.shape[3]
        return flat // cells_per_map, flat % cells_per_map, (heat * is_peak).flatten(2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.shared_conv(x)
        b, c, height, width = features.shape
        dense_heatmap = self.heatmap_head(features)
        labels, cells, peaks = self.proposals(dense_heatmap)
        flat_features = features.flatten(2)  # (B, C, N)
        query = flat_features.gather(2, cells.unsqueeze(1).expand(-1, c, -1))
        classes = torch.arange(self.num_classes, device=x.device)
        one_hot = (labels.unsqueeze(1) == classes.view(1, -1, 1)).to(query.dtype)  # (B, K, P)
        query = query + self.class_encoding(one_hot)
        key_pos = bev_cell_centres(height, width, x.device, x.dtype).unsqueeze(0).expand(b, -1, -1)
        query_pos = key_pos.gather(1, cells.unsqueeze(2).expand(-1, -1, 2))
        outputs = self.prediction(self.decoder(query, flat_features, query_pos, key_pos))
        outputs["center"] = outputs["center"] + query_pos.transpose(1, 2)
        outputs["query_score"] = peaks.gather(2, cells.unsqueeze(1).expand(-1, self.num_classes, -1))
        outputs["query_labels"] = labels
        outputs["dense_heatmap"] = dense_heatmap
        return outputs


def bev_cell_centres(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(height * width, 2) centres (x + 0.5, y + 0.5) of the BEV cells, in the flat order y * width + x."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2) + 0.5


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_transfusion(
    outputs: Mapping[str, torch.Tensor], grid: BEVGrid, score_threshold: float = 0.05, top_k: int = 100
) -> list[dict[str, np.ndarray]]:
    """Per sample: `boxes` (K, 7) [x, y, z, l, w, h, yaw], `scores`, `labels` (and `velocities` (K, 2) m/s),
    best first: the format of `fusion.models.heads.decode_boxes`, so `fusion.metrics` scores it unchanged.

    Score of a query: sigmoid of its class logit times its proposal's heatmap peak, for the proposal's
    class only (TransFusion's `heatmap * query_heatmap_score * one_hot`)."""
    num_classes = outputs["query_heatmap"].shape[1]
    classes = torch.arange(num_classes, device=outputs["query_labels"].device)
    one_hot = outputs["query_labels"].unsqueeze(1) == classes.view(1, -1, 1)
    class_scores = outputs["query_heatmap"].float().sigmoid() * outputs["query_score"].float() * one_hot
    scores, labels = class_scores.max(dim=1)  # (B, P)
    center, size = outputs["center"].float(), outputs["size"].float().clamp(max=4.0).exp()
    x = grid.x_range[0] + center[:, 0] * grid.cell
    y = grid.y_range[0] + center[:, 1] * grid.cell
    rotation = outputs["rotation"].float()
    yaw = torch.atan2(rotation[:, 0], rotation[:, 1])
    z = outputs["height"].float()[:, 0]
    boxes = torch.stack([x, y, z, size[:, 0], size[:, 1], size[:, 2], yaw], dim=-1)  # (B, P, 7)
    velocity = outputs["velocity"].float().transpose(1, 2) if "velocity" in outputs else None
    results = []
    for i in range(scores.shape[0]):
        order = scores[i].argsort(descending=True, stable=True)[:top_k]
        order = order[scores[i][order] >= score_threshold]
        result = {
            "boxes": boxes[i][order].cpu().numpy(),
            "scores": scores[i][order].cpu().numpy(),
            "labels": labels[i][order].cpu().numpy(),
        }
        if velocity is not None:
            result["velocities"] = velocity[i][order].cpu().numpy()
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Assignment and losses
# ---------------------------------------------------------------------------------------------------------------


def match_cost(
    class_logits: torch.Tensor,
    centers: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_centers: torch.Tensor,
    grid_size: tuple[int, int],
) -> torch.Tensor:
    """(P, G) cost of giving ground truth g to query p: mmdet3d's focal classification cost (weight 0.15) plus
    the L1 distance of the BEV centres as fractions of the grid (weight 0.25). No IoU term (see module doc).

    class_logits (P, K), centers (P, 2) and gt_centers (G, 2) in BEV cells, gt_labels (G,), grid_size (X, Y)."""
    prob = class_logits.sigmoid()
    eps = 1e-12
    neg = -(1 - prob + eps).log() * (1 - FOCAL_ALPHA) * prob.pow(FOCAL_GAMMA)
    pos = -(prob + eps).log() * FOCAL_ALPHA * (1 - prob).pow(FOCAL_GAMMA)
    class_cost = (pos - neg)[:, gt_labels]
    extent = torch.tensor(grid_size, dtype=centers.dtype, device=centers.device)
    center_cost = torch.cdist(centers / extent, gt_centers / extent, p=1)
    return CLASS_COST_WEIGHT * class_cost + CENTER_COST_WEIGHT * center_cost


def hungarian_assign(cost: torch.Tensor) -> torch.Tensor:
    """(P,) index of the ground truth each query is matched to, -1 for background (minimum total cost)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:  # pragma: no cover - scipy comes with the [nuscenes] extra's scikit-learn
        raise ImportError("the TransFusion head's training needs scipy (pip install scipy)") from error
    assigned = torch.full((cost.shape[0],), -1, dtype=torch.long)
    if cost.shape[1] == 0:
        return assigned
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    assigned[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return assigned


def encode_boxes(boxes: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """(G, 7) metric boxes -> (G, 8) code [centre x, y in BEV cells, z, log l, log w, log h, sin, cos]."""
    cx = (boxes[:, 0] - grid.x_range[0]) / grid.cell
    cy = (boxes[:, 1] - grid.y_range[0]) / grid.cell
    log_size = boxes[:, 3:6].clamp(min=1e-3).log()
    rot = torch.stack([boxes[:, 6].sin(), boxes[:, 6].cos()], dim=1)
    return torch.cat([cx[:, None], cy[:, None], boxes[:, 2:3], log_size, rot], dim=1)


def _on_grid(code: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    return (code[:, 0] >= 0) & (code[:, 0] < grid.size_x) & (code[:, 1] >= 0) & (code[:, 1] < grid.size_y)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed RetinaNet focal loss (alpha 0.25, gamma 2) with one-hot targets; the caller normalises."""
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    weight = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * pt.pow(FOCAL_GAMMA)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def assign_targets(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], grid: BEVGrid
) -> dict[str, torch.Tensor]:
    """Hungarian targets per query: `labels` (B, K, P) one-hot (all zero for background), `boxes` (B, D, P)
    in the code of the outputs (D = 8, or 10 with velocity), `weights` (B, D, P) (positives, code weights;
    velocity only where it is known) and `num_positive`.

    Ground truth: `batch["boxes"]` (B, G, 7) and `batch["labels"]` (B, G), -1 rows padding; boxes whose centre
    is off the grid are not matched (they have no heatmap peak either). Velocities: `batch["velocities"]`
    (B, G, 2) and `batch["target_velocity_mask"]` (B, G) where present."""
    logits, centers = outputs["query_heatmap"].detach(), outputs["center"].detach()
    b, num_classes, p = logits.shape
    with_velocity = "velocity" in outputs and "velocities" in batch
    dims = 8 + (VELOCITY_CHANNELS if with_velocity else 0)
    labels = torch.zeros(b, num_classes, p, device=logits.device)
    boxes = torch.zeros(b, dims, p, device=logits.device)
    weights = torch.zeros(b, dims, p, device=logits.device)
    code_weights = torch.ones(dims, device=logits.device)
    code_weights[8:] = VELOCITY_CODE_WEIGHT
    for i in range(b):
        gt_labels = batch["labels"][i].to(logits.device).long()
        code = encode_boxes(batch["boxes"][i].to(logits.device).float(), grid)
        keep = (gt_labels >= 0) & _on_grid(code, grid)
        if with_velocity:
            velocity = batch["velocities"][i].to(logits.device).float()
            known = torch.isfinite(velocity).all(dim=1)
            if "target_velocity_mask" in batch:
                known &= batch["target_velocity_mask"][i].to(logits.device) > 0
            code = torch.cat([code, torch.nan_to_num(velocity)], dim=1)
            known = known[keep]
        gt_labels, code = gt_labels[keep], code[keep]
        cost = match_cost(logits[i].T, centers[i].T, gt_labels, code[:, :2], (grid.size_x, grid.size_y))
        assigned = hungarian_assign(cost).to(logits.device)
        queries = (assigned >= 0).nonzero().squeeze(1)
        matched = assigned[queries]
        labels[i, gt_labels[matched], queries] = 1.0
        boxes[i][:, queries] = code[matched].T
        weights[i][:, queries] = code_weights[:, None]
        if with_velocity:
            weights[i][8:, queries] *= known[matched].float()
    return {"labels": labels, "boxes": boxes, "weights": weights, "num_positive": labels.sum()}


def transfusion_loss(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    grid: BEVGrid,
    normaliser: Normaliser = local_count,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The head's training loss and its parts (floats, for logging), with mmdet3d's TransFusion weights:
    Gaussian focal loss on the dense heatmap (per peak, against `batch["heatmap"]`), sigmoid focal loss on
    the query classes and 0.25 x L1 on the matched box codes (both per matched query). `normaliser` turns
    this rank's counts into divisors, as in `fusion.losses`."""
    targets = assign_targets(outputs, batch, grid)
    positives = normaliser(targets["num_positive"])
    prediction = [outputs[name] for name in QUERY_HEADS]
    if targets["boxes"].shape[1] > 8:
        prediction.append(outputs["velocity"])
    l1 = (torch.cat(prediction, dim=1) - targets["boxes"]).abs() * targets["weights"]
    parts = {
        "heatmap": gaussian_focal_loss(outputs["dense_heatmap"], batch["heatmap"], normaliser=normaliser),
        "query_class": sigmoid_focal_loss(outputs["query_heatmap"], targets["labels"]) / positives,
        "box": BOX_LOSS_WEIGHT * l1.sum() / positives,
    }
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


__all__ = [
    "QUERY_HEADS",
    "TransFusionHead",
    "assign_targets",
    "bev_cell_centres",
    "decode_transfusion",
    "encode_boxes",
    "hungarian_assign",
    "match_cost",
    "sigmoid_focal_loss",
    "transfusion_loss",
]
