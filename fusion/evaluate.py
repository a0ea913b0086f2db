"""Evaluation on a synthetic split: nuScenes-style detection metrics and BEV map IoU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common.progress import progress_bar
from fusion.data.dataset import SyntheticScenes, collate, model_inputs
from fusion.metrics import SegmentationMeter, detection_metrics
from fusion.models.heads import decode_boxes

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


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
    if isinstance(run, torch.nn.Module):
        run.eval()
    config = dataset.config
    predictions, truths = [], []
    meter = SegmentationMeter(config.data.map_classes)
    has_map = False
    starts = range(0, len(dataset), batch_size)
    for start in progress_bar(starts, desc="evaluate", enabled=progress, leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        outputs = run(**model_inputs(batch)) if isinstance(run, torch.nn.Module) else run(model_inputs(batch))
        predictions += decode_boxes(outputs, config.grid)
        truths += ground_truth(batch)
        if "bev_map" in outputs:
            has_map = True
            meter.update(outputs["bev_map"].float().sigmoid(), batch["bev_map"])
    metrics = detection_metrics(predictions, truths, config.data.classes)
    if has_map:
        seg = meter.compute()
        metrics["mIoU"], metrics["map_iou"] = seg["mIoU"], seg["iou"]
    return metrics


def summary_line(metrics: dict) -> str:
    parts = [f"mAP {metrics['mAP']:.4f}", f"NDS {metrics['NDS']:.4f}"]
    # nuScenes units: translation error in metres, scale error as 1 - IoU, orientation error in radians.
    parts += [f"mATE {metrics['mATE']:.3f} m", f"mASE {metrics['mASE']:.3f} (1-IoU)", f"mAOE {metrics['mAOE']:.3f} rad"]
    if "mIoU" in metrics:
        parts.append(f"mIoU {metrics['mIoU']:.4f}")
    return "  ".join(parts)
