"""Evaluation on a synthetic split: nuScenes-style detection metrics and BEV map IoU.

Under torchrun each rank runs a contiguous block of the split's batches (the same batches, of the
same size, as one process runs, so every output is bit for bit the one-process output), rank 0
gathers the predictions in order and computes the metrics once, and every rank returns them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common import dist
from common.progress import progress_bar
from fusion.data.dataset import SyntheticScenes, collate, model_inputs
from fusion.metrics import SegmentationMeter, detection_metrics
from fusion.models.heads import decode_boxes
from fusion.models.transfusion import decode_transfusion

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def decode_detections(
    outputs: dict[str, torch.Tensor], grid, score_threshold: float = 0.05
) -> list[dict[str, np.ndarray]]:
    """Boxes of either head, told apart by its output names: TransFusion's queries (`query_heatmap`) or
    CenterPoint's dense maps (`heatmap`); both decoders return the same per-sample format."""
    if "query_heatmap" in outputs:
        return decode_transfusion(outputs, grid, score_threshold=score_threshold)
    return decode_boxes(outputs, grid, score_threshold=score_threshold)


def ground_truth(batch: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """Strip the padding from a batch's boxes."""
    result = []
    for boxes, labels in zip(batch["boxes"].numpy(), batch["labels"].numpy()):
        keep = labels >= 0
        result.append({"boxes": boxes[keep], "labels": labels[keep]})
    return result


@torch.no_grad()
def evaluate(
    run: Runner | torch.nn.Module, dataset: SyntheticScenes, batch_size: int = 8, progress: bool = True
) -> dict:
    """Metrics of a model, or of any callable from model inputs to head outputs (an ONNX session, say)."""
    config = dataset.config
    predictions, truths = [], []
    meter = SegmentationMeter(config.data.map_classes)
    has_map = False
    for batch, outputs in _run_batches(run, dataset, batch_size, progress):
        predictions += decode_detections(outputs, config.grid)
        truths += ground_truth(batch)
        if "bev_map" in outputs:
            has_map = True
            meter.update(outputs["bev_map"].float().sigmoid(), batch["bev_map"])
    if dist.is_distributed():
        return dist.broadcast_object(_metrics_on_main(predictions, truths, meter, has_map, config))
    return _metrics(predictions, truths, meter, has_map, config)


def _run_batches(run: Runner | torch.nn.Module, dataset, batch_size: int, progress: bool):
    """(batch, outputs) over this rank's block of the data set's batches, in order."""
    if isinstance(run, torch.nn.Module):
        run.eval()
    starts = range(0, len(dataset), batch_size)
    mine = [starts[i] for i in dist.shard_range(len(starts))]
    for start in progress_bar(mine, desc="evaluate", enabled=progress, leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        outputs = run(**model_inputs(batch)) if isinstance(run, torch.nn.Module) else run(model_inputs(batch))
        yield batch, outputs


@torch.no_grad()
def nuscenes_detections(
    run: Runner | torch.nn.Module, dataset, batch_size: int = 8, progress: bool = True
) -> list[dict] | None:
    """LiDAR-frame detections of every sample of a nuScenes data set, with the sample token and pose the
    results file needs (`fusion.nuscenes_eval.results_json`); gathered on rank 0 (None on other ranks).
    A model with a velocity head (ModelConfig.velocity_head) adds `velocities` (K, 2) LiDAR-frame m/s, which
    results_json rotates to the global frame; without one the results carry zero velocities."""
    config = dataset.config
    detections = []
    for batch, outputs in _run_batches(run, dataset, batch_size, progress):
        for i, decoded in enumerate(decode_detections(outputs, config.grid)):
            decoded["sample_token"] = batch["sample_token"][i]
            decoded["lidar_to_global"] = batch["lidar_to_global"][i].numpy()
            detections.append(decoded)
    if not dist.is_distributed():
        return detections
    parts = dist.gather_object(detections)
    return None if parts is None else [d for part in parts for d in part]


def _metrics(predictions: list, truths: list, meter: SegmentationMeter, has_map: bool, config) -> dict:
    metrics = detection_metrics(predictions, truths, config.data.classes)
    if has_map:
        seg = meter.compute()
        metrics["mIoU"], metrics["map_iou"] = seg["mIoU"], seg["iou"]
    return metrics


def _metrics_on_main(predictions: list, truths: list, meter: SegmentationMeter, has_map: bool, config) -> dict | None:
    """Every rank's predictions (in rank order, i.e. dataset order) and map counts, scored on rank 0."""
    parts = dist.gather_object((predictions, truths, meter.intersection, meter.union, has_map))
    if parts is None:
        return None
    predictions = [p for part in parts for p in part[0]]
    truths = [t for part in parts for t in part[1]]
    meter.intersection = sum(part[2] for part in parts)
    meter.union = sum(part[3] for part in parts)
    return _metrics(predictions, truths, meter, any(part[4] for part in parts), config)


def summary_line(metrics: dict) -> str:
    parts = [f"mAP {metrics['mAP']:.4f}", f"NDS {metrics['NDS']:.4f}"]
    # nuScenes units: translation error in metres, scale error as 1 - IoU, orientation error in radians.
    parts += [f"mATE {metrics['mATE']:.3f} m", f"mASE {metrics['mASE']:.3f} (1-IoU)", f"mAOE {metrics['mAOE']:.3f} rad"]
    if "mIoU" in metrics:
        parts.append(f"mIoU {metrics['mIoU']:.4f}")
    return "  ".join(parts)
