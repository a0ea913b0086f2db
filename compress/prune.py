"""One entry point for every pruning method: validate the request, then one-shot or IMP."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from common import dist
from common.task import Task
from compress.imp import FinetuneFn, iterative_magnitude_prune
from compress.oneshot import check_gradients_possible, prune_structured, prune_unstructured
from compress.request import PruneRequest
from compress.sparse import spconv_threads_warning
from compress.structured import PruningError


def prune(
    model: nn.Module,
    task: Task,
    batches: list,
    request: PruneRequest,
    *,
    example_batch: Any = None,
    finetune_fn: FinetuneFn | None = None,
    train_batches: list | None = None,
    progress: bool = True,
) -> dict:
    """Prune `model` in place; returns the pruning report.

    `batches` is the scoring set (a non-empty list); `example_batch` (default: the first batch) is
    traced for the channel graph and counted for GFLOPs. IMP fine-tunes between its levels with
    `finetune_fn(model, steps, level)` (default: the generic loop on `train_batches`, else the
    scoring set) and leaves the last level's share of its budget to the caller
    (`finetune_steps_remaining` in the report).

    Under torchrun every rank calls this with the same model and the same (global) scoring set:
    both are checked, since rank-local data would give every rank other scores and other shapes.
    """
    request.validate()
    if not isinstance(batches, list | tuple) or not batches:
        raise PruningError("the scoring set must be a non-empty list of batches")
    check_gradients_possible(model, request.method)  # IMP's fine-tunes need a backward too
    if (message := spconv_threads_warning(model)) is not None:
        warnings.warn(message, stacklevel=2)
    if dist.is_distributed():
        dist.check_same(dist.digest(model.state_dict()), "the model's weights")
        dist.check_same(dist.digest(list(batches)), "the scoring set (give every rank the same, global set)")
    if request.method == "fastnas":  # NVIDIA ModelOpt's own search and removal (compress.fastnas)
        from compress.fastnas import prune_fastnas

        return prune_fastnas(model, task, list(batches), request.target_gflops, request.round_to, example_batch)
    if request.method == "imp":
        return iterative_magnitude_prune(
            model,
            task,
            list(batches),
            request,
            example_batch=example_batch,
            finetune_fn=finetune_fn,
            train_batches=train_batches,
            progress=progress,
            finetune_last=False,
        )
    if request.structured:
        return prune_structured(model, task, list(batches), request, example_batch, progress)
    return prune_unstructured(model, task, list(batches), request, example_batch, progress)
