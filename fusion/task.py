"""The reference model's task description: one user of the model-agnostic API, nothing more.

`compress` and `export` never import `fusion`; the CLI and the benchmarks wire the reference model
to them through `reference_task(model)`, exactly as a user wires their own model.
"""

from __future__ import annotations

import numpy as np
import torch

from common.task import Task
from fusion.config import Config
from fusion.data.dataset import collate, make_sample
from fusion.data.source import DataSource, open_split
from fusion.losses import task_loss
from fusion.models.bevfusion import BEVFusion

SCORING_STREAM = 1000  # scenes of the scoring set come from their own seeded stream


def reference_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return task_loss(outputs, batch)[0]


def reference_task(model: BEVFusion) -> Task:
    """Partition, inputs and loss of the reference BEVFusion (camera-only and LiDAR-only variants too).

    The depth conv is protected by name: its D outputs are depth bins, not features. The output
    layers of the heads need no naming: the toolkit finds them from the graph.
    """
    names = model.input_names
    protected = ("camera.vtransform.depth_conv",) if model.camera is not None else ()

    def inputs(batch: dict) -> dict:
        chosen = {name: batch[name] for name in names}
        if model.camera is not None and "frustum_cells" in batch:  # nuScenes: each sample's own camera geometry
            chosen["frustum_cells"] = batch["frustum_cells"]
        return chosen

    return Task(
        partition=model.partition(),
        loss=reference_loss,
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
    """The example batch for tracing and GFLOPs: one sample, so reported GFLOPs are per sample."""
    return {k: v[:1] for k, v in batch.items()}
