"""The public Python API: bring any `nn.Module` with a `Task`; prune, fine-tune, save, load, export.

    import altermoma
    task = altermoma.Task(partition={"camera": ["cam."], "lidar": ["lidar."], "fusion": ["fuser.", "head."]},
                          loss=my_loss, inputs=lambda batch: {"images": batch["images"], "points": batch["points"]})
    report = altermoma.prune(model, task, scoring_batches, method="altereva", target_gflops=0.5)
    altermoma.finetune(model, task, train_batches, steps=1000, lr=1e-4)
    altermoma.save_pruned(model, "runs/pruned", report)
    model = altermoma.load_pruned(build_my_model(), "runs/pruned")
    altermoma.export_onnx(model, task.arguments(batch)[1], "model.onnx")

Plain functions over `compress` and `export`; the CLI's `--task module:function` uses the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from common.task import Task
from compress import finetune as _finetune
from compress import prune as _prune
from compress.altereva import AlterEvaConfig
from compress.baselines import ProsprConfig, SynFlowConfig
from compress.imp import FinetuneFn
from compress.latency import LatencyTable
from compress.request import IMPConfig, PruneRequest


@dataclass
class Setup:
    """What a user's `--task module:function` returns: the model (freshly built, unpruned, with its
    trained weights), its task, the scoring set and, for fine-tuning, the training batches."""

    model: nn.Module
    task: Task
    scoring_batches: list
    train_batches: Iterable | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def prune(
    model: nn.Module,
    task: Task,
    batches: list,
    *,
    method: str = "altereva",
    target_gflops: float | None = None,
    sparsity: float | None = None,
    channel_ratio: float | None = None,
    target_latency: float | None = None,
    latency_table: str | os.PathLike | LatencyTable | None = None,
    latency_backend: str | None = None,
    round_to: int = 8,
    max_group_ratio: float = 0.9,
    seed: int = 0,
    best_effort: bool = False,
    altereva: AlterEvaConfig | None = None,
    synflow: SynFlowConfig | None = None,
    prospr: ProsprConfig | None = None,
    imp: IMPConfig | None = None,
    example_batch: Any = None,
    train_batches: list | None = None,
    finetune_fn: FinetuneFn | None = None,
    progress: bool = True,
) -> dict:
    """Prune `model` in place and return the pruning report.

    Give one target: `target_gflops` (fraction of GFLOPs to remove), `channel_ratio` (fraction
    of channels) or `target_latency` (fraction of the unpruned model's predicted latency to keep, from
    `latency_table`, a per-layer table built by `altermoma latency-table` for this model) for structured
    pruning, `sparsity` (fraction of weights) for unstructured. A `latency_table` given with another
    structured target only adds the predicted latency to the report; `latency_backend` refuses a table
    measured on another backend. Methods:
    altereva, snip, magnitude, random, synflow, prospr, imp. `batches` is the scoring set; its first
    batch (or `example_batch`) is traced and counted. Output layers keep every channel; groups that
    cannot be pruned are listed in the report's "unpruned_groups". A selection more than 2 points
    from the target raises `PruningError` before anything is removed (`best_effort=True`: a warning).
    """
    request = PruneRequest(
        method=method,
        target_gflops=target_gflops,
        channel_ratio=channel_ratio,
        sparsity=sparsity,
        target_latency=target_latency,
        latency_table=latency_table,
        latency_backend=latency_backend,
        round_to=round_to,
        max_group_ratio=max_group_ratio,
        seed=seed,
        best_effort=best_effort,
        altereva=altereva or AlterEvaConfig(),
        synflow=synflow or SynFlowConfig(),
        prospr=prospr or ProsprConfig(),
        imp=imp or IMPConfig(),
    )
    return _prune.prune(
        model,
        task,
        batches,
        request,
        example_batch=example_batch,
        finetune_fn=finetune_fn,
        train_batches=train_batches,
        progress=progress,
    )


def finetune(model: nn.Module, task: Task, batches: Iterable, *, steps: int, lr: float = 1e-3, **options) -> dict:
    """Fine-tune in place over `batches` (cycled) with the task's loss; see `compress.finetune.finetune`."""
    return _finetune.finetune(model, task, batches, steps=steps, lr=lr, **options)
