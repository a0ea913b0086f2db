"""The reference model's task description: one user of the model-agnostic API, nothing more.

`compress` and `export` never import `fusion`; the CLI and the benchmarks wire the reference model
to them through `reference_task(model)`, exactly as a user wires their own model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.task import Task
from fusion.config import BEVGrid, Config
from fusion.data.dataset import collate, make_sample
from fusion.data.source import DataSource, open_split
from fusion.losses import MAP_WEIGHT, Normaliser, local_count, task_loss
from fusion.models.bevfusion import BEVFusion
from fusion.models.swin import SwinTransformer, WindowAttention
from fusion.models.transfusion import TransFusionHead, transfusion_loss

SCORING_STREAM = 1000  # scenes of the scoring set come from their own seeded stream


def reference_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return task_loss(outputs, batch)[0]


def detection_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    grid: BEVGrid,
    normaliser: Normaliser = local_count,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of either head and its parts, told apart by the head's output names: TransFusion's
    (Hungarian matching, `query_heatmap`) or CenterPoint's (`fusion.losses.task_loss`); the BEV map loss too."""
    if "query_heatmap" not in outputs:
        return task_loss(outputs, batch, normaliser)
    total, parts = transfusion_loss(outputs, batch, grid, normaliser)
    if "bev_map" in outputs:
        seg = MAP_WEIGHT * F.binary_cross_entropy_with_logits(outputs["bev_map"], batch["bev_map"])
        total, parts = total + seg, {**parts, "map": float(seg.detach())}
    return total, parts


def protected_names(model: BEVFusion) -> tuple[str, ...]:
    """Modules whose output channels are never pruned, by name: the depth conv (its outputs are depth bins, not
    features), TransFusion's output layers (`head.output_layers()`: class heatmap, box and class branches) and
    Swin's qkv layers (`swin_fixed_widths`)."""
    names = ["camera.vtransform.depth_conv"] if model.camera is not None else []
    names += swin_fixed_widths(model)
    if isinstance(model.heads.det, TransFusionHead):
        layers = model.heads.det.output_layers()
        names += [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    return tuple(names)


def swin_fixed_widths(model: BEVFusion) -> list[str]:
    """Swin's `attn.qkv` layers, whose output widths stay whole: their rows are (q | k | v) x heads x head_dim,
    which torch-pruning would cut as independent channels, breaking the head reshape. compress finds that only
    by trial (a pruned copy per block: 80 of 96 s of a prune of bevfusion-tiny), so the task says it up front.
    Swin's MLP hidden widths and residual widths prune (exactly; the two residual groups that feed patch
    merging's 4 x C LayerNorm break under torch-pruning and are left whole, reported in `unpruned_groups`)."""
    camera = model.camera
    if camera is None or not isinstance(camera.backbone, SwinTransformer):
        return []
    return [f"camera.backbone.{n}.qkv" for n, m in camera.backbone.named_modules() if isinstance(m, WindowAttention)]


def reference_task(model: BEVFusion) -> Task:
    """Partition, inputs and loss of the reference BEVFusion (camera-only and LiDAR-only variants too).

    Protected by name: the depth conv and, for a TransFusion head, its output layers (`protected_names`).
    CenterPoint's output convs need no naming: the toolkit finds them from the graph.
    """
    names = model.input_names
    protected = protected_names(model)
    grid = model.config.grid
    transfusion = isinstance(model.heads.det, TransFusionHead)

    def loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return detection_loss(outputs, batch, grid)[0]

    def inputs(batch: dict) -> dict:
        chosen = {name: batch[name] for name in names}
        if model.camera is not None and "frustum_cells" in batch:  # nuScenes: each sample's own camera geometry
            chosen["frustum_cells"] = batch["frustum_cells"]
        return chosen

    return Task(
        partition=model.partition(),
        loss=loss if transfusion else reference_loss,
        inputs=inputs,
        protected=protected,
        trace=lambda m: m.pruning_trace(),
    )


def scoring_set(
    config: Config, num_batches: int, batch_size: int, seed: int = 0, source: DataSource | None = None
) -> list[dict[str, torch.Tensor]]:
    """The fixed scoring set D: the same scenes for every method. Synthetic: drawn from a dedicated
    stream; nuScenes: a seeded draw from the training split (never the val split)."""
    count = num_batches * batch_size
    if source is None or source.kind == "synthetic":
        samples = [make_sample(config, SCORING_STREAM + seed, i) for i in range(count)]
    else:
        train = open_split(config, source, "train")
        if len(train) < count:
            raise ValueError(f"the scoring set needs {count} samples; the training split has {len(train)}")
        chosen = np.random.default_rng([SCORING_STREAM, seed]).permutation(len(train))[:count]
        samples = [train[int(i)] for i in chosen]
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def first_sample(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example batch for tracing and GFLOPs: one sample, so reported GFLOPs are per sample. Nested
    dicts (the sparse encoder's rulebooks) are sliced too: every batch tensor has the sample dim first."""
    return {k: first_sample(v) if isinstance(v, dict) else v[:1] for k, v in batch.items()}
